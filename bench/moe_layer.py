"""MoE layer forward+backward on CPU: stock `deepspeed.moe.layer.MoE` against the dropless layer.

    python -m bench.moe_layer            # d 256, FFN 1024, 8 experts, S = 256..16384, k = 1 and 2
    python -m bench.moe_layer --smoke    # tiny sizes, a few seconds (CI)
    python -m bench.moe_layer --device cuda --dtype bf16   # on a GPU (bench/gpu.sh runs it)

Per token count S and top-k, in one process, the median time of one forward+backward of:
- `stock`: DeepSpeed's MoE as the worker builds it for training (capacity_factor 1.0, drop_tokens,
  random token selection, min_capacity 4, top-2 Gumbel sampling);
- `stock-nodrop`: the same with drop_tokens False (capacity grows to the busiest expert), the
  stock layer's only way to drop nothing;
- `dropless`: `worker.moe_dropless.DroplessMoE` (nothing dropped);
- `dense`: an FFN of equal active FLOPs (width k * FFN), the floor any MoE dispatch adds to.
The loss is sum(out * g) + 0.01 * l_aux with a fixed random g; the input requires grad, as inside a
model. One torch thread unless --threads, glibc keeping freed memory as the worker's CPU ranks do
(worker/malloc.py). Times are CPU time of the process (the machine is shared, so wall time mostly
measures the neighbours), medians of round-robin repeats; on a GPU, wall time between
`torch.cuda.synchronize` calls. Results go to bench/results/<date>-moe-layer.{json,md}
(`-gpu-moe-layer` on a GPU).
# NOTE: this DeepSpeed's stock layer dispatches sparsely (index_select into the (E, C, d) buffer,
# not the one-hot einsum of older releases), so at equal FLOPs it costs about the dense FFN: the
# expert GEMMs bound every layer here (see bench/README.md, "Reading it").
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import CPU_CLOCK, Result, interleaved_medians, markdown_table, write_results

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shape:
    d_model: int
    ffn: int
    experts: int
    tokens: tuple[int, ...]
    repeats: int


FULL = Shape(d_model=256, ffn=1024, experts=8, tokens=(256, 1024, 4096, 16384), repeats=5)
SMOKE = Shape(d_model=32, ffn=64, experts=4, tokens=(64, 256), repeats=2)


def init_single_process_deepspeed(device: str = "cpu") -> None:
    """A world-size-1 gloo group for DeepSpeed's MoE (it needs expert groups even at ep_size 1)."""
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    # NOTE: skip the 55 s shm C++ JIT of init_distributed on CPU (docs/deepspeed-cpu.md, "The shm build").
    import deepspeed.comm.torch

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # type: ignore[attr-defined]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend="gloo")


def _layers(
    d_model: int, ffn: int, experts: int, k: int, device: str = "cpu", dtype: Any = None
) -> dict[str, Any]:
    import torch
    from deepspeed.moe.layer import MoE
    from torch import nn

    from worker.moe_dropless import DroplessMoE

    torch.manual_seed(0)
    expert = nn.Sequential(nn.Linear(d_model, ffn), nn.GELU(), nn.Linear(ffn, d_model))

    def stock_layer(drop_tokens: bool) -> Any:
        layer = MoE(
            d_model,
            expert,
            num_experts=experts,
            ep_size=1,
            k=k,
            capacity_factor=1.0,
            min_capacity=4,
            drop_tokens=drop_tokens,
        )
        layer.set_deepspeed_parallelism()
        return layer

    stock, stock_nodrop = stock_layer(True), stock_layer(False)
    dropless = DroplessMoE(d_model, expert, num_experts=experts, k=k)
    with torch.no_grad():
        # NOTE: distinct experts and a trained-looking router, so routing is uneven as in training.
        for p in stock.parameters():
            p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    for layer in (stock_nodrop, dropless):
        layer.load_state_dict(stock.state_dict())
    dense = nn.Sequential(nn.Linear(d_model, k * ffn), nn.GELU(), nn.Linear(k * ffn, d_model))
    layers = {"stock": stock, "stock-nodrop": stock_nodrop, "dropless": dropless, "dense": dense}
    return {name: layer.to(device=device, dtype=dtype) for name, layer in layers.items()}


def _step_fn(layer: Any, x: Any, target: Any) -> Callable[[], None]:
    params = list(layer.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        out = layer(x)
        if isinstance(out, tuple):
            loss = (out[0] * target).sum() + 0.01 * out[1]
        else:
            loss = (out * target).sum()
        loss.backward()

    return step


def run(
    smoke: bool = False,
    tokens: list[int] | None = None,
    top_ks: tuple[int, ...] = (1, 2),
    repeats: int | None = None,
    warmup: int = 1,
    threads: int = 1,
    device: str = "cpu",
    dtype: str = "fp32",
) -> list[Result]:
    """Measure every (k, S) and return one `Result` per pair: ours = dropless, baseline = stock."""
    import time

    import torch

    from worker.malloc import keep_freed_memory

    torch.set_num_threads(threads)
    init_single_process_deepspeed(device)
    clock = CPU_CLOCK
    if device == "cpu":
        keep_freed_memory()
    else:

        def clock() -> float:  # wall time of the GPU's work
            torch.cuda.synchronize()
            return time.perf_counter()

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    shape = SMOKE if smoke else FULL
    d_model, ffn, experts = shape.d_model, shape.ffn, shape.experts
    sizes = tokens or list(shape.tokens)
    reps = repeats or shape.repeats
    results: list[Result] = []
    for k in top_ks:
        layers = _layers(d_model, ffn, experts, k, device, torch_dtype)
        for n_tokens in sizes:
            seq = 128 if n_tokens % 128 == 0 else n_tokens
            gen = torch.Generator().manual_seed(n_tokens)
            x = torch.randn(n_tokens // seq, seq, d_model, generator=gen).to(device, torch_dtype)
            x.requires_grad_(True)
            target = torch.randn(n_tokens // seq, seq, d_model, generator=gen).to(device, torch_dtype)
            steps = {name: _step_fn(layer.train(), x, target) for name, layer in layers.items()}
            seconds = interleaved_medians(steps, repeats=reps, warmup=warmup, clock=clock)
            ms = {name: 1e3 * s for name, s in seconds.items()}
            with torch.no_grad():
                _, _, counts = layers["dropless"](x)
            load = float(counts.max()) / float(counts.float().mean())
            note = (
                f"dense {ms['dense']:.1f} ms, stock-nodrop {ms['stock-nodrop']:.1f} ms "
                f"(dropless/stock-nodrop {ms['dropless'] / ms['stock-nodrop']:.2f}); "
                f"dropless/dense {ms['dropless'] / ms['dense']:.2f}, "
                f"stock/dense {ms['stock'] / ms['dense']:.2f}; max/mean expert load {load:.2f}"
            )
            result = Result(
                f"moe fwd+bwd top{k} S={n_tokens}", ours=ms["dropless"], baseline=ms["stock"], note=note
            )
            logger.info("%s: %s", result.name, ms)
            results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (CI)")
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts S (default 256 1024 4096 16384)")
    parser.add_argument("--top-k", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    parser.add_argument("--repeats", type=int, help="timed repeats per measurement (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--out", type=Path, help="also copy the result files into this folder")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write bench/results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results = run(args.smoke, args.tokens, tuple(args.top_k), args.repeats, threads=args.threads,
                  device=args.device, dtype=args.dtype)  # fmt: skip
    print(markdown_table(results))
    if not args.no_write and not args.smoke:
        meta: dict[str, Any] = {**asdict(FULL), "top_k": args.top_k, "threads": args.threads}
        meta.update(device=args.device, dtype=args.dtype)
        meta["tokens"] = args.tokens or list(FULL.tokens)
        meta["repeats"] = args.repeats or FULL.repeats
        meta["stock"] = "capacity_factor 1.0, drop_tokens, use_rts, min_capacity 4"
        meta["clock"] = (
            "process CPU time" if args.device == "cpu" else "wall time, cuda synchronized"
        ) + ", median of round-robin repeats"
        written = write_results("moe-layer" if args.device == "cpu" else "gpu-moe-layer", results, meta)
        print(f"wrote {written}")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            for suffix in (".json", ".md"):
                (args.out / written.with_suffix(suffix).name).write_bytes(
                    written.with_suffix(suffix).read_bytes()
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
