"""Hugging Face export: a DeepSpeed checkpoint -> a folder `from_pretrained` loads without moe-orch.

Runs offline in one process. It reads the checkpoint files every rank wrote (docs/deepspeed-cpu.md,
"Checkpoint layout"):
    mp_rank_00_model_states.pt                       non-expert weights under "module"
    layer_{L}_expert_{E}_mp_rank_00_model_states.pt  global expert E of the L-th MoE layer, written
                                                     by the rank that owned it
Reading every expert file is what gathers the experts of all EP ranks. Names are mapped onto
`worker/hf_moe/modeling_mpt_moe.py` and loaded with `strict=True`, so a missing or extra tensor
fails the export instead of leaving random weights behind.

An MoE run gives `model_type: mpt_moe` with `auto_map` to the copied modeling files
(`trust_remote_code=True`); a dense run (`moe.enabled: false`) gives a plain MPT folder.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, cast

import torch

from orchestrator.errors import CheckpointError, ExportError
from orchestrator.rundir.checkpoints import EXPERT_FILE_RE, MODEL_STATES, choose_checkpoint
from orchestrator.spec.schema import RunConfig

logger = logging.getLogger(__name__)

_BLOCK_RE = re.compile(r"^transformer\.blocks\.(\d+)\.")
# DeepSpeed's MoE (and the dropless layer) nest the FFN's parameters; the HF model does not.
_GATE_RE = re.compile(r"^(transformer\.blocks\.\d+\.ffn)\.moe\.(?:deepspeed_moe\.)?gate\.wg\.weight$")
_EXPERT_RE = re.compile(
    r"^(transformer\.blocks\.\d+\.ffn)\.moe\.(?:deepspeed_moe\.)?experts\.(?:deepspeed_experts\.)?(\d+)\.(.+)$"
)


EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""`training.precision` -> the dtype of every floating-point tensor of the export."""


def _load(path: Path) -> Any:
    # NOTE: DeepSpeed's files hold its config and client state besides tensors; they are our own
    # run's files, so the full unpickler is acceptable here.
    return torch.load(path, map_location="cpu", weights_only=False)


def hf_key(ds_key: str) -> str:
    """DeepSpeed module name -> `MptMoeForCausalLM` name (non-MoE names are unchanged)."""
    if m := _GATE_RE.match(ds_key):
        return f"{m.group(1)}.gate.wg.weight"
    if m := _EXPERT_RE.match(ds_key):
        return f"{m.group(1)}.experts.{m.group(2)}.{m.group(3)}"
    return ds_key


def read_checkpoint_state(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Every weight of a checkpoint under DeepSpeed's module names, experts of all ranks included."""
    states = ckpt_dir / MODEL_STATES
    if not states.is_file():
        raise ExportError(
            f"{ckpt_dir} is not a DeepSpeed checkpoint folder: {MODEL_STATES} is missing "
            "(pass the folder of one tag, e.g. <run>/checkpoints/step-000100)"
        )
    blob = _load(states)
    module = blob.get("module") if isinstance(blob, dict) else None
    if not isinstance(module, dict):
        raise ExportError(f"{states} has no 'module' weights; was it written by engine.save_checkpoint?")
    state: dict[str, torch.Tensor] = {k: v for k, v in module.items() if isinstance(v, torch.Tensor)}
    expert_files = sorted(
        (int(m.group(1)), int(m.group(2)), p)
        for p in ckpt_dir.iterdir()
        if (m := EXPERT_FILE_RE.match(p.name))
    )
    for _layer, _expert, path in expert_files:
        part = _load(path)
        if not isinstance(part, dict):
            raise ExportError(f"{path} does not hold a state dict")
        for key, value in part.items():
            if key in state:
                raise ExportError(f"{path}: tensor {key} is also in another checkpoint file")
            state[key] = value
    logger.info("read %s and %d expert files (%d tensors)", states.name, len(expert_files), len(state))
    return state


def _check_expert_files(ckpt_dir: Path, num_moe_layers: int, num_experts: int) -> None:
    found = {
        (int(m.group(1)), int(m.group(2))) for p in ckpt_dir.iterdir() if (m := EXPERT_FILE_RE.match(p.name))
    }
    if not found:
        return  # a dropless checkpoint from before issue 14 keeps its experts in the module states
    missing = [
        f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt"
        for layer in range(num_moe_layers)
        for e in range(num_experts)
        if (layer, e) not in found
    ]
    if missing:
        raise ExportError(
            f"{ckpt_dir} lacks {len(missing)} expert file(s), e.g. {missing[0]}: every EP rank must have "
            "finished its save; export an older checkpoint (--checkpoint TAG)"
        )


def _hf_config(run_config: RunConfig, state: dict[str, torch.Tensor], moe_blocks: list[int]) -> Any:
    from worker.model import dense_config

    vocab_size = int(state["transformer.wte.weight"].shape[0])
    try:
        base = dense_config(run_config, vocab_size)
    except OSError as exc:
        name = run_config.model.name_or_path
        raise ExportError(
            f"cannot read the base model's config from {name!r} ({exc}); export where the hub (or its "
            "cache, HF_HOME) is reachable, as during training"
        ) from None
    base.use_cache = True
    if not moe_blocks:
        return base
    from worker.hf_moe import AUTO_MAP
    from worker.hf_moe.configuration_mpt_moe import MptMoeConfig

    fields = {
        k: v
        for k, v in base.to_dict().items()
        if k not in ("model_type", "transformers_version", "architectures", "auto_map")
    }
    config = MptMoeConfig(
        **fields,
        num_experts=run_config.moe.num_experts,
        num_experts_per_tok=run_config.moe.top_k,
        moe_layers=moe_blocks,
    )
    config.auto_map = dict(AUTO_MAP)
    if run_config.moe.label_routing.weight > 0:
        config.label_routing = _label_routing_record(run_config)  # for reference: the router is plain
    return config


def _label_routing_record(run_config: RunConfig) -> dict[str, Any]:
    """`{"weight", "experts": {label: [expert ids]}}`: what the label-routing loss pulled toward,
    resolved against the run's data as the worker resolved it (`auto` when the data is gone)."""
    from orchestrator.errors import ConfigError
    from worker.data import expert_label_vocab, make_splits, read_train_examples

    lr = run_config.moe.label_routing
    try:
        train, evaluation = make_splits(run_config, read_train_examples(run_config))
    except (OSError, ConfigError) as exc:
        logger.warning("label routing: cannot read the run's data (%s); recording the config's setting", exc)
        return {"weight": lr.weight, "experts": lr.experts}
    labels = expert_label_vocab([*train, *evaluation])
    return {"weight": lr.weight, "experts": lr.assignment(labels, run_config.moe.num_experts)}


def _build_model(config: Any, state: dict[str, torch.Tensor], moe: bool) -> Any:
    from transformers import MptForCausalLM

    from worker.hf_moe.modeling_mpt_moe import MptMoeForCausalLM

    cls = MptMoeForCausalLM if moe else MptForCausalLM
    dtype = state["transformer.wte.weight"].dtype
    with torch.device("meta"):
        model = cls(config)
    result = model.load_state_dict(state, strict=False, assign=True)
    # NOTE: strict by hand, to name the tensors in the error; tied lm_head may be absent on disk.
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]
    if missing or result.unexpected_keys:
        raise ExportError(
            f"the checkpoint does not match the {cls.__name__} layout: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}; was it trained with this run's config?"
        )
    model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ExportError(f"export left tensors without weights: {left[:5]}")
    model.config.dtype = dtype
    model.train(False)
    return model


def _prepare_out_dir(out_dir: Path) -> Path:
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
        raise ExportError(
            f"{out_dir} exists and is not an earlier export (no config.json); choose an empty or new --out"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))


def _make_readable(folder: Path) -> None:
    # NOTE: mkdtemp (and some writers) create 0700/0600; an export is meant to be shared.
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def export_checkpoint(ckpt_dir: Path, run_config: RunConfig, tokenizer_dir: Path, out_dir: Path) -> Path:
    """Write a Hugging Face folder for the DeepSpeed checkpoint `ckpt_dir`; returns `out_dir`.

    The folder is written beside `out_dir` and renamed into place, so `out_dir` is never half
    written; an earlier export there is replaced.
    """
    from transformers import AutoTokenizer, GenerationConfig

    from worker.hf_moe import HF_MOE_DIR, MODEL_FILES
    from worker.tokenizer import write_tokenizer

    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    raw = read_checkpoint_state(ckpt_dir)
    moe_blocks = sorted({int(_BLOCK_RE.match(k).group(1)) for k in raw if _GATE_RE.match(k)})  # type: ignore[union-attr]
    if bool(moe_blocks) != run_config.moe.enabled:
        raise ExportError(
            f"run config says moe.enabled: {str(run_config.moe.enabled).lower()} but the checkpoint "
            f"{'has' if moe_blocks else 'has no'} MoE layers; export it with the run's own run.yaml"
        )
    if moe_blocks:
        _check_expert_files(ckpt_dir, len(moe_blocks), run_config.moe.num_experts)
    # NOTE: DeepSpeed saves the module in the training precision already (bf16 weights, the fp32
    # master copy stays in the optimizer files); the cast makes the rule explicit for every tensor.
    dtype = EXPORT_DTYPES[run_config.training.precision]
    state = {hf_key(k): v.to(dtype) if v.is_floating_point() else v for k, v in raw.items()}
    config = _hf_config(run_config, state, moe_blocks)
    model = _build_model(config, state, moe=bool(moe_blocks))

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot load the run's tokenizer from {tokenizer_dir}: {exc}") from None
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            setattr(model.config, name, value)
    generation = cast(Any, GenerationConfig)(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        max_new_tokens=run_config.data.max_target_length,
        do_sample=False,
        use_cache=True,
    )
    model.generation_config = generation

    tmp = _prepare_out_dir(out_dir)
    try:
        model.save_pretrained(str(tmp))
        write_tokenizer(tokenizer, tmp)
        if moe_blocks:
            for name in MODEL_FILES:
                shutil.copy2(HF_MOE_DIR / name, tmp / name)
        _make_readable(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "exported %s (%s, %d parameters, MoE blocks %s) to %s",
        ckpt_dir.name,
        model.config.model_type,
        n_params,
        moe_blocks,
        out_dir,
    )
    return out_dir


def export_run(run_dir: Path, out_dir: Path | None = None, tag: str | None = None) -> Path:
    """Export a run's checkpoint `tag` (default: the newest valid one) to `out_dir` (default
    `<run_dir>/export`), using the run's own `run.yaml` and `tokenizer/`."""
    from orchestrator.spec.loading import load_resolved

    run_dir = Path(run_dir)
    run_yaml = run_dir / "run.yaml"
    if not run_yaml.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory: run.yaml is missing")
    cfg = load_resolved(run_yaml)
    ckpt = choose_checkpoint(run_dir, tag, "export")
    tokenizer_dir = run_dir / "tokenizer"
    if not tokenizer_dir.is_dir():
        raise ExportError(f"run {run_dir.name} has no tokenizer/ folder; it is written when training starts")
    return export_checkpoint(ckpt, cfg, tokenizer_dir, out_dir if out_dir is not None else run_dir / "export")
