"""The tokenizer a run uses: the model's own, a named one, or an offline byte-level BPE.

Contract:
- `load_or_train_tokenizer(cfg, texts, save_dir)` returns a `PreTrainedTokenizerFast` with an eos
  and a pad token (pad = eos when the tokenizer has none).
- When `save_dir` (the run's `tokenizer/` folder) already holds a tokenizer, that one is loaded,
  whatever the config says: a resumed run and `export` use exactly the tokenizer training started
  with. Otherwise the tokenizer is obtained and saved there (atomically: a folder that exists is
  complete).
- Which tokenizer: `data.tokenizer` unset -> the model's own (`model.name_or_path`, `revision`,
  `trust_remote_code`), except for `tiny`, which has none and gets the BPE; `bpe` -> the BPE;
  anything else -> that hub id or folder.
- The BPE is byte-level (no unknown tokens), trained on `texts` to `model.tiny.vocab_size` with
  `<|endoftext|>` as eos and pad; it is deterministic, so the same texts give the same vocab.
- Several ranks: `load_or_train_tokenizer_on_ranks` lets rank 0 train and save while the others
  wait at a barrier, then load what it saved.
- Saved folders (the run's `tokenizer/` and the export, `write_tokenizer`) hold `tokenizer.json`
  and a `tokenizer_config.json` that names its class: transformers 5 writes its generic
  `TokenizersBackend`, which transformers 4 cannot load, so that one is saved as
  `PreTrainedTokenizerFast` (the same class in 5). A named class lets transformers 4's
  `AutoTokenizer` skip `config.json`, so an MoE export's tokenizer loads without remote code.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.errors import TokenizerError
from orchestrator.rundir.access import current_umask
from orchestrator.spec.schema import RunConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
SAVED_MARKER = "tokenizer_config.json"
PLAIN_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
# transformers 5's name for a tokenizer defined by tokenizer.json alone; transformers 4 has no such class.
_GENERIC_TOKENIZER_CLASSES = frozenset({"TokenizersBackend"})


def has_saved_tokenizer(save_dir: Path | None) -> bool:
    return save_dir is not None and (save_dir / SAVED_MARKER).is_file()


def uses_offline_bpe(cfg: RunConfig) -> bool:
    """Whether the config asks for the BPE trained on the data (tiny models, or `data.tokenizer: bpe`)."""
    tok = cfg.data.tokenizer
    return tok == "bpe" or (tok is None and cfg.model.is_tiny)


def train_bpe_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts`; deterministic (same texts, same vocab and merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not texts:
        raise TokenizerError("cannot train the BPE tokenizer on no text: the training data is empty")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        # NOTE: the full byte alphabet makes every byte encodable even if the data never shows it.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=bpe, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )
    logger.info("trained a byte-level BPE tokenizer: %d tokens on %d texts", len(tokenizer), len(texts))
    return tokenizer


def _load_pretrained(name: str, revision: str | None, trust_remote_code: bool) -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise TokenizerError(
            f"tokenizer {name!r} has no fast (Rust) version; set data.tokenizer to one that has, or to bpe"
        )
    return tokenizer


def _ensure_pad(tokenizer: PreTrainedTokenizerFast, source: str) -> PreTrainedTokenizerFast:
    if tokenizer.eos_token is None:
        raise TokenizerError(
            f"tokenizer {source} has no eos token, so answers cannot end; set data.tokenizer to one "
            "that has (e.g. the model's own), or to bpe"
        )
    if tokenizer.pad_token is None:
        # NOTE: padding is masked out (attention_mask 0, labels -100), so reusing eos is harmless.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def write_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """`save_pretrained` into `folder`, with `tokenizer_config.json` naming a class that every
    transformers version loads (see the module docstring)."""
    tokenizer.save_pretrained(str(folder))
    config_file = folder / SAVED_MARKER
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") in (None, *_GENERIC_TOKENIZER_CLASSES):
        config["tokenizer_class"] = PLAIN_TOKENIZER_CLASS
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, save_dir: Path) -> None:
    """Save into `save_dir` atomically: written beside it, then renamed into place."""
    save_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{save_dir.name}.tmp-", dir=save_dir.parent))
    tmp.chmod(0o777 & ~current_umask())  # NOTE: not mkdtemp's 0700: a run shared with the group
    try:
        write_tokenizer(tokenizer, tmp)
        if save_dir.is_dir() and not any(save_dir.iterdir()):
            save_dir.rmdir()
        os.replace(tmp, save_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved the tokenizer to %s", save_dir)


def load_or_train_tokenizer(
    cfg: RunConfig,
    texts: list[str],
    save_dir: Path | None,
    *,
    train_if_missing: bool = True,
) -> PreTrainedTokenizerFast:
    """The run's tokenizer (see the module docstring); saved into `save_dir` when it is new.

    `train_if_missing=False` (export, ranks other than 0) refuses to obtain a new tokenizer when
    `save_dir` should hold one and does not.
    """
    if save_dir is not None and has_saved_tokenizer(save_dir):
        logger.info("loading the run's tokenizer from %s", save_dir)
        return _ensure_pad(_load_pretrained(str(save_dir), None, False), str(save_dir))
    if not train_if_missing:
        raise TokenizerError(
            f"no saved tokenizer in {save_dir}: rank 0 writes it when training starts (if it failed, "
            "rank 0's log says why); start or resume the run first, or restore that folder"
        )
    if uses_offline_bpe(cfg):
        tokenizer = train_bpe_tokenizer(texts, cfg.model.tiny.vocab_size)
        source = "bpe"
    elif cfg.data.tokenizer is None:
        m = cfg.model
        tokenizer = _load_pretrained(m.name_or_path, m.revision, m.trust_remote_code)
        source = m.name_or_path
    else:
        tokenizer = _load_pretrained(cfg.data.tokenizer, None, cfg.model.trust_remote_code)
        source = cfg.data.tokenizer
    tokenizer = _ensure_pad(tokenizer, source)
    if save_dir is not None:
        save_tokenizer(tokenizer, save_dir)
    return tokenizer


def load_or_train_tokenizer_on_ranks(
    cfg: RunConfig,
    texts: list[str],
    save_dir: Path,
    *,
    is_main: bool,
    barrier: Callable[[], None],
) -> PreTrainedTokenizerFast:
    """Rank 0 obtains (trains) and saves the tokenizer; every other rank waits, then loads it.

    `barrier` must be called by every rank (e.g. `torch.distributed.barrier`); `save_dir` must be on
    a filesystem all ranks see (the run directory). Rank 0 reaches the barrier even when it fails,
    so the other ranks fail with a clear error instead of hanging.
    """
    if is_main:
        try:
            tokenizer = load_or_train_tokenizer(cfg, texts, save_dir)
        finally:
            barrier()
        return tokenizer
    barrier()
    return load_or_train_tokenizer(cfg, texts, save_dir, train_if_missing=False)
