"""Checkpoint save throughput, load time and bytes per parameter, through the worker's real path.

    python -m bench.checkpoint            # tiny-cpu and the train-step bench shape, 3 saves each
    python -m bench.checkpoint --smoke    # the train-step smoke shape, 1 save (CI)

Each model runs on 2 fresh ranks (torch.multiprocessing, gloo, fp32, ZeRO-2, expert-parallel
over both ranks, as `configs/tiny-cpu.yaml` trains), built as the worker builds it, after one
optimizer step so that the Adam moments exist. Then, repeated and interleaved:
- ours: `worker.checkpoint.save_checkpoint` (DeepSpeed's `save_checkpoint` into `.partial-<tag>`,
  each rank's files hashed (xxh3_128) as they are written and fsynced, manifest, rename, `latest`,
  prune); bytes/s = the manifest's total bytes / the call's wall time (the slower rank);
- async: `worker.checkpoint.start_background_save` (training.async_save) after each synchronous
  save: the stall (the call's time: the CPU snapshot) against the synchronous save's time, and
  the background save's time until published. The first background save of a run allocates the
  snapshot's buffers, the later ones copy into them (the median of 3 or more is a later one;
  `async_stall_s` of the first record is the first);
- baseline: `dd if=/dev/zero of=<same dir>/f bs=1M count=<same MiB> conv=fsync` by rank 0 (the
  disk's plain sequential write + fsync for the same bytes, in the same folder);
- load: `select_resume_checkpoint` (xxh3_128 of every file, split over the ranks) + `load_checkpoint`
  (DeepSpeed's `load_checkpoint` with optimizer and scheduler, the files mapped), against `cat` of
  the same files to /dev/null (reading the bytes; both with a warm page cache, as right after the
  save). The engine loaded into has trained a step, so its Adam moments exist and the loaded ones
  are copied into them; a fresh process (a real resume) clones them into new memory instead.
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


def _cpu_s() -> float:
    """CPU seconds of this process so far, every thread (the fsync and save threads too)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _legacy_save(engine: Any, run: Path, step: int, client_state: dict[str, Any], rank: int) -> float:
    """The save as it was before issue 14 (for the `[before]` rows, interleaved with ours):
    DeepSpeed's own `torch.save` (CRC32 on), then every rank fsyncs and sha256-hashes a share of
    the files by reading them back, all_gather, manifest (sha256, as then), rename. Returns the
    seconds."""
    import torch.distributed as dist

    from orchestrator.rundir.checkpoints import LEGACY_HASH, finalize_checkpoint, hash_files
    from worker import checkpoint as ckpt

    started = time.perf_counter()
    tag, _, partial = ckpt._prepare(run, step, rank)
    engine.save_checkpoint(str(partial), tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()
    shares: list[Any] = [None] * WORLD
    dist.all_gather_object(shares, hash_files(partial / tag, rank, WORLD, LEGACY_HASH))
    if rank == 0:
        known = {k: v for share in shares for k, v in share.items()}
        finalize_checkpoint(run, tag, step, client_state, 1, known, LEGACY_HASH)
    dist.barrier()
    return time.perf_counter() - started


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
        step = 2 * i + 2  # the legacy save takes step 2i+1: ours is the newest, kept and loaded
        dist.barrier()
        cpu0 = _cpu_s()
        legacy_s = _legacy_save(engine, run, step - 1, {"step": step - 1, "epoch": 0}, rank)
        cpu1 = _cpu_s()
        dist.barrier()
        cpu2 = _cpu_s()
        res = ckpt.save_checkpoint(
            engine, run, step, {"step": step, "epoch": 0, "micro_batch": 0, "world_size": WORLD},
            rank=rank, keep=1,
        )  # fmt: skip
        cpu3 = _cpu_s()
        dist.barrier()
        rec: dict[str, Any] = {"step": step, "save_s": res.save_s, "bytes": res.bytes}
        rec["legacy_save_s"], rec["legacy_cpu_s"], rec["save_cpu_s"] = legacy_s, cpu1 - cpu0, cpu3 - cpu2
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
        dist.barrier()
        extra = 1000 + step  # keep=None: the next legacy save stays older than the sync one
        pending = ckpt.start_background_save(
            engine, run, extra, {"step": extra, "epoch": 0, "micro_batch": 0, "world_size": WORLD},
            rank=rank, keep=None,
        )  # fmt: skip
        rec["async_stall_s"] = pending.stall_s
        rec["async_save_s"] = pending.wait().save_s
        dist.barrier()
        if rank == 0:  # the background save published step 1000+: take it away again
            import shutil

            shutil.rmtree(run / "checkpoints" / pending.tag)
            (run / "checkpoints" / "latest").write_text(res.tag + "\n")
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
        manifest = json.loads((run_dir / "checkpoints" / tags[-1] / "manifest.json").read_text())
        manifest_hash = manifest.get("hash", "sha256")
    rank0 = doc["ranks"][0]
    # NOTE: a save or load ends when the slowest rank returns (both end on a barrier).
    save_s = [max(r[i]["save_s"] for r in doc["ranks"]) for i in range(repeats)]
    load_s = [max(r[i]["load_s"] for r in doc["ranks"]) for i in range(repeats)]
    verify_s = [max(r[i]["verify_s"] for r in doc["ranks"]) for i in range(repeats)]
    stall_s = [max(r[i]["async_stall_s"] for r in doc["ranks"]) for i in range(repeats)]
    legacy_s = [max(r[i]["legacy_save_s"] for r in doc["ranks"]) for i in range(repeats)]
    save_cpu = [sum(r[i]["save_cpu_s"] for r in doc["ranks"]) for i in range(repeats)]
    legacy_cpu = [sum(r[i]["legacy_cpu_s"] for r in doc["ranks"]) for i in range(repeats)]
    async_s = [max(r[i]["async_save_s"] for r in doc["ranks"]) for i in range(repeats)]
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
        "async_stall_s": statistics.median(stall_s),
        "legacy_save_s": statistics.median(legacy_s),
        "save_cpu_s": statistics.median(save_cpu),
        "legacy_cpu_s": statistics.median(legacy_cpu),
        "async_save_s": statistics.median(async_s),
        "first_stall_s": stall_s[0],
        "hash": manifest_hash,
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
                f"{rec['save_s']:.2f} s vs dd {rec['dd_s']:.2f} s; median of {rec['repeats']}, 2 ranks"
                + (f"; CPU {rec['save_cpu_s']:.2f} s (both ranks)" if "save_cpu_s" in rec else ""),
            )
        )  # fmt: skip
        if "legacy_save_s" in rec:
            results.append(
                Result(
                    f"checkpoint save {rec['model']} [before, interleaved]", ours=mb / rec["legacy_save_s"],
                    baseline=mb / rec["dd_s"], unit="MB/s",
                    note=f"the pre-issue-14 save (torch.save with CRC32, then fsync + sha256 by reading "
                    f"back), alternating with ours in the same processes; save {rec['legacy_save_s']:.2f} s, "
                    f"CPU {rec['legacy_cpu_s']:.2f} s",
                )
            )  # fmt: skip
        if "async_stall_s" in rec:
            results.append(
                Result(
                    f"checkpoint async stall {rec['model']}", ours=1e3 * rec["async_stall_s"],
                    baseline=1e3 * rec["save_s"], unit="ms wall",
                    note=f"training.async_save: training waits for the CPU snapshot only (into the "
                    f"previous save's buffers; the first save's: {1e3 * rec['first_stall_s']:.0f} ms); "
                    f"baseline: the synchronous save; the background write took {rec['async_save_s']:.2f} s"
                    if "first_stall_s" in rec else f"training.async_save: training waits for the CPU "
                    f"snapshot only; baseline: the synchronous save; the background write took "
                    f"{rec['async_save_s']:.2f} s",
                )
            )  # fmt: skip
        results.append(
            Result(
                f"checkpoint load {rec['model']}", ours=1e3 * rec["load_s"], baseline=1e3 * rec["cat_s"],
                unit="ms wall", note=f"verify ({rec.get('hash', 'sha256')}) {1e3 * rec['verify_s']:.0f} ms "
                "+ DeepSpeed load; baseline: cat of the files, warm cache",
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


def _before(tree: Path, smoke: bool, models: list[str] | None, repeats: int | None) -> list[Result]:
    """This benchmark as the source tree `tree` (a `git archive` of an earlier commit) has it, run
    from that tree in a subprocess: its rows, renamed `... [before]`."""
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-before-") as tmp:
        out = Path(tmp) / "before.json"
        argv = [sys.executable, "-m", "bench.checkpoint", "--no-write", "--json-out", str(out)]
        if smoke:
            argv.append("--smoke")
        if models:
            argv += ["--models", *models]
        if repeats:
            argv += ["--repeats", str(repeats)]
        env = {**os.environ, "PYTHONPATH": str(tree)}
        subprocess.run(argv, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
        rows = json.loads(out.read_text(encoding="utf-8"))["results"]
    return [Result(**{**row, "name": f"{row['name']} [before]"}) for row in rows]


def _side_by_side(ours: list[Result], before: list[Result]) -> list[Result]:
    """Each row followed by the `[before]` row of the same name, when there is one."""
    by_name = {r.name.removesuffix(" [before]"): r for r in before}
    out: list[Result] = []
    for row in ours:
        out.append(row)
        if row.name in by_name:
            out.append(by_name.pop(row.name))
    return out + list(by_name.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="the smoke shape, 1 save, nothing written (CI)")
    parser.add_argument("--models", nargs="+", choices=[*MODELS_FULL, *MODELS_SMOKE], help="default: both")
    parser.add_argument("--repeats", type=int, help="saves (and loads) per model (3)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write bench/results")
    parser.add_argument("--json-out", type=Path, help="also write the rows and records to this file")
    parser.add_argument(
        "--before-tree", type=Path, help="first run this benchmark of another source tree (rows `[before]`)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    before: list[Result] = []
    if args.before_tree is not None:
        before = _before(args.before_tree.resolve(), args.smoke, args.models, args.repeats)
    results, records = run(args.smoke, args.models, args.repeats)
    results = _side_by_side(results, before)
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
