"""The GPU benchmark's checkpoint rows: the worker's save, background save and resume on a trained
engine, each against its disk baseline (`bench/gpu_train.py` calls `measure_checkpoints` after a
variant's timed steps; its docstring says what each row measures).
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import Result


def measure_checkpoints(
    engine: Any,
    run: Path,
    rec: dict[str, Any],
    emit: Callable[[dict[str, Any]], None],
    *,
    sync: Callable[[], None],
    repeats: int,
    deadline: float,
) -> None:
    """The worker's synchronous save, background save and resume on `engine`, each against its
    disk baseline (see the module docstring), into `rec["ckpt"]` (lists of seconds, one per
    repeat); a piece the deadline leaves no room for is skipped and named in `skipped`."""
    from bench.checkpoint import _cat, _dd
    from worker import checkpoint as ckpt

    out: dict[str, Any] = {
        "dir": str(run), "bytes": 0, "files": 0, "save_s": [], "dd_s": [], "cat_s": [], "verify_s": [],
        "load_s": [], "async_stall_s": [], "async_call_s": [], "async_save_s": [], "skipped": [],
    }  # fmt: skip
    rec["ckpt"] = out

    def room(piece: str, seconds: float) -> bool:
        """Whether `seconds` more fit before the deadline; if not, `piece` is recorded as skipped."""
        if time.time() + seconds < deadline:
            return True
        out["skipped"].append(piece)
        emit(rec)
        return False

    # NOTE: before the first save its size and time are guesses: 16 B/param (fp32 master and moments;
    # bf16 weights make it ~14), written at 1 GB/s. A save needs room for itself and its dd.
    free = shutil.disk_usage(run).free
    if free < 1.2 * 16 * rec["params"]:
        out["skipped"].append(f"all ({free / 1e9:.1f} GB free in {run})")
        emit(rec)
        return
    for i in range(repeats):
        save_estimate = max(out["save_s"], default=16 * rec["params"] / 1e9)
        if not room(f"save {i + 1}", 2 * save_estimate):
            break
        step = 1000 * (i + 1)
        state = {"step": step, "epoch": 0, "micro_batch": 0, "world_size": 1}
        sync()
        start = time.perf_counter()
        res = ckpt.save_checkpoint(engine, run, step, state, rank=0, keep=None)
        sync()
        out["save_s"].append(time.perf_counter() - start)
        out["bytes"], out["files"] = res.bytes, sum(1 for p in res.path.rglob("*") if p.is_file())
        emit(rec)
        save_s = out["save_s"][-1]
        if room(f"load {i + 1}", 2 * save_s):
            out["cat_s"].append(_cat(res.path))
            start = time.perf_counter()
            chosen = ckpt.select_resume_checkpoint(run, 0, 1)
            verified = time.perf_counter()
            assert chosen == res.path, (chosen, res.path)
            ckpt.load_checkpoint(engine, chosen)
            sync()
            out["verify_s"].append(verified - start)
            out["load_s"].append(time.perf_counter() - start)
            emit(rec)
        shutil.rmtree(res.path)  # NOTE: one checkpoint's bytes on the disk at a time (dd's too)
        if room(f"dd {i + 1}", save_s):
            out["dd_s"].append(_dd(run, res.bytes))
            emit(rec)
        if not room(f"async {i + 1}", 2 * save_s):
            continue
        sync()
        start = time.perf_counter()
        pending = ckpt.start_background_save(engine, run, step + 1, {**state, "step": step + 1}, rank=0,
                                             keep=None)  # fmt: skip
        try:
            sync()
            out["async_stall_s"].append(time.perf_counter() - start)
            out["async_call_s"].append(pending.stall_s)
        finally:
            # NOTE: never two background saves at once (the worker's rule), nor one past this process.
            done = pending.wait(timeout=max(1.0, deadline - time.time()))
        out["async_save_s"].append(done.save_s)
        shutil.rmtree(done.path)
        emit(rec)


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.1f} MB"


def checkpoint_results(rec: dict[str, Any]) -> list[Result]:
    """A variant's checkpoint rows (medians over the repeats): save MB/s against dd's, the async
    stall against the synchronous save, the load against cat; rows of skipped pieces are left out."""
    ck = rec.get("ckpt")
    if not ck or not ck["save_s"]:
        return []
    med = statistics.median
    variant, mb, size = rec["variant"], ck["bytes"] / 1e6, _size(ck["bytes"])
    d2h = "device->host copy, " if rec["device"] != "cpu" else ""
    skipped = f"; skipped (time limit): {', '.join(ck['skipped'])}" if ck["skipped"] else ""
    save_s = med(ck["save_s"])
    dd = f"dd {med(ck['dd_s']):.2f} s (bs=1M conv=fsync, same folder)" if ck["dd_s"] else "dd skipped"
    results = [
        Result(
            f"gpu checkpoint save {variant}", ours=mb / save_s,
            baseline=mb / med(ck["dd_s"]) if ck["dd_s"] else None, unit="MB/s",
            note=f"higher is better; {size} ({ck['bytes'] / rec['params']:.1f} B/param), {ck['files']} "
            f"files; save {save_s:.2f} s ({d2h}xxh3_128, fsync, manifest) vs {dd}; median of "
            f"{len(ck['save_s'])}{skipped}",
        )
    ]  # fmt: skip
    if ck["async_stall_s"]:
        results.append(
            Result(
                f"gpu checkpoint async stall {variant}", ours=1e3 * med(ck["async_stall_s"]),
                baseline=1e3 * save_s, unit="ms wall",
                note=f"training.async_save: training waits for the {'device->host ' if d2h else ''}snapshot "
                f"of {size} into CPU "
                f"buffers (the first, fresh buffers: {1e3 * ck['async_stall_s'][0]:.0f} ms); baseline: "
                f"the synchronous save; the background write until published: "
                f"{med(ck['async_save_s']):.2f} s; median of {len(ck['async_stall_s'])}",
            )
        )  # fmt: skip
    if ck["load_s"]:
        results.append(
            Result(
                f"gpu checkpoint load {variant}", ours=1e3 * med(ck["load_s"]),
                baseline=1e3 * med(ck["cat_s"]), unit="ms wall",
                note=f"verify (xxh3_128) {1e3 * med(ck['verify_s']):.0f} ms + DeepSpeed load of {size} onto "
                f"the {'device' if d2h else 'CPU'}; baseline: cat of the {ck['files']} files, warm cache; "
                f"median of {len(ck['load_s'])}",
            )
        )  # fmt: skip
    return results
