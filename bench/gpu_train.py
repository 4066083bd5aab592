"""GPU training throughput: a ~1B-parameter MoE (dropless, stock DeepSpeed MoE) against its dense parent.

    bash bench/gpu.sh                          # on the H200 machine (installs the wheels, runs this)
    python -m bench.gpu_train --dry            # the same code on CPU, tiny shape, fp32 (CI)

One GPU, bf16, ZeRO-2, ep_size 1, torch's fused AdamW, built exactly as the worker builds it
(`worker.model.build_model`, `build_optimizer`, `moe_aux_loss`,
`orchestrator.spec.deepspeed.deepspeed_config`). Batches are random token ids. Each variant runs in its own
process (a fresh CUDA context and process group); per variant, after warm-up steps, the median
wall time of a training step (forward, backward, optimizer; `torch.cuda.synchronize` around it),
tokens/s and MFU against the H200's 989 TFLOP/s dense bf16 peak, peak GPU memory.

Variants (all the same shape; MoE: 8 experts, top-2, every block):
- `dense`: the parent MPT (the baseline of every ratio);
- `stock`: `deepspeed.moe.layer.MoE` as the worker builds it (capacity_factor 1.0, drop_tokens:
  it drops tokens over capacity, so it executes fewer expert FLOPs than it is credited with);
- `dropless`: `worker.moe_dropless.DroplessMoE` (no token dropped).
MFU uses model FLOPs per token = 6 x (matmul parameters a token passes through: attention, the
k routed experts' FFNs, the router, the tied LM head) + 12 x layers x d_model x seq (attention
scores), the PaLM convention; the same nominal count for stock and dropless.

Then, for `dense` and `dropless` (`--ckpt-variants`; stock's checkpoint is about dropless's size), the
worker's checkpoint paths on the trained engine, whose state lives on the GPU (so every save
includes the device->host copy), in a run dir under `$TMPDIR` (or /tmp), deleted afterwards;
`--ckpt-repeats` times (1 on the GPU, 2 in `--dry`):
- `gpu checkpoint save <variant>`: `worker.checkpoint.save_checkpoint` (hashes while writing,
  fsyncs, manifest, rename), MB/s against `dd if=/dev/zero bs=1M count=<same MiB> conv=fsync` into
  the same run dir (`bench.checkpoint`'s helper), run after the checkpoint is deleted;
- `gpu checkpoint async stall <variant>`: `worker.checkpoint.start_background_save`
  (`training.async_save`): the time until training could go on (the call: the snapshot into CPU
  buffers, fresh ones in a run's first background save) against the synchronous save; the
  background write is waited for before anything else runs;
- `gpu checkpoint load <variant>`: `select_resume_checkpoint` (xxh3_128 of every file) +
  `load_checkpoint` (the worker's resume) against `cat` of the same files (warm page cache).
In each repeat: save, cat, load, delete, dd, background save, delete: one checkpoint's bytes on
the disk at a time; every row's note gives them. A piece is skipped (named in the record's
`ckpt.skipped`) when the variant's time limit (`--timeout` + `--ckpt-timeout`) leaves no room for
it, estimated from the synchronous save (all of them when the disk lacks the space for one
checkpoint); the child writes its record after training and after each piece, so a variant
killed at its limit keeps what it measured (and is listed as failed).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Result, markdown_table, write_results
from bench.gpu_checkpoint import checkpoint_results, measure_checkpoints

logger = logging.getLogger(__name__)

PEAK_BF16_FLOPS = 989e12  # H200 SXM dense bf16 (vendor datasheet)
VARIANTS = ("dense", "stock", "dropless")
CKPT_VARIANTS = ("dense", "dropless")
DEADLINE_MARGIN_S = 5.0  # the child's deadline: this long before its process is killed


@dataclass(frozen=True)
class Shape:
    d_model: int
    n_layers: int
    n_heads: int
    experts: int
    top_k: int
    seq: int
    micro_batch: int
    vocab: int
    steps: int
    warmup: int
    ckpt_repeats: int


# ~0.91 B parameters with 8 experts (dense parent ~0.20 B); 8k tokens per step.
# NOTE: the stock layer dispatches with dense one-hot matmuls over (tokens, experts, capacity), whose
# cost grows with tokens^2 (capacity = k x tokens / experts): 8k tokens per micro-batch is a common
# per-GPU size, where that dispatch costs about as much as the experts' own matmuls.
GPU = Shape(d_model=1024, n_layers=12, n_heads=16, experts=8, top_k=2, seq=2048, micro_batch=4,
            vocab=50368, steps=20, warmup=5, ckpt_repeats=1)  # fmt: skip
DRY = Shape(d_model=32, n_layers=2, n_heads=2, experts=4, top_k=2, seq=32, micro_batch=2, vocab=300, steps=2,
            warmup=1, ckpt_repeats=2)  # fmt: skip


def run_config(shape: Shape, variant: str, gpu: bool) -> Any:
    from bench.common import tiny_model_config

    return tiny_model_config(
        f"gpu-bench-{variant}", d_model=shape.d_model, n_layers=shape.n_layers, n_heads=shape.n_heads,
        vocab=shape.vocab, seq=shape.seq, micro_batch=shape.micro_batch, gpus_per_node=int(gpu),
        moe={"enabled": variant != "dense", "num_experts": shape.experts, "top_k": shape.top_k,
             "ep_size": 1, "implementation": "dropless" if variant == "dropless" else "deepspeed"},
    )  # fmt: skip


def model_flops_per_token(shape: Shape, variant: str) -> float:
    """6 x matmul parameters per token + 12 x L x d x seq (see the module docstring)."""
    d, layers = shape.d_model, shape.n_layers
    attn = 4 * d * d
    ffn = 2 * d * 4 * d
    per_layer = attn + (ffn if variant == "dense" else shape.top_k * ffn + d * shape.experts)
    return 6.0 * (layers * per_layer + shape.vocab * d) + 12.0 * layers * d * shape.seq


def measure_variant(
    shape: Shape,
    variant: str,
    gpu: bool,
    *,
    emit: Callable[[dict[str, Any]], None] | None = None,
    ckpt_dir: Path | None = None,
    ckpt_repeats: int = 1,
    deadline: float = math.inf,
) -> dict[str, Any]:
    """One variant in this process: build, warm up, time `shape.steps` steps; then, with `ckpt_dir`
    (an empty run dir), the checkpoint paths (`measure_checkpoints`) until `deadline` (time.time()).
    `emit` gets the record after training and after each checkpoint piece."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if not gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    if not gpu:
        torch.set_num_threads(1)
    import deepspeed

    from orchestrator.spec.deepspeed import deepspeed_config
    from worker.dist import skip_shm_build
    from worker.model import build_model, build_optimizer, moe_aux_loss

    if gpu:
        torch.cuda.set_device(0)
    else:
        skip_shm_build()
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    device = torch.device("cuda" if gpu else "cpu")
    cfg = run_config(shape, variant, gpu)
    t0 = time.perf_counter()
    # NOTE: build on the GPU directly: a 1B-parameter random init on the CPU takes longer than training.
    torch.set_default_device(device)
    try:
        model = build_model(cfg, shape.vocab)
    finally:
        torch.set_default_device("cpu")
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, lr=cfg.training.learning_rate, weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg))
    build_s = time.perf_counter() - t0

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize()

    times: list[float] = []
    losses: list[float] = []
    for step in range(shape.warmup + shape.steps):
        gen = torch.Generator(device=device).manual_seed(step)
        ids = torch.randint(0, shape.vocab, (shape.micro_batch, shape.seq), generator=gen, device=device)
        sync()
        start = time.perf_counter()
        out = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        loss = out.loss + cfg.moe.aux_loss_weight * moe_aux_loss(engine.module)
        engine.backward(loss)
        engine.step()
        sync()
        if step >= shape.warmup:
            times.append(time.perf_counter() - start)
        losses.append(float(loss.detach().float()))
    step_s = statistics.median(times)
    tokens = shape.micro_batch * shape.seq
    flops = model_flops_per_token(shape, variant) * tokens / step_s
    rec = {
        "variant": variant,
        "params": n_params,
        "build_s": round(build_s, 1),
        "step_s": step_s,
        "min_step_s": min(times),
        "tokens_per_s": tokens / step_s,
        "model_tflops": flops / 1e12,
        "mfu": flops / PEAK_BF16_FLOPS if gpu else None,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if gpu else None,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
    }
    emit = emit or (lambda _rec: None)
    emit(rec)
    if ckpt_dir is not None:
        measure_checkpoints(engine, ckpt_dir, rec, emit, sync=sync, repeats=ckpt_repeats, deadline=deadline)
    return rec


def results_from_records(records: list[dict[str, Any]]) -> list[Result]:
    """tokens/s per variant (higher is better); baseline = the dense parent's."""
    dense = next((r for r in records if r["variant"] == "dense"), None)
    results = []
    for rec in records:
        mfu = f"MFU {100 * rec['mfu']:.1f}%" if rec.get("mfu") is not None else "MFU - (no GPU)"
        mem = f", peak {rec['peak_mem_gb']:.1f} GB" if rec.get("peak_mem_gb") is not None else ""
        note = (
            f"higher is better; {mfu} ({rec['model_tflops']:.1f} model TFLOP/s), step "
            f"{1e3 * rec['step_s']:.0f} ms, {rec['params'] / 1e9:.2f} B params{mem}"
        )
        baseline = None if dense is None or rec is dense else dense["tokens_per_s"]
        results.append(Result(f"gpu train {rec['variant']}", ours=rec["tokens_per_s"], baseline=baseline,
                              unit="tokens/s", note=note))  # fmt: skip
    for rec in records:
        results += checkpoint_results(rec)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry", action="store_true", help="CPU, tiny shape, fp32 (CI); writes nothing")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)  # child process: one variant
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per variant (150)")
    parser.add_argument("--ckpt-variants", nargs="*", choices=VARIANTS, default=list(CKPT_VARIANTS),
                        help="variants that also measure the checkpoint paths (dense dropless)")  # fmt: skip
    parser.add_argument("--ckpt-timeout", type=float, default=60.0,
                        help="seconds added to the time limit of a variant that saves (60)")  # fmt: skip
    parser.add_argument("--ckpt-repeats", type=int, help="saves of each kind per variant (GPU 1, --dry 2)")
    parser.add_argument("--out", type=Path, help="also copy the result files into this folder")
    parser.add_argument("--json-out", type=Path, help="also write the rows and records to this file")
    parser.add_argument("--ckpt-dir", type=Path, help=argparse.SUPPRESS)  # child: its empty run dir
    parser.add_argument("--deadline", type=float, default=math.inf, help=argparse.SUPPRESS)  # child: epoch s
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    shape = DRY if args.dry else GPU
    repeats = args.ckpt_repeats or shape.ckpt_repeats
    if args.one:
        assert args.record is not None
        record = args.record

        def emit(rec: dict[str, Any]) -> None:  # atomically: the parent may kill this process any time
            partial = record.with_suffix(".partial")
            partial.write_text(json.dumps(rec), encoding="utf-8")
            os.replace(partial, record)

        measure_variant(shape, args.one, gpu=not args.dry, emit=emit, ckpt_dir=args.ckpt_dir,
                        ckpt_repeats=repeats, deadline=args.deadline)  # fmt: skip
        return 0
    records: list[dict[str, Any]] = []
    failures: dict[str, str] = {}
    # NOTE: the checkpoints go under this folder ($TMPDIR or /tmp), which goes even when a child is killed.
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        for variant in args.variants:
            path = Path(tmp) / f"{variant}.json"
            saves = variant in args.ckpt_variants
            limit = args.timeout + (args.ckpt_timeout if saves else 0.0)
            argv_child = [sys.executable, "-m", "bench.gpu_train", "--one", variant, "--record", str(path),
                          "--deadline", f"{time.time() + limit - DEADLINE_MARGIN_S:.1f}"]  # fmt: skip
            argv_child += ["--dry"] if args.dry else []
            run_dir = Path(tmp) / f"{variant}-run"
            if saves:
                run_dir.mkdir()
                argv_child += ["--ckpt-dir", str(run_dir), "--ckpt-repeats", str(repeats)]
            start = time.perf_counter()
            error = None
            try:
                res = subprocess.run(argv_child, capture_output=True, text=True, timeout=limit, check=False)
                if res.returncode != 0:
                    error = " | ".join(res.stderr.strip().splitlines()[-8:])
            except subprocess.TimeoutExpired:
                error = f"timed out after {limit:.0f} s"
            finally:
                shutil.rmtree(run_dir, ignore_errors=True)
            rec = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
            if error or rec is None:
                # NOTE: a child that trained and then failed or ran out of time keeps its training rows.
                where = "before its record" if rec is None else "after training"
                failures[variant] = f"{error or 'no record'} ({where})"
                print(f"{variant}: failed: {failures[variant]}", flush=True)
            if rec is None:
                continue
            rec["process_s"] = round(time.perf_counter() - start, 1)
            records.append(rec)
            print(f"{variant}: {json.dumps(rec)}", flush=True)
    results = results_from_records(records)
    print(markdown_table(results))
    if args.json_out:
        doc = {"results": [r.to_dict() for r in results], "records": records, "failures": failures}
        args.json_out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if not args.dry and records:
        meta = {**asdict(shape), "precision": "bf16", "zero_stage": 2, "ep_size": 1, "gpus": 1,
                "peak_flops": PEAK_BF16_FLOPS, "ckpt_variants": args.ckpt_variants, "ckpt_repeats": repeats,
                "records": records, "failures": failures}  # fmt: skip
        written = write_results("gpu-train", results, meta)
        print(f"wrote {written}")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            for suffix in (".json", ".md"):
                src = written.with_suffix(suffix)
                (args.out / src.name).write_bytes(src.read_bytes())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
