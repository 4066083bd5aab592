"""Checkpoint save throughput, load time and bytes per parameter, through the worker's real path.

    python -m bench.checkpoint            # tiny-cpu and the train-step bench shape, 3 saves each
    python -m bench.checkpoint --smoke    # the train-step smoke shape, 1 save (CI)

Each model runs on 2 fresh ranks (torch.multiprocessing, gloo, fp32, ZeRO-2, expert-parallel
over both ranks, as `configs/tiny-cpu.yaml` trains), built as the worker builds it, after one
optimizer step so that the Adam moments exist. Then, repeated and interleaved:
- ours: `worker.checkpoint.save_checkpoint` (DeepSpeed's `save_checkpoint` into `.partial-<tag>`,
  every rank fsyncs and sha256-hashes a share of the files, manifest, rename, `latest`, prune);
  bytes/s = the manifest's total bytes / the call's wall time on rank 0;
- baseline: `dd if=/dev/zero of=<same dir>/f bs=1M count=<same MiB> conv=fsync` by rank 0 (the
  disk's plain sequential write + fsync for the same bytes, in the same folder);
- load: `select_resume_checkpoint` (sha256 of every file, split over the ranks) + `load_checkpoint`
  (DeepSpeed's `load_checkpoint` with optimizer and scheduler), against `cat` of the same files to
  /dev/null (reading the bytes; both with a warm page cache, as right after the save).
Bytes per parameter counts every parameter once (experts summed over the expert-parallel ranks).
With fp32 and ZeRO-2 about 16 B/param is expected: fp32 weights (the module file), and in the
optimizer shards the fp32 partition + Adam's two moments.
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
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Result, markdown_table, write_results

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
WORLD = 2
MODELS_FULL = ("tiny-cpu", "bench-shape")
MODELS_SMOKE = ("smoke-shape",)
MIB = 1024 * 1024


def model_config(model: str) -> tuple[Any, int]:
    """(RunConfig, vocab size) of a named model: the shipped tiny-cpu config, or train_step's shapes."""
    if model == "tiny-cpu":
        from orchestrator.spec.loading import load_config

        cfg = load_config(REPO / "configs" / "tiny-cpu.yaml")
        return cfg, cfg.model.tiny.vocab_size
    from bench.train_step import FULL, SMOKE, run_config

    shape = FULL if model == "bench-shape" else SMOKE
    return run_config(shape, "stock-top1-ep2"), shape.vocab


def _dd(folder: Path, n_bytes: int) -> float:
    """Seconds of `dd ... conv=fsync` writing `n_bytes` (rounded up to MiB) into `folder`."""
    target = folder / "dd.bin"
    count = max(1, -(-n_bytes // MIB))
    start = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={count}", "conv=fsync"],
        check=True, capture_output=True,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    target.unlink()
    return elapsed


def _cat(folder: Path) -> float:
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    start = time.perf_counter()
    subprocess.run(["cat", *files], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def _rank_main(rank: int, port: int, model: str, repeats: int, run_dir: str, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
    )  # fmt: skip
    import torch

    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist
    from deepspeed.moe.utils import is_moe_param

    from orchestrator.spec.deepspeed import deepspeed_config
    from worker import checkpoint as ckpt
    from worker.dist import skip_shm_build
    from worker.model import build_model, moe_aux_loss, optimizer_param_groups

    skip_shm_build()
    deepspeed.init_distributed(dist_backend="gloo")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

    cfg, vocab = model_config(model)
    torch.manual_seed(cfg.training.seed)
    net = build_model(cfg, vocab)
    optimizer = torch.optim.AdamW(optimizer_param_groups(net, 0.0), lr=cfg.training.learning_rate)
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=optimizer, config=deepspeed_config(cfg))
    seq = cfg.data.max_seq_length
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, vocab, (cfg.training.micro_batch_size, seq), generator=gen)
    loss = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    engine.backward(loss + cfg.moe.aux_loss_weight * moe_aux_loss(engine.module))
    engine.step()

    params = list(engine.module.parameters())
    expert = torch.tensor([sum(p.numel() for p in params if is_moe_param(p))], dtype=torch.long)
    dist.all_reduce(expert)
    total_params = int(expert) + sum(p.numel() for p in params if not is_moe_param(p))

    run = Path(run_dir)
    records: list[dict[str, Any]] = []
    for i in range(repeats):
        step = i + 1
        dist.barrier()
        res = ckpt.save_checkpoint(
            engine, run, step, {"step": step, "epoch": 0, "micro_batch": 0, "world_size": WORLD},
            rank=rank, keep=1,
        )  # fmt: skip
        dist.barrier()
        rec: dict[str, Any] = {"step": step, "save_s": res.save_s, "bytes": res.bytes}
        if rank == 0:
            rec["dd_s"] = _dd(run, res.bytes)
            rec["cat_s"] = _cat(res.path)
        dist.barrier()
        start = time.perf_counter()
        chosen = ckpt.select_resume_checkpoint(run, rank, WORLD)
        verified = time.perf_counter()
        assert chosen is not None and chosen.name == res.tag, chosen
        ckpt.load_checkpoint(engine, chosen)
        dist.barrier()
        rec["verify_s"], rec["load_s"] = verified - start, time.perf_counter() - start
        records.append(rec)
    gathered: list[Any] = [None] * WORLD
    dist.all_gather_object(gathered, records)
    if rank == 0:
        doc = {"params": total_params, "ranks": gathered}
        Path(out).write_text(json.dumps(doc), encoding="utf-8")
    dist.barrier()
    dist.destroy_process_group()


def measure_model(model: str, repeats: int) -> dict[str, Any]:
    """Save/load `repeats` times on 2 fresh ranks; returns medians and the raw per-rank records."""
    from torch.multiprocessing.spawn import start_processes

    from bench.train_step import _free_port

    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        run_dir, out = Path(tmp) / "run", Path(tmp) / "out.json"
        run_dir.mkdir()
        start_processes(  # type: ignore[no-untyped-call]
            _rank_main, args=(_free_port(), model, repeats, str(run_dir), str(out)), nprocs=WORLD,
            start_method="spawn",
        )  # fmt: skip
        doc = json.loads(out.read_text(encoding="utf-8"))
        tags = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())
        files = {
            p.name: p.stat().st_size for p in (run_dir / "checkpoints" / tags[-1]).rglob("*") if p.is_file()
        }
    rank0 = doc["ranks"][0]
    # NOTE: a save or load ends when the slowest rank returns (both end on a barrier).
    save_s = [max(r[i]["save_s"] for r in doc["ranks"]) for i in range(repeats)]
    load_s = [max(r[i]["load_s"] for r in doc["ranks"]) for i in range(repeats)]
    verify_s = [max(r[i]["verify_s"] for r in doc["ranks"]) for i in range(repeats)]
    n_bytes = rank0[-1]["bytes"]
    return {
        "model": model,
        "params": doc["params"],
        "bytes": n_bytes,
        "bytes_per_param": n_bytes / doc["params"],
        "save_s": statistics.median(save_s),
        "dd_s": statistics.median(r["dd_s"] for r in rank0),
        "load_s": statistics.median(load_s),
        "verify_s": statistics.median(verify_s),
        "cat_s": statistics.median(r["cat_s"] for r in rank0),
        "files": files,
        "repeats": repeats,
        "ranks": doc["ranks"],
    }


def results_from_records(records: list[dict[str, Any]]) -> list[Result]:
    """Per model: save MB/s against dd's (higher is better), load ms against cat's, bytes/param."""
    results: list[Result] = []
    for rec in records:
        mb = rec["bytes"] / 1e6
        results.append(
            Result(
                f"checkpoint save {rec['model']}", ours=mb / rec["save_s"], baseline=mb / rec["dd_s"],
                unit="MB/s", note=f"higher is better; {mb:.1f} MB, {len(rec['files'])} files, save "
                f"{rec['save_s']:.2f} s vs dd {rec['dd_s']:.2f} s; median of {rec['repeats']}, 2 ranks",
            )
        )  # fmt: skip
        results.append(
            Result(
                f"checkpoint load {rec['model']}", ours=1e3 * rec["load_s"], baseline=1e3 * rec["cat_s"],
                unit="ms wall", note=f"verify (sha256) {1e3 * rec['verify_s']:.0f} ms + DeepSpeed load; "
                "baseline: cat of the files, warm cache",
            )
        )  # fmt: skip
        results.append(
            Result(
                f"checkpoint bytes/param {rec['model']}", ours=rec["bytes_per_param"], baseline=16.0,
                unit="B/param", note=f"{rec['params'] / 1e6:.2f} M params; baseline = fp32 ZeRO-2 Adam "
                "expectation (4 weights + 4 master + 8 moments)",
            )
        )  # fmt: skip
    return results


def run(
    smoke: bool = False, models: list[str] | None = None, repeats: int | None = None
) -> tuple[list[Result], list[dict[str, Any]]]:
    names = models or list(MODELS_SMOKE if smoke else MODELS_FULL)
    records = [measure_model(name, repeats or (1 if smoke else 3)) for name in names]
    return results_from_records(records), records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="the smoke shape, 1 save, nothing written (CI)")
    parser.add_argument("--models", nargs="+", choices=[*MODELS_FULL, *MODELS_SMOKE], help="default: both")
    parser.add_argument("--repeats", type=int, help="saves (and loads) per model (3)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write bench/results")
    parser.add_argument("--json-out", type=Path, help="also write the rows and records to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results, records = run(args.smoke, args.models, args.repeats)
    print(markdown_table(results))
    if args.json_out:
        doc = {"results": [r.to_dict() for r in results], "records": records}
        args.json_out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if not args.no_write and not args.smoke:
        meta = {"world": WORLD, "precision": "fp32", "zero_stage": 2, "ep_size": 2, "records": records}
        print(f"wrote {write_results('checkpoint', results, meta)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
