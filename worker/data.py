"""Datasets and per-rank micro-batches for QA fine-tuning.

Contract (train.py, eval and export rely on it):
- `make_splits(cfg, examples) -> (train, eval)`: `data.eval_file` when set, else a held-out
  `data.eval_fraction` of the training examples, chosen by `training.seed` only (at least one
  example when the fraction is > 0, never all of them). Both keep file order.
- `expert_label_vocab(examples)`: the sorted distinct labels; an example's label id is its index
  there, -1 when it has none.
- `tokenizer_texts(cfg, train)` feeds `worker.tokenizer.load_or_train_tokenizer`;
  `build_datasets(cfg, tokenizer, train, eval)` gives both `QADataset`s with one label vocabulary.
- `QADataset(cfg, tokenizer, examples, label_vocab)`: one item per example, a dict
  `{"input_ids": list[int], "labels": list[int], "expert_label_id": int}` where
  input_ids = prompt + " " + answer + eos, labels = -100 on the prompt (loss on answer + eos only).
  Truncation: the answer keeps its first `max_target_length - 1` tokens and always ends with eos (so
  the model still learns to stop); then the PROMPT is cut from the left until prompt + answer fits
  `max_seq_length`. An answer is never dropped whole. `num_truncated` counts affected examples.
- `RankBatches(dataset, micro_batch_size, dp_rank, dp_size, seed)`: the training micro-batches of
  one data-parallel rank. Epoch order is a permutation seeded by (seed, epoch) only; the global
  order is cut into micro-batches, the tail dropped so every rank gets
  `micro_batches_per_epoch()` of them; rank r takes global micro-batches r, r+dp, r+2dp, ...
  `iterate(epoch, start)` skips exactly `start` of this rank's micro-batches (exact resume).
- `EvalBatches(dataset, micro_batch_size, dp_rank, dp_size)`: every eval example exactly once over
  all ranks, in file order, and the SAME number of micro-batches on every rank (an MoE forward is a
  collective); the missing slots are copies of an example with all labels -100 and label id -1.
  NOTE: a micro-batch can be all filler, so sum the token losses and divide by the number of
  labels != -100 over the whole eval (a per-batch mean would be 0/0 = NaN there).
- A collated micro-batch: `{"input_ids", "attention_mask", "labels"}` LongTensors (batch, seq),
  right-padded to the longest sequence in the micro-batch (pad id, mask 0, label -100), and
  `"expert_label_ids"` LongTensor (batch,).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, TypedDict

import numpy as np

from orchestrator.errors import ConfigError, ConfigIssue
from orchestrator.spec.qa_format import QAExample, held_out_count, read_qa_file
from orchestrator.spec.schema import RunConfig

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
NO_LABEL = -1
_SPLIT_STREAM = 0x5D17  # NOTE: keeps the held-out choice apart from the epoch orders' random streams


class Item(TypedDict):
    input_ids: list[int]
    labels: list[int]
    expert_label_id: int


def read_train_examples(cfg: RunConfig) -> list[QAExample]:
    """The training file's examples (the first `data.max_samples` when set)."""
    return read_qa_file(cfg.data.train_file, cfg.data.max_samples, field="data.train_file")


def make_splits(cfg: RunConfig, examples: list[QAExample]) -> tuple[list[QAExample], list[QAExample]]:
    """(train, eval): the eval file when set, else a seed-determined held-out share of `examples`."""
    if cfg.data.eval_file is not None:
        return list(examples), read_qa_file(cfg.data.eval_file, field="data.eval_file")
    n_eval = held_out_count(len(examples), cfg.data.eval_fraction)
    if n_eval == 0:
        if cfg.data.eval_fraction > 0:
            logger.warning("only %d example: nothing held out for evaluation", len(examples))
        return list(examples), []
    rng = np.random.default_rng([cfg.training.seed, _SPLIT_STREAM])
    held = set(rng.permutation(len(examples))[:n_eval].tolist())
    train = [ex for i, ex in enumerate(examples) if i not in held]
    evaluation = [ex for i, ex in enumerate(examples) if i in held]
    return train, evaluation


def expert_label_vocab(examples: Sequence[QAExample]) -> list[str]:
    """Sorted distinct expert labels; the label id of an example is its index here (-1: none)."""
    return sorted({ex.expert_label for ex in examples if ex.expert_label is not None})


def tokenizer_texts(cfg: RunConfig, examples: Sequence[QAExample]) -> list[str]:
    """The texts the offline BPE is trained on: each prompt followed by its answer."""
    return [cfg.data.prompt_template.format(question=ex.question) + " " + ex.answer for ex in examples]


class QADataset:
    """Tokenized examples (see the module docstring for the item format and truncation)."""

    def __init__(
        self,
        cfg: RunConfig,
        tokenizer: PreTrainedTokenizerFast,
        examples: Sequence[QAExample],
        label_vocab: Sequence[str],
    ) -> None:
        eos_id = tokenizer.eos_token_id
        pad_id = tokenizer.pad_token_id
        if eos_id is None or pad_id is None:
            raise ValueError("the tokenizer needs eos and pad tokens (load it with load_or_train_tokenizer)")
        self.pad_id: int = int(pad_id)
        self.label_vocab = list(label_vocab)
        label_ids = {label: i for i, label in enumerate(self.label_vocab)}
        max_seq, max_target = cfg.data.max_seq_length, cfg.data.max_target_length

        prompts = [cfg.data.prompt_template.format(question=ex.question) for ex in examples]
        answers = [" " + ex.answer for ex in examples]
        # NOTE: one batched call each (Rust, fast); prompt and answer are tokenized apart so the
        # boundary between them is exact. The answer starts with a space, which byte-level BPE
        # splits on anyway, so this matches tokenizing the joined text.
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
        answer_ids = tokenizer(answers, add_special_tokens=False)["input_ids"] if answers else []

        self.items: list[Item] = []
        self.num_truncated = 0
        for ex, p_ids, a_ids in zip(examples, prompt_ids, answer_ids, strict=True):
            target = [*a_ids, int(eos_id)]
            truncated = False
            if len(target) > max_target:
                # Keep eos as the last token so the model still learns where an answer ends.
                target = [*a_ids[: max_target - 1], int(eos_id)] if max_target > 1 else a_ids[:1]
                truncated = True
            budget = max_seq - len(target)  # >= 1: the config requires max_target < max_seq
            prompt = list(p_ids)
            if len(prompt) > budget:
                prompt = prompt[len(prompt) - budget :]  # cut from the left: keep the question's end
                truncated = True
            self.num_truncated += truncated
            label_id = label_ids.get(ex.expert_label, NO_LABEL) if ex.expert_label is not None else NO_LABEL
            self.items.append(
                Item(
                    input_ids=prompt + target,
                    labels=[IGNORE_INDEX] * len(prompt) + target,
                    expert_label_id=label_id,
                )
            )
        if self.num_truncated:
            logger.warning(
                "%d of %d examples truncated to max_seq_length %d / max_target_length %d",
                self.num_truncated,
                len(self.items),
                max_seq,
                max_target,
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Item:
        return self.items[index]


def build_datasets(
    cfg: RunConfig,
    tokenizer: PreTrainedTokenizerFast,
    train: Sequence[QAExample],
    evaluation: Sequence[QAExample],
) -> tuple[QADataset, QADataset]:
    """Both splits, sharing one label vocabulary built from both (so ids agree)."""
    vocab = expert_label_vocab([*train, *evaluation])
    return QADataset(cfg, tokenizer, train, vocab), QADataset(cfg, tokenizer, evaluation, vocab)


def collate(items: Sequence[Item], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest sequence (see the module docstring)."""
    import torch

    longest = max(len(item["input_ids"]) for item in items)
    input_ids = torch.full((len(items), longest), pad_id, dtype=torch.long)  # (batch, seq)
    attention_mask = torch.zeros((len(items), longest), dtype=torch.long)  # (batch, seq)
    labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)  # (batch, seq)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        input_ids[row, :n] = torch.tensor(item["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(item["labels"], dtype=torch.long)
    expert_label_ids = torch.tensor([item["expert_label_id"] for item in items], dtype=torch.long)  # (batch,)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "expert_label_ids": expert_label_ids,
    }


def _check_rank(dp_rank: int, dp_size: int, micro_batch_size: int) -> None:
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size {dp_size})")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")


class RankBatches:
    """The training micro-batches of one data-parallel rank (see the module docstring)."""

    def __init__(
        self, dataset: QADataset, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int
    ) -> None:
        _check_rank(dp_rank, dp_size, micro_batch_size)
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        if self.micro_batches_per_epoch() == 0:
            raise ConfigError(
                [
                    ConfigIssue(
                        "training.micro_batch_size",
                        f"the training split has {len(dataset)} examples but one micro-batch on every "
                        f"rank needs {micro_batch_size * dp_size} (micro_batch_size {micro_batch_size} x "
                        f"{dp_size} ranks); add data or lower micro_batch_size",
                    )
                ]
            )

    def micro_batches_per_epoch(self) -> int:
        """Micro-batches this rank gets per epoch; the same on every rank."""
        return (len(self.dataset) // self.micro_batch_size) // self.dp_size

    def __len__(self) -> int:
        return self.micro_batches_per_epoch()

    def epoch_order(self, epoch: int) -> list[int]:
        """The global example order of an epoch: depends on (seed, epoch) only."""
        rng = np.random.default_rng([self.seed, epoch])
        return [int(i) for i in rng.permutation(len(self.dataset))]

    def indices(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches of `epoch`, as example indices."""
        order = self.epoch_order(epoch)
        mbs, n = self.micro_batch_size, self.micro_batches_per_epoch()
        out = []
        for i in range(n):
            g = i * self.dp_size + self.dp_rank  # global micro-batch index
            out.append(order[g * mbs : (g + 1) * mbs])
        return out

    def iterate(self, epoch: int, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Collated micro-batches of `epoch`, skipping this rank's first `start` (resume)."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        for batch in self.indices(epoch)[start:]:
            yield collate([self.dataset[i] for i in batch], self.dataset.pad_id)


class EvalBatches:
    """Evaluation micro-batches of one rank: equal count on every rank (see the module docstring)."""

    def __init__(self, dataset: QADataset, micro_batch_size: int, dp_rank: int, dp_size: int) -> None:
        _check_rank(dp_rank, dp_size, micro_batch_size)
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    def num_micro_batches(self) -> int:
        """Micro-batches per rank; the same on every rank (0 when there is no eval data)."""
        global_batches = -(-len(self.dataset) // self.micro_batch_size)
        return -(-global_batches // self.dp_size)

    def __len__(self) -> int:
        return self.num_micro_batches()

    def indices(self) -> list[list[int | None]]:
        """This rank's micro-batches as example indices; None is a filler slot (no loss)."""
        mbs, n = self.micro_batch_size, len(self.dataset)
        out: list[list[int | None]] = []
        for i in range(self.num_micro_batches()):
            g = i * self.dp_size + self.dp_rank
            out.append([k if k < n else None for k in range(g * mbs, (g + 1) * mbs)])
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if not len(self.dataset):
            return
        filler_src = self.dataset[0]
        filler = Item(
            input_ids=filler_src["input_ids"],
            labels=[IGNORE_INDEX] * len(filler_src["labels"]),
            expert_label_id=NO_LABEL,
        )
        for batch in self.indices():
            yield collate([self.dataset[k] if k is not None else filler for k in batch], self.dataset.pad_id)
