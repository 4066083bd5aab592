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
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Result, markdown_table, write_results

logger = logging.getLogger(__name__)

PEAK_BF16_FLOPS = 989e12  # H200 SXM dense bf16 (vendor datasheet)
VARIANTS = ("dense", "stock", "dropless")


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


# ~0.91 B parameters with 8 experts (dense parent ~0.20 B); 8k tokens per step.
# NOTE: the stock layer dispatches with dense one-hot matmuls over (tokens, experts, capacity), whose
# cost grows with tokens^2 (capacity = k x tokens / experts): 8k tokens per micro-batch is a common
# per-GPU size, where that dispatch costs about as much as the experts' own matmuls.
GPU = Shape(d_model=1024, n_layers=12, n_heads=16, experts=8, top_k=2, seq=2048, micro_batch=4,
            vocab=50368, steps=20, warmup=5)  # fmt: skip
DRY = Shape(d_model=32, n_layers=2, n_heads=2, experts=4, top_k=2, seq=32, micro_batch=2, vocab=300, steps=2,
            warmup=1)  # fmt: skip


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


def measure_variant(shape: Shape, variant: str, gpu: bool) -> dict[str, Any]:
    """One variant in this process: build, warm up, time `shape.steps` steps."""
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
    return {
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
    parser.add_argument("--out", type=Path, help="also copy the result files into this folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    shape = DRY if args.dry else GPU
    if args.one:
        rec = measure_variant(shape, args.one, gpu=not args.dry)
        assert args.record is not None
        args.record.write_text(json.dumps(rec), encoding="utf-8")
        return 0
    records: list[dict[str, Any]] = []
    failures: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        for variant in args.variants:
            path = Path(tmp) / f"{variant}.json"
            argv_child = [sys.executable, "-m", "bench.gpu_train", "--one", variant, "--record", str(path)]
            argv_child += ["--dry"] if args.dry else []
            start = time.perf_counter()
            try:
                res = subprocess.run(
                    argv_child, capture_output=True, text=True, timeout=args.timeout, check=False
                )
            except subprocess.TimeoutExpired:
                failures[variant] = f"timed out after {args.timeout:.0f} s"
                print(f"{variant}: {failures[variant]}", flush=True)
                continue
            if res.returncode != 0 or not path.exists():
                failures[variant] = " | ".join(res.stderr.strip().splitlines()[-8:])
                print(f"{variant}: failed: {failures[variant]}", flush=True)
                continue
            rec = json.loads(path.read_text(encoding="utf-8"))
            rec["process_s"] = round(time.perf_counter() - start, 1)
            records.append(rec)
            print(f"{variant}: {json.dumps(rec)}", flush=True)
    results = results_from_records(records)
    print(markdown_table(results))
    if not args.dry and records:
        meta = {**asdict(shape), "precision": "bf16", "zero_stage": 2, "ep_size": 1, "gpus": 1,
                "peak_flops": PEAK_BF16_FLOPS, "records": records, "failures": failures}  # fmt: skip
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
