"""Tokenizer, datasets and per-rank batches: truncation, deterministic order, exact resume, sharding."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from helpers import REPO

from orchestrator.errors import TokenizerError
from orchestrator.spec.qa_format import QAExample, read_qa_file
from orchestrator.spec.schema import RunConfig
from worker.data import (
    IGNORE_INDEX,
    NO_LABEL,
    EvalBatches,
    QADataset,
    RankBatches,
    build_datasets,
    expert_label_vocab,
    make_splits,
    tokenizer_texts,
)
from worker.tokenizer import load_or_train_tokenizer, load_or_train_tokenizer_on_ranks

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SAMPLE = REPO / "configs" / "data" / "qa_sample.jsonl"


def config(**data: Any) -> RunConfig:
    return RunConfig.model_validate(
        {
            "name": "t",
            "model": {"name_or_path": "tiny"},
            "training": {"precision": "fp32", "seed": 7},
            "data": {"train_file": str(SAMPLE), **data},
        }
    )


def examples(n: int, label_every: int = 3) -> list[QAExample]:
    labels = ["arithmetic", "definition", None]
    return [QAExample(f"What is {i} plus 1?", str(i + 1), labels[i % label_every], i + 1) for i in range(n)]


@pytest.fixture(scope="module")
def sample() -> list[QAExample]:
    return read_qa_file(SAMPLE)


@pytest.fixture(scope="module")
def tokenizer(sample: list[QAExample]) -> PreTrainedTokenizerFast:
    return load_or_train_tokenizer(config(), tokenizer_texts(config(), sample), None)


def dataset(tokenizer: PreTrainedTokenizerFast, n: int) -> QADataset:
    exs = examples(n)
    return QADataset(config(), tokenizer, exs, expert_label_vocab(exs))


# ---------------------------------------------------------------- tokenizer


def test_bpe_tokenizer_has_the_configured_vocab_and_eos_as_pad(tokenizer: PreTrainedTokenizerFast) -> None:
    assert len(tokenizer) == config().model.tiny.vocab_size
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    text = "Question: What is the capital of Peru?\nAnswer: Lima ünïcode ✓"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_bpe_training_is_deterministic(sample: list[QAExample], tokenizer: PreTrainedTokenizerFast) -> None:
    again = load_or_train_tokenizer(config(), tokenizer_texts(config(), sample), None)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_saved_tokenizer_round_trips_and_wins_over_the_config(
    tmp_path: Path, sample: list[QAExample], tokenizer: PreTrainedTokenizerFast
) -> None:
    save_dir = tmp_path / "tokenizer"
    trained = load_or_train_tokenizer(config(), tokenizer_texts(config(), sample), save_dir)
    assert (save_dir / "tokenizer.json").is_file()
    # A different vocab size in the config must not matter: resume and export reuse the saved one.
    other = config()
    other.model.tiny.vocab_size = 300
    loaded = load_or_train_tokenizer(other, ["unrelated text"], save_dir, train_if_missing=False)
    texts = [ex.question + " " + ex.answer for ex in sample[:50]]
    assert loaded(texts)["input_ids"] == trained(texts)["input_ids"]
    assert loaded.get_vocab() == trained.get_vocab()
    assert (loaded.eos_token_id, loaded.pad_token_id) == (trained.eos_token_id, trained.pad_token_id)
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer"]  # no temporary folder left behind


def test_loading_without_a_saved_tokenizer_fails_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"no saved tokenizer in .*start or resume the run"):
        load_or_train_tokenizer(config(), ["x"], tmp_path / "tokenizer", train_if_missing=False)


def test_rank_zero_saves_and_other_ranks_load_after_the_barrier(tmp_path: Path) -> None:
    save_dir = tmp_path / "tokenizer"
    calls: list[str] = []

    def barrier() -> None:
        calls.append("barrier")

    texts = tokenizer_texts(config(), examples(40))
    main = load_or_train_tokenizer_on_ranks(config(), texts, save_dir, is_main=True, barrier=barrier)
    other = load_or_train_tokenizer_on_ranks(config(), [], save_dir, is_main=False, barrier=barrier)
    assert calls == ["barrier", "barrier"]
    assert other.get_vocab() == main.get_vocab()


def test_rank_zero_reaches_the_barrier_even_when_it_fails(tmp_path: Path) -> None:
    calls: list[str] = []
    with pytest.raises(TokenizerError, match="no text"):
        load_or_train_tokenizer_on_ranks(
            config(), [], tmp_path / "tok", is_main=True, barrier=lambda: calls.append("barrier")
        )
    assert calls == ["barrier"]


def test_tokenizer_trains_and_reloads_offline_in_a_fresh_process(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    # A fresh process (new hash seeds) with the hub switched off gives the identical tokenizer.
    script = (
        "import sys; from pathlib import Path\n"
        "from orchestrator.spec.schema import RunConfig\n"
        "from orchestrator.spec.qa_format import read_qa_file\n"
        "from worker.data import tokenizer_texts\n"
        "from worker.tokenizer import load_or_train_tokenizer\n"
        "cfg = RunConfig.model_validate(\n"
        "    {'name': 't', 'model': {'name_or_path': 'tiny'}, 'training': {'precision': 'fp32'}})\n"
        "texts = tokenizer_texts(cfg, read_qa_file(sys.argv[2]))\n"
        "load_or_train_tokenizer(cfg, texts, Path(sys.argv[1]))\n"
        "tok = load_or_train_tokenizer(cfg, [], Path(sys.argv[1]), train_if_missing=False)\n"
        "print(tok.backend_tokenizer.to_str())\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONHASHSEED": "123"}
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "tok"), str(SAMPLE)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(out.stdout) == json.loads(tokenizer.backend_tokenizer.to_str())


# ---------------------------------------------------------------- encoding and truncation


def test_item_is_prompt_then_answer_and_eos_with_loss_on_the_answer_only(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    cfg = config()
    ds = QADataset(cfg, tokenizer, [QAExample("What is 2 plus 2?", "4", "arithmetic", 1)], ["arithmetic"])
    item = ds[0]
    prompt = tokenizer("Question: What is 2 plus 2?\nAnswer:", add_special_tokens=False)["input_ids"]
    answer = tokenizer(" 4", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert item["input_ids"] == prompt + answer
    assert item["labels"] == [IGNORE_INDEX] * len(prompt) + answer
    assert item["expert_label_id"] == 0
    assert ds.num_truncated == 0


def test_truncation_keeps_the_answer_cuts_the_prompt_from_the_left_and_masks_it(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    cfg = config(max_seq_length=16, max_target_length=6)
    long_question = "Please tell me, after thinking about it for a long while, what is 2 plus 2?"
    long_answer = "four, which is also written as the digit 4 in most places"
    ds = QADataset(
        cfg,
        tokenizer,
        [QAExample(long_question, long_answer, None, 1), QAExample("Hi?", "yes", None, 2)],
        [],
    )
    item = ds[0]
    n_prompt = item["labels"].count(IGNORE_INDEX)
    answer = tokenizer(" " + long_answer, add_special_tokens=False)["input_ids"]
    prompt = tokenizer(f"Question: {long_question}\nAnswer:", add_special_tokens=False)["input_ids"]
    assert len(item["input_ids"]) == 16
    assert item["input_ids"][n_prompt:] == [*answer[:5], tokenizer.eos_token_id]  # answer kept, ends in eos
    assert item["labels"][n_prompt:] == item["input_ids"][n_prompt:]
    assert item["input_ids"][:n_prompt] == prompt[-n_prompt:]  # the prompt's end ("...Answer:") survives
    assert item["expert_label_id"] == NO_LABEL
    assert ds.num_truncated == 1


# ---------------------------------------------------------------- splits


def test_held_out_split_is_seeded_disjoint_and_sized_by_eval_fraction() -> None:
    exs = examples(100)
    train, evaluation = make_splits(config(eval_fraction=0.1), exs)
    assert len(evaluation) == 10 and len(train) == 90
    assert set(train).isdisjoint(evaluation) and set(train) | set(evaluation) == set(exs)
    assert make_splits(config(eval_fraction=0.1), exs) == (train, evaluation)
    other = config(eval_fraction=0.1)
    other.training.seed = 8
    assert make_splits(other, exs)[1] != evaluation
    assert len(make_splits(config(eval_fraction=0.001), exs)[1]) == 1  # at least one
    assert make_splits(config(eval_fraction=0.0), exs) == (exs, [])


def test_eval_file_replaces_the_held_out_split(tmp_path: Path) -> None:
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(json.dumps({"question": "q", "answer": "a", "expert_label": "new_label"}) + "\n")
    exs = examples(20)
    train, evaluation = make_splits(config(eval_file=str(eval_file)), exs)
    assert train == exs and [e.answer for e in evaluation] == ["a"]


def test_label_vocabulary_is_sorted_and_shared_by_both_splits(tokenizer: PreTrainedTokenizerFast) -> None:
    train = examples(6)
    evaluation = [QAExample("q", "a", "unit_conversion", 1)]
    train_ds, eval_ds = build_datasets(config(), tokenizer, train, evaluation)
    assert train_ds.label_vocab == eval_ds.label_vocab == ["arithmetic", "definition", "unit_conversion"]
    assert [item["expert_label_id"] for item in train_ds.items] == [0, 1, -1, 0, 1, -1]
    assert eval_ds[0]["expert_label_id"] == 2


# ---------------------------------------------------------------- training batches


def test_micro_batch_is_padded_to_its_longest_sequence(tokenizer: PreTrainedTokenizerFast) -> None:
    exs = [QAExample("Hi?", "yes", "a", 1), QAExample("A much longer question?", "no", None, 2)]
    ds = QADataset(config(), tokenizer, exs, ["a"])
    batches = RankBatches(ds, micro_batch_size=2, dp_rank=0, dp_size=1, seed=0)
    batch = next(batches.iterate(0))
    lengths = sorted(len(item["input_ids"]) for item in ds.items)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, lengths[1])
    assert sorted(batch["attention_mask"].sum(dim=1).tolist()) == lengths
    pad = batch["attention_mask"] == 0
    assert (batch["input_ids"][pad] == tokenizer.pad_token_id).all()
    assert (batch["labels"][pad] == IGNORE_INDEX).all()
    assert sorted(batch["expert_label_ids"].tolist()) == [-1, 0]


def test_epoch_order_depends_only_on_seed_and_epoch(tokenizer: PreTrainedTokenizerFast) -> None:
    import torch

    ds = dataset(tokenizer, 30)
    rank0 = RankBatches(ds, 2, dp_rank=0, dp_size=2, seed=5)
    torch.manual_seed(1234)  # the global RNG must not matter
    rank1 = RankBatches(ds, 2, dp_rank=1, dp_size=2, seed=5)
    assert rank0.epoch_order(3) == rank1.epoch_order(3)
    assert sorted(rank0.epoch_order(3)) == list(range(30))
    assert rank0.epoch_order(3) != rank0.epoch_order(4)
    assert RankBatches(ds, 2, 0, 2, seed=6).epoch_order(3) != rank0.epoch_order(3)


def test_rank_shards_are_disjoint_equal_sized_and_cover_the_kept_examples(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    ds = dataset(tokenizer, 23)  # mbs 2, 3 ranks: 11 full micro-batches, 9 kept (3 per rank)
    ranks = [RankBatches(ds, 2, dp_rank=r, dp_size=3, seed=1) for r in range(3)]
    assert [r.micro_batches_per_epoch() for r in ranks] == [3, 3, 3]
    shards = [[i for batch in r.indices(epoch=0) for i in batch] for r in ranks]
    assert all(len(s) == 6 for s in shards)
    assert sum(len(set(s)) for s in shards) == len(set().union(*shards)) == 18
    kept = set(ranks[0].epoch_order(0)[:18])  # the tail of the global order is what is dropped
    assert set().union(*shards) == kept
    assert [len(list(r.iterate(0))) for r in ranks] == [3, 3, 3]


def test_start_resumes_the_exact_sequence(tokenizer: PreTrainedTokenizerFast) -> None:
    ds = dataset(tokenizer, 40)
    batches = RankBatches(ds, 3, dp_rank=1, dp_size=2, seed=9)
    full = list(batches.iterate(epoch=2))
    resumed = list(RankBatches(ds, 3, dp_rank=1, dp_size=2, seed=9).iterate(epoch=2, start=4))
    assert len(full) == 6 and len(resumed) == 2
    for a, b in zip(full[4:], resumed, strict=True):
        assert a.keys() == b.keys()
        assert all(a[key].equal(b[key]) for key in a)


def test_too_little_data_for_one_micro_batch_per_rank_is_a_config_error(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    from orchestrator.errors import ConfigError

    with pytest.raises(ConfigError, match="lower micro_batch_size"):
        RankBatches(dataset(tokenizer, 5), micro_batch_size=2, dp_rank=0, dp_size=3, seed=0)


# ---------------------------------------------------------------- eval batches


def test_eval_batches_are_equal_per_rank_and_see_every_example_once(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    ds = dataset(tokenizer, 7)  # mbs 2, 3 ranks: 4 real micro-batches -> 2 per rank, 5 filler slots
    ranks = [EvalBatches(ds, 2, dp_rank=r, dp_size=3) for r in range(3)]
    per_rank = [list(r) for r in ranks]
    assert [len(batches) for batches in per_rank] == [2, 2, 2]
    assert [r.num_micro_batches() for r in ranks] == [2, 2, 2]
    real = [k for r in ranks for batch in r.indices() for k in batch if k is not None]
    assert sorted(real) == list(range(7))
    # Filler rows add nothing to the loss: the real answer tokens equal the dataset's, no more.
    answer_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for batches in per_rank for b in batches)
    assert answer_tokens == sum(sum(label != IGNORE_INDEX for label in item["labels"]) for item in ds.items)
    fillers = per_rank[2][1]  # global micro-batch 5: slots 10, 11 are both filler
    assert (fillers["labels"] == IGNORE_INDEX).all()
    assert fillers["expert_label_ids"].tolist() == [NO_LABEL, NO_LABEL]


def test_empty_eval_split_gives_no_batches_on_any_rank(tokenizer: PreTrainedTokenizerFast) -> None:
    ds = QADataset(config(), tokenizer, [], [])
    assert [list(EvalBatches(ds, 2, r, 2)) for r in range(2)] == [[], []]


# ---------------------------------------------------------------- the shipped sample


def test_sample_file_has_300_lines_three_answer_forms_and_four_labels() -> None:
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]
    assert len(rows) >= 300
    forms = Counter(type(row["answer"]).__name__ for row in rows)
    assert set(forms) == {"str", "list", "dict"}
    labels = Counter(row["expert_label"] for row in rows)
    assert len(labels) >= 4 and min(labels.values()) >= 30


def test_sample_file_matches_its_generator() -> None:
    spec = importlib.util.spec_from_file_location("make_sample_data", REPO / "tools" / "make_sample_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.build() == SAMPLE.read_text(), "run: python tools/make_sample_data.py"


def test_sample_fits_max_seq_length_64_without_truncation(
    sample: list[QAExample], tokenizer: PreTrainedTokenizerFast
) -> None:
    cfg = config(max_seq_length=64, max_target_length=32)
    ds = QADataset(cfg, tokenizer, sample, expert_label_vocab(sample))
    assert ds.num_truncated == 0
