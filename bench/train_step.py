"""One DeepSpeed training step on CPU, 2 ranks: the dense parent against its MoE upcycles.

    python -m bench.train_step            # d 256, 4 layers, FFN 1024, 8 experts, seq 128, 2 ranks
    python -m bench.train_step --smoke    # tiny shape, two variants, seconds (CI)

Each variant runs in a fresh pair of processes (torch.multiprocessing, gloo, one torch thread per
rank, fp32, ZeRO-2, torch's fused AdamW, glibc keeping freed memory), built exactly as the worker
builds it: `worker.malloc.keep_freed_memory`, `worker.model.build_model`, `build_optimizer`,
`moe_aux_loss` and `orchestrator.spec.deepspeed.deepspeed_config`. Batches are random
token ids (content does not change the cost; the router sees varied inputs). Per variant, the
medians over the timed steps (the slower rank's) of: forward, backward and optimizer wall time,
step wall time (the record's number; tokens/s over both ranks derive from it), the same split in CPU
time of the rank's process (robust when other jobs share the cores, as wall time is not), the fastest
step, and peak RSS per rank.

Variants (ep_size is the expert-parallel size over the 2 ranks):
- `dense`: the parent MPT, no MoE (the baseline of every ratio);
- `stock-top1-ep2`, `stock-top2-ep2`: `deepspeed.moe.layer.MoE`, 4 experts per rank, all-to-all;
- `stock-top1-ep1`: the stock layer with every expert on every rank, to separate the dispatch cost
  from the all-to-all;
- `dropless-top1-ep2`, `dropless-top2-ep2`: `worker.moe_dropless.DroplessMoE`, 4 experts per rank,
  all_to_all of exactly the routed rows (nothing dropped);
- `dropless-top1-ep1`, `dropless-top2-ep1`: the dropless layer with all 8 experts on each rank.
# NOTE: ep 1 runs hold all experts on each rank (2x the expert parameters and optimizer work of
# ep 2); the stock ep 1 variant is their comparison.
Equal active FLOPs: a top-1 token passes through one expert, an FFN of the dense parent's width;
top-2 doubles the FFN FLOPs. What an MoE step adds at equal FLOPs is the routing, the all_to_alls
and the optimizer and ZeRO work over 5.4x the parameters per rank at ep 2 (8.4 M expert + 0.6 M
other vs the dense 1.65 M: the note's "floor" is that extra, measured in the same process).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
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

from bench.common import Result, markdown_table, tiny_model_config, write_results

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shape:
    d_model: int
    n_layers: int
    n_heads: int
    experts: int
    seq: int
    micro_batch: int  # sequences per rank per step
    vocab: int
    steps: int  # timed steps
    warmup: int


FULL = Shape(
    d_model=256, n_layers=4, n_heads=4, experts=8, seq=128, micro_batch=4, vocab=512, steps=15, warmup=3
)
SMOKE = Shape(
    d_model=32, n_layers=2, n_heads=2, experts=4, seq=32, micro_batch=2, vocab=300, steps=2, warmup=1
)

# name -> (moe enabled, implementation, top_k, ep_size)
VARIANTS: dict[str, tuple[bool, str, int, int]] = {
    "dense": (False, "deepspeed", 1, 1),
    "stock-top1-ep2": (True, "deepspeed", 1, 2),
    "stock-top2-ep2": (True, "deepspeed", 2, 2),
    "stock-top1-ep1": (True, "deepspeed", 1, 1),
    "dropless-top1-ep2": (True, "dropless", 1, 2),
    "dropless-top2-ep2": (True, "dropless", 2, 2),
    "dropless-top1-ep1": (True, "dropless", 1, 1),
    "dropless-top2-ep1": (True, "dropless", 2, 1),
}
SMOKE_VARIANTS = ("dense", "stock-top1-ep2", "dropless-top1-ep2")
WORLD = 2


def run_config(shape: Shape, variant: str) -> Any:
    """The `RunConfig` of one variant (what a user would write in run.yaml)."""
    enabled, implementation, top_k, ep_size = VARIANTS[variant]
    return tiny_model_config(
        f"bench-{variant}", d_model=shape.d_model, n_layers=shape.n_layers, n_heads=shape.n_heads,
        vocab=shape.vocab, seq=shape.seq, micro_batch=shape.micro_batch, tasks_per_node=WORLD,
        moe={"enabled": enabled, "num_experts": shape.experts, "top_k": top_k, "ep_size": ep_size,
             "implementation": implementation},
    )  # fmt: skip


def _rank_main(rank: int, port: int, shape: Shape, variant: str, out_dir: str) -> None:
    """One rank: build the model as the worker does, time `warmup + steps` steps, report to rank 0."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
    )
    import resource

    import torch

    from worker.malloc import keep_freed_memory

    keep_freed_memory()  # as the worker's CPU ranks do (worker/train.py)
    torch.set_num_threads(1)
    import deepspeed
    import deepspeed.comm.torch
    import torch.distributed as dist

    # NOTE: skip the 55 s shm C++ JIT that training never uses (docs/deepspeed-cpu.md, "The shm build").
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # type: ignore[attr-defined]
    deepspeed.init_distributed(dist_backend="gloo")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

    from orchestrator.spec.deepspeed import deepspeed_config
    from worker.model import build_model, build_optimizer, moe_aux_loss

    cfg = run_config(shape, variant)
    torch.manual_seed(cfg.training.seed)
    model = build_model(cfg, shape.vocab)
    optimizer = build_optimizer(model, lr=cfg.training.learning_rate, weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg))
    n_params = sum(p.numel() for p in engine.module.parameters())

    names = (
        "forward",
        "backward",
        "optimizer",
        "step",
        "forward_cpu",
        "backward_cpu",
        "optimizer_cpu",
        "step_cpu",
    )
    phases: dict[str, list[float]] = {name: [] for name in names}
    losses: list[float] = []
    for step in range(shape.warmup + shape.steps):
        gen = torch.Generator().manual_seed(1000 * step + rank)
        ids = torch.randint(0, shape.vocab, (shape.micro_batch, shape.seq), generator=gen)
        dist.barrier()
        c0, t0 = time.process_time(), time.perf_counter()
        out = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        loss = out.loss + cfg.moe.aux_loss_weight * moe_aux_loss(engine.module)
        c1, t1 = time.process_time(), time.perf_counter()
        engine.backward(loss)
        c2, t2 = time.process_time(), time.perf_counter()
        engine.step()
        c3, t3 = time.process_time(), time.perf_counter()
        losses.append(float(loss.detach()))
        if step >= shape.warmup:
            values = (t1 - t0, t2 - t1, t3 - t2, t3 - t0, c1 - c0, c2 - c1, c3 - c2, c3 - c0)
            for name, value in zip(names, values, strict=True):
                phases[name].append(value)
    # The optimizer's own floor: fused AdamW over this rank's ZeRO partitions (every element it
    # updates), outside DeepSpeed.
    elements = sum(int(t.numel()) for t in engine.optimizer.single_partition_of_fp32_groups)
    flat = torch.zeros(elements, requires_grad=True)
    flat.grad = torch.randn(elements)
    adamw = torch.optim.AdamW([flat], lr=1e-4, fused=True)
    adamw_s = []
    for _ in range(6):
        c0 = time.process_time()
        adamw.step()
        adamw_s.append(time.process_time() - c0)
    del flat, adamw
    mine = {
        "optimizer_elements": elements,
        "adamw_cpu_s": statistics.median(adamw_s[1:]),
        "medians_s": {name: statistics.median(values) for name, values in phases.items()},
        "min_step_s": min(phases["step"]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "params": n_params,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }
    gathered: list[Any] = [None] * WORLD
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        Path(out_dir, f"{variant}.json").write_text(json.dumps(gathered), encoding="utf-8")
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure_variant(shape: Shape, variant: str) -> dict[str, Any]:
    """Run one variant on 2 fresh ranks; returns per-rank records and the derived numbers."""
    from torch.multiprocessing.spawn import start_processes

    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as out_dir:
        start = time.perf_counter()
        start_processes(  # type: ignore[no-untyped-call]
            _rank_main, args=(_free_port(), shape, variant, out_dir), nprocs=WORLD, start_method="spawn"
        )
        wall = time.perf_counter() - start
        ranks = json.loads(Path(out_dir, f"{variant}.json").read_text(encoding="utf-8"))
    # NOTE: a step ends when the slowest rank ends; take the max over ranks of each median.
    med = {name: max(r["medians_s"][name] for r in ranks) for name in ranks[0]["medians_s"]}
    tokens = WORLD * shape.micro_batch * shape.seq
    return {
        "variant": variant,
        "ranks": ranks,
        **{f"{name}_s": value for name, value in med.items()},
        "min_step_s": max(r["min_step_s"] for r in ranks),
        "optimizer_elements": max(r["optimizer_elements"] for r in ranks),
        "adamw_cpu_s": max(r["adamw_cpu_s"] for r in ranks),
        "tokens_per_s": tokens / med["step"],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
        "process_wall_s": wall,
    }


BEFORE_CODE = """
import json, sys
from bench import train_step as t
rec = t.measure_variant(t.SMOKE if sys.argv[1] == "smoke" else t.FULL, sys.argv[2])
print("RECORD " + json.dumps(rec))
"""


def measure_in_tree(tree: Path, smoke: bool, variant: str) -> dict[str, Any] | None:
    """The same measurement with another source tree's code (`git archive <rev>`), in a fresh
    process; None when that tree has no such variant (or failed: logged)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    argv = [sys.executable, "-c", BEFORE_CODE, "smoke" if smoke else "full", variant]
    proc = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RECORD ")]
    if proc.returncode != 0 or not lines:
        logger.warning(
            "%s in %s: %s", variant, tree, proc.stderr.strip().splitlines()[-1:] or proc.returncode
        )
        return None
    rec: dict[str, Any] = json.loads(lines[-1].removeprefix("RECORD "))
    rec["variant"] = f"{variant} [before]"
    return rec


def run(
    smoke: bool = False, variants: list[str] | None = None, before_tree: Path | None = None
) -> tuple[list[Result], list[dict[str, Any]]]:
    """Measure the variants; returns one `Result` per MoE variant (ours = variant, baseline = dense
    step time) plus the dense row, and the raw records. With `before_tree`, each variant is first
    measured with that tree's code (rows `<variant> [before]`, against that tree's dense step), so
    a slow phase of the machine hits both alike."""
    shape = SMOKE if smoke else FULL
    names = variants or list(SMOKE_VARIANTS if smoke else VARIANTS)
    if "dense" not in names:
        names = ["dense", *names]
    records = []
    for name in names:
        if before_tree is not None:
            before = measure_in_tree(before_tree, smoke, name)
            if before is not None:
                records.append(before)
        records.append(measure_variant(shape, name))
    return results_from_records(records), records


def results_from_records(records: list[dict[str, Any]]) -> list[Result]:
    """One `Result` per variant: ours = the variant's step CPU time, baseline = the dense one's.

    # NOTE: CPU time, not wall time, is the compared number: on a 2-core machine shared with other
    # jobs the wall time of the same variant varied up to 2x between two runs, its CPU time by <= 15%.
    # Wall time (and tokens/s from it) stays in the note and in the JSON records.
    """
    results: list[Result] = []
    for rec in records:
        dense = next(
            r
            for r in records
            if r["variant"] == ("dense [before]" if "[before]" in rec["variant"] else "dense")
        )
        ms = {key: 1e3 * value for key, value in rec.items() if key.endswith("_s")}
        floor = ""
        if "adamw_cpu_s" in rec and "adamw_cpu_s" in dense and rec is not dense:
            # the dense step plus what the extra parameters cost fused AdamW alone
            extra = rec["adamw_cpu_s"] - dense["adamw_cpu_s"]
            floor = (
                f"floor {1e3 * (dense['step_cpu_s'] + extra):.0f} (dense + AdamW over "
                f"{rec['optimizer_elements'] / 1e6:.1f} M vs {dense['optimizer_elements'] / 1e6:.1f} M "
                f"elements/rank: +{1e3 * extra:.1f}); "
            )
        note = (
            f"cpu fwd/bwd/opt {ms['forward_cpu_s']:.0f}/{ms['backward_cpu_s']:.0f}/"
            f"{ms['optimizer_cpu_s']:.0f}; {floor}"
            f"wall step {ms['step_s']:.0f} (min {ms['min_step_s']:.0f}) = {ms['forward_s']:.0f}/"
            f"{ms['backward_s']:.0f}/{ms['optimizer_s']:.0f}, {rec['tokens_per_s']:.0f} tok/s; "
            f"peak rss {rec['peak_rss_mb']:.0f} MB/rank"
        )
        baseline = None if rec is dense else 1e3 * dense["step_cpu_s"]
        name = f"train step {rec['variant']}"
        results.append(Result(name, ours=ms["step_cpu_s"], baseline=baseline, unit="ms cpu", note=note))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shape, three variants, seconds (CI)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="default: all")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write bench/results")
    parser.add_argument("--from-json", type=Path, help="re-tabulate a results JSON written by this script")
    parser.add_argument(
        "--before-tree",
        type=Path,
        help="also measure each variant with another source tree (rows `[before]`)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.from_json:
        doc = json.loads(args.from_json.read_text(encoding="utf-8"))
        print(markdown_table(results_from_records(doc["meta"]["records"])))
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results, records = run(
        args.smoke, args.variants, args.before_tree.resolve() if args.before_tree else None
    )
    print(markdown_table(results))
    if not args.no_write and not args.smoke:
        meta = {**asdict(FULL), "world": WORLD, "precision": "fp32", "zero_stage": 2, "threads_per_rank": 1}
        if args.before_tree:
            meta["before_tree"] = str(args.before_tree)
        meta["records"] = records
        print(f"wrote {write_results('train-step', results, meta)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
