"""The bf16 path end to end, shared by the CPU tests (test_bf16_cpu.py: `training.bf16_on_cpu`, gloo)
and the GPU tests (test_gpu.py: NCCL, one rank per GPU): the same runs, the same checks.

Three launches of `torchrun -m worker` on configs/tiny-cpu.yaml in bf16, plus one to read logits:
- `uninterrupted`: STEPS optimizer steps, a checkpoint every SAVE_EVERY, the export at the end;
- `resumed`: the same config, crashed (MOE_ORCH_FAULT) after CRASH_AT, then started again: it
  resumes from the checkpoint at RESUMED_FROM and must follow the uninterrupted run to the bit;
- `engine_logits`: the worker's own setup loads the final checkpoint into a DeepSpeed engine (every
  rank) and rank 0 writes its eval logits on a fixed batch, to hold the export against.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers import REPO, free_port

from orchestrator.rundir.reports import read_metrics

TINY = REPO / "configs" / "tiny-cpu.yaml"
STEPS = 40
SAVE_EVERY = 10
CRASH_AT = 25
RESUMED_FROM = 20
LEARNED = 0.8
"""The final eval loss is at most this share of the step-0 one (measured on CPU: 6.24 -> 4.37 in
40 steps, 70%)."""


def bf16_sets(gpus: int) -> list[str]:
    """The run's overrides: bf16 everywhere; on CPU the test switch, on GPUs one rank per GPU."""
    sets = [
        "training.precision=bf16", f"training.max_steps={STEPS}", f"training.save_steps={SAVE_EVERY}",
        "training.logging_steps=1", f"training.eval_steps={SAVE_EVERY}", "training.export_on_finish=true",
        "training.keep_checkpoints=null",
    ]  # fmt: skip
    if gpus == 0:
        return [*sets, "training.bf16_on_cpu=true"]
    return [*sets, f"cluster.gpus_per_node={gpus}", f"cluster.tasks_per_node={gpus}", f"moe.ep_size={gpus}"]


def ranks(gpus: int) -> int:
    return gpus if gpus else 2


def run_env(fault: str | None = None, gpus: int = 0) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env.pop("MOE_ORCH_FAULT", None)
    if gpus == 0:
        env["DS_ACCELERATOR"] = "cpu"
    else:
        env.pop("DS_ACCELERATOR", None)
    if fault:
        env["MOE_ORCH_FAULT"] = fault
    return env


def torchrun(nproc: int, args: Sequence[str], env: dict[str, str], log: Path) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), *args]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    log.write_text(proc.stdout + proc.stderr)
    return proc.returncode


def launch(run_dir: Path, gpus: int, fault: str | None = None) -> int:
    args = ["-m", "worker", "--config", str(TINY), "--run-dir", str(run_dir)]
    for item in bf16_sets(gpus):
        args += ["--set", item]
    log = run_dir.parent / f"{run_dir.name}-{fault or 'run'}.log"
    return torchrun(ranks(gpus), args, run_env(fault, gpus), log)


# Every rank: the worker's own setup, resumed from the newest checkpoint; rank 0 writes the logits.
LOGITS_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    import torch
    import torch.distributed as dist
    from orchestrator.spec.loading import load_resolved
    from worker.dist import init_distributed, resolve_dist
    from worker.setup import resume_from_checkpoint, setup_trainer
    from worker.signals import Faults, SignalState

    run_dir = Path(sys.argv[1])
    cfg = load_resolved(run_dir / "run.yaml")
    info = resolve_dist(os.environ)
    init_distributed(info, num_threads=1, use_gpu=cfg.cluster.gpus_per_node > 0)
    trainer = setup_trainer(cfg, run_dir, info, SignalState(), Faults())
    tag, step = resume_from_checkpoint(trainer)
    engine = trainer.engine
    engine.eval()
    vocab = int(engine.module.config.vocab_size)
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ids_on, mask_on = ids.to(engine.device), torch.ones_like(ids).to(engine.device)
        logits = engine(input_ids=ids_on, attention_mask=mask_on).logits
    if info.rank == 0:
        out = {"ids": ids, "logits": logits.float().cpu(), "tag": tag, "dtype": str(logits.dtype),
               "device": str(engine.device)}
        torch.save(out, run_dir / "engine_logits.pt")
    dist.barrier()
    dist.destroy_process_group()
    """
)


def write_engine_logits(run_dir: Path, gpus: int) -> Path:
    script = run_dir.parent / "engine_logits.py"
    script.write_text(LOGITS_SCRIPT)
    log = run_dir.parent / "logits.log"
    code = torchrun(ranks(gpus), [str(script), str(run_dir)], run_env(None, gpus), log)
    assert code == 0, log.read_text()[-4000:]
    return run_dir / "engine_logits.pt"


@dataclass(frozen=True)
class Runs:
    uninterrupted: Path
    resumed: Path
    engine_logits: Path
    gpus: int


def run_all(root: Path, gpus: int) -> Runs:
    """The three runs and the logits (see the module docstring)."""
    a, b = root / "uninterrupted", root / "resumed"
    assert launch(a, gpus) == 0, (root / "uninterrupted-run.log").read_text()[-4000:]
    assert launch(b, gpus, fault=f"crash_at_step:{CRASH_AT}") != 0
    assert launch(b, gpus) == 0, (root / "resumed-run.log").read_text()[-4000:]
    return Runs(a, b, write_engine_logits(a, gpus), gpus)


# --- readers -------------------------------------------------------------------------------------
def losses(run_dir: Path) -> dict[int, float]:
    """Training loss per step (the last line wins: a resumed run logs redone steps again)."""
    return {int(r["step"]): r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def evals(run_dir: Path) -> dict[int, float]:
    return {int(r["step"]): r["eval_loss"] for r in read_metrics(run_dir) if "eval_loss" in r}


def start_events(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "start"]


def checkpoint_state(ckpt: Path) -> dict[str, Any]:
    """Every tensor a checkpoint holds: the module, the experts and the optimizer (fp32 master
    weights and Adam's moments), by file and key."""
    import torch

    out: dict[str, Any] = {}
    for path in sorted(ckpt.glob("*.pt")):
        state = torch.load(path, map_location="cpu", weights_only=False)
        if "module" in state:
            out[f"{path.name}:module"] = state["module"]
        elif "optimizer_state_dict" in state:
            out[f"{path.name}:optimizer"] = state["optimizer_state_dict"]
        else:
            out[path.name] = state
    return out


def tensors(tree: Any, where: str = "") -> dict[str, Any]:
    """The tensors of a nested state, by path."""
    import torch

    if isinstance(tree, torch.Tensor):
        return {where: tree}
    found: dict[str, Any] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            found.update(tensors(value, f"{where}/{key}"))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            found.update(tensors(value, f"{where}[{i}]"))
    return found


def export_dtypes(export: Path) -> dict[str, str]:
    """The dtype of every tensor of an export's safetensors files."""
    from safetensors import safe_open

    dtypes: dict[str, str] = {}
    for path in sorted(export.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                dtypes[key] = str(f.get_tensor(key).dtype)
    return dtypes


def export_logits(export: Path, ids: Any, device: str) -> Any:
    """The export's logits on `ids`, loaded as its config says (its own modeling file's class)."""
    import torch

    from worker.hf_moe.modeling_mpt_moe import MptMoeForCausalLM

    # NOTE: no dtype argument (transformers 4 calls it torch_dtype, 5 dtype); the weights are bf16 on
    # disk, so a cast after an fp32 load gives the same values.
    loaded: Any = MptMoeForCausalLM.from_pretrained(str(export))
    model = loaded.to(device=device, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        out = model(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device))
    return out.logits.float().cpu()


# --- the checks, the same on CPU and GPU ----------------------------------------------------------
def check_learns(runs: Runs) -> None:
    ev = evals(runs.uninterrupted)
    assert sorted(ev) == list(range(0, STEPS + 1, SAVE_EVERY))
    assert ev[STEPS] <= LEARNED * ev[0], ev
    loss = losses(runs.uninterrupted)
    assert sorted(loss) == list(range(1, STEPS + 1))
    assert all(v == v and v < 20 for v in loss.values())  # finite: no NaN, no blow-up


def check_checkpoints_hold_bf16_weights_and_fp32_master_weights(runs: Runs) -> None:
    import torch

    state = checkpoint_state(runs.uninterrupted / "checkpoints" / f"step-{STEPS:06d}")
    weights = {k: v for k, v in tensors(state).items() if ":module" in k or "expert" in k}
    assert weights and {v.dtype for v in weights.values()} == {torch.bfloat16}
    optim = {k: v for k, v in tensors(state).items() if ":optimizer" in k and v.is_floating_point()}
    assert optim and {v.dtype for v in optim.values()} == {torch.float32}  # master copy and moments


def check_resume_is_bitwise(runs: Runs) -> None:
    import torch

    start = start_events(runs.resumed)[-1]
    assert (start["resumed_from"], start["resumed_step"]) == (f"step-{RESUMED_FROM:06d}", RESUMED_FROM)
    ref, got = losses(runs.uninterrupted), losses(runs.resumed)
    redone = range(RESUMED_FROM + 1, STEPS + 1)
    assert [got[s] for s in redone] == [ref[s] for s in redone]
    assert evals(runs.resumed)[STEPS] == evals(runs.uninterrupted)[STEPS]
    final = f"checkpoints/step-{STEPS:06d}"
    a = tensors(checkpoint_state(runs.uninterrupted / final))
    b = tensors(checkpoint_state(runs.resumed / final))
    assert sorted(a) == sorted(b)
    differ = [k for k in a if not (a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]))]
    assert not differ, f"{len(differ)} tensors differ after the resume, e.g. {differ[:3]}"


def check_export(runs: Runs) -> None:
    import torch

    export = runs.uninterrupted / "export"
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "mpt_moe"
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    dtypes = export_dtypes(export)
    assert dtypes and set(dtypes.values()) == {"torch.bfloat16"}, dtypes
    expected = torch.load(runs.engine_logits, weights_only=False)
    assert expected["tag"] == f"step-{STEPS:06d}" and expected["dtype"] == "torch.bfloat16"
    device = "cuda" if runs.gpus else "cpu"
    assert expected["device"].split(":")[0] == device  # the engine ran where the config said
    got = export_logits(export, expected["ids"], device)
    want = expected["logits"]
    # bf16 keeps 8 bits of mantissa: the two forwards may round differently op by op.
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 0.02 * scale + 0.05, (float((got - want).abs().max()), scale)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.8  # bf16 ties may flip a few
