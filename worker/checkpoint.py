"""Saving and loading a DeepSpeed engine's checkpoints, every rank together.

The files themselves (layout, manifests, verification, `latest`, pruning) belong to
`orchestrator.rundir.checkpoints` (no torch); this module adds what needs the engine or
`torch.distributed`.

A save (`save_checkpoint`, every rank calls it):
1. every rank: `engine.save_checkpoint(checkpoints/.partial-<tag>, tag, save_latest=False)`;
   DeepSpeed's `torch.save` calls go through `HashingCheckpointEngine`, which writes each file
   through a `HashingWriter` (its xxh3_128 computed from the bytes as they are written, never by
   reading the file back) and fsyncs it in a thread while the next file is serialized;
2. every rank waits for its fsyncs; the ranks all_gather their files' manifest entries; rank 0
   writes `client_state.json`, then `manifest.json` (last; it hashes the few files DeepSpeed wrote
   past the engine, e.g. `zero_to_fp32.py`), renames `.partial-<tag>/<tag>` to `checkpoints/<tag>`,
   fsyncs the folder, replaces `latest`, prunes to `keep_checkpoints` (never the newest valid one)
   and removes stale `.partial-*` folders (`finalize_checkpoint`);
3. barrier: when it returns, the checkpoint is durable on every rank's view.

A background save (`start_background_save`, `training.async_save`): step 1 only copies the state
DeepSpeed hands to `torch.save` into CPU memory (a snapshot: the next optimizer step cannot change
it), then a thread on every rank writes and hashes the files as above, the threads all_gather their
entries over a process group of their own (gloo; the training collectives keep the default group)
and rank 0's thread publishes the checkpoint. Until then the folder is `.partial-<tag>`, so a
kill -9 during the write leaves the previous checkpoint the newest valid one. The caller waits
for one background save (`BackgroundSave.wait`) before it starts the next.

The snapshot's CPU buffers are kept from one background save to the next (`SnapshotBuffers`).

Resume (`select_resume_checkpoint`) picks the newest checkpoint whose manifest verifies, as
`latest_valid_checkpoint` does, with the hashing split over the ranks by bytes; `load_checkpoint`
then loads it with DeepSpeed, whose reads go through `HashingCheckpointEngine.load` (files mapped,
not read; no tensor of the engine stays backed by one when it returns).

How each file reaches the disk and comes back (DeepSpeed's checkpoint engine, wrapped: hashing
writer, snapshot buffers, mapped loads) is `worker/checkpoint_engine.py`. torch is imported inside
the functions.
"""

from __future__ import annotations

import copy
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.rundir.checkpoints import (
    PARTIAL_PREFIX,
    checkpoints_dir,
    finalize_checkpoint,
    latest_valid_checkpoint,
    list_checkpoints,
    read_client_state,
    tag_for_step,
    verify_checkpoint,
)
from worker.checkpoint_engine import (
    SnapshotBuffers,
    base_optimizer,
    hashing_engine,
    optimizer_tensors,
    own_loaded_state,
    relpath,
    write_hashed,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SaveResult:
    tag: str
    path: Path
    save_s: float
    """Seconds from the call until the checkpoint was published (a background save: its write too)."""
    bytes: int
    stall_s: float | None = None
    """A background save: the seconds training waited (the snapshot); None for a synchronous one."""


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_entries(mine: dict[str, Any], group: Any = None) -> list[Any]:
    """Every rank's `mine`, in rank order (a list of one without a process group)."""
    import torch.distributed as dist

    if not _distributed():
        return [mine]
    shares: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(shares, mine, group=group)
    return shares


def _prepare(run_dir: str | Path, step: int, rank: int) -> tuple[str, Path, Path]:
    """(tag, checkpoints/, .partial-<tag>/): rank 0 makes the empty staging folder; barrier."""
    tag = tag_for_step(step)
    root = checkpoints_dir(run_dir)
    partial = root / f"{PARTIAL_PREFIX}{tag}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    _barrier()
    return tag, root, partial


def save_checkpoint(
    engine: Any,
    run_dir: str | Path,
    step: int,
    client_state: dict[str, Any],
    *,
    rank: int,
    keep: int | None,
    hold_save_s: float = 0.0,
) -> SaveResult:
    """Save a checkpoint of `engine` for `step`; every rank calls it (see the module docstring)."""
    started = time.perf_counter()
    tag, root, partial = _prepare(run_dir, step, rank)
    hashing = hashing_engine(engine)
    with hashing.recording("hash", partial / tag):
        engine.save_checkpoint(str(partial), tag=tag, client_state=client_state, save_latest=False)
    mine = hashing.durable_entries()
    if hold_save_s:
        logger.warning("MOE_ORCH_FAULT hold_save: sleeping %.1f s before the manifest", hold_save_s)
        time.sleep(hold_save_s)
    known: dict[str, dict[str, Any]] = {}
    for share in _gather_entries(mine):
        known.update(share)
    total = 0
    if rank == 0:
        total = finalize_checkpoint(run_dir, tag, step, client_state, keep, known)
    _barrier()
    elapsed = time.perf_counter() - started
    return SaveResult(tag=tag, path=root / tag, save_s=elapsed, bytes=total)


class BackgroundSave:
    """A checkpoint whose files a thread writes and publishes (`start_background_save`)."""

    def __init__(self, tag: str, path: Path, step: int, started: float) -> None:
        self.tag, self.path, self.step, self.started = tag, path, step, started
        self.stall_s = 0.0
        self.result: SaveResult | None = None
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def done(self) -> bool:
        return self.thread is None or not self.thread.is_alive()

    def wait(self, timeout: float | None = None) -> SaveResult:
        """Block until the checkpoint is published (or the thread failed: its error is raised)."""
        if self.thread is not None:
            self.thread.join(timeout)
            if self.thread.is_alive():
                raise TimeoutError(f"the background save of {self.tag} is still writing after {timeout} s")
        if self.error is not None:
            raise RuntimeError(f"the background save of {self.tag} failed: {self.error}") from self.error
        assert self.result is not None
        return self.result


def start_background_save(
    engine: Any,
    run_dir: str | Path,
    step: int,
    client_state: dict[str, Any],
    *,
    rank: int,
    keep: int | None,
    hold_save_s: float = 0.0,
    on_done: Callable[[SaveResult], None] | None = None,
) -> BackgroundSave:
    """Snapshot `engine`'s checkpoint state for `step` and write it in a thread; every rank calls it,
    never while an earlier BackgroundSave is unfinished. Returns once the snapshot is taken; the
    thread then writes, hashes and fsyncs this rank's files, gathers the ranks' entries and (rank
    0) publishes the checkpoint, then calls `on_done` (in the thread)."""
    import torch.distributed as dist

    started = time.perf_counter()
    tag, root, partial = _prepare(run_dir, step, rank)
    hashing = hashing_engine(engine)
    if hashing.group is None and _distributed():
        hashing.group = dist.new_group(backend="gloo")  # every rank, at the same save
    # NOTE: the previous background save's buffers only once its thread handed them back (its files
    # are written); the caller never starts a save while one is unfinished, so this is the rule.
    buffers, hashing.spare = hashing.spare or SnapshotBuffers(), None
    kept = buffers.nbytes()
    hashing.buffers = buffers
    try:
        with hashing.recording("snapshot", partial / tag):
            engine.save_checkpoint(str(partial), tag=tag, client_state=client_state, save_latest=False)
    finally:
        hashing.buffers = None
    if buffers.nbytes() != kept:
        logger.info("background saves keep %.1f MB of CPU memory on this rank for their snapshots",
                    buffers.nbytes() / 1e6)  # fmt: skip
    snapshots, folder = hashing.snapshots, partial / tag
    pending = BackgroundSave(tag, root / tag, step, started)
    client_state = copy.deepcopy(client_state)

    def write() -> None:
        mine: dict[str, Any] = {}
        failure: str | None = None
        try:
            writers = []
            try:
                for path, state in snapshots:
                    writers.append(write_hashed(state, path))
                    mine[relpath(path, folder)] = writers[-1].entry()
            finally:
                snapshots.clear()
                hashing.spare = buffers  # written (or failed): the next snapshot may copy into them
            for writer in writers:
                writer.close()
            if hold_save_s:
                logger.warning("MOE_ORCH_FAULT hold_save: sleeping %.1f s before the manifest", hold_save_s)
                time.sleep(hold_save_s)
        except BaseException as exc:  # every rank's thread must still join the gather below
            failure = f"rank {rank}: {type(exc).__name__}: {exc}"
            pending.error = exc
        try:
            shares = _gather_entries({"entries": mine, "error": failure}, hashing.group)
            errors = [s["error"] for s in shares if s["error"]]
            if errors:
                raise RuntimeError("; ".join(errors))
            total = 0
            if rank == 0:
                known: dict[str, dict[str, Any]] = {}
                for share in shares:
                    known.update(share["entries"])
                total = finalize_checkpoint(run_dir, tag, step, client_state, keep, known)
            pending.result = SaveResult(
                tag=tag, path=root / tag, save_s=time.perf_counter() - started, bytes=total,
                stall_s=pending.stall_s,
            )  # fmt: skip
            if on_done is not None:
                on_done(pending.result)
        except BaseException as exc:
            pending.error = pending.error or exc
            logger.error("the background save of %s failed: %s", tag, exc)

    pending.stall_s = time.perf_counter() - started
    pending.thread = threading.Thread(target=write, name=f"ckpt-{tag}", daemon=True)
    pending.thread.start()
    return pending


def select_resume_checkpoint(run_dir: str | Path, rank: int, world_size: int) -> Path | None:
    """The newest checkpoint whose manifest verifies (the digest of every file), all ranks agreeing.

    Every rank calls it. Rank 0 lists the candidates (one view of a shared filesystem); every rank
    hashes a share of each candidate's files, newest first, and the ranks all-reduce the verdict.
    """
    import torch
    import torch.distributed as dist

    if world_size == 1 or not dist.is_initialized():
        return latest_valid_checkpoint(run_dir)
    listing: list[Any] = [[str(i.path) for i in list_checkpoints(run_dir)] if rank == 0 else None]
    dist.broadcast_object_list(listing, src=0)
    for path in reversed([Path(p) for p in listing[0]]):
        ok = verify_checkpoint(path, rank=rank, world_size=world_size)
        verdict = torch.tensor([1 if ok else 0], dtype=torch.long)
        dist.all_reduce(verdict, op=dist.ReduceOp.MIN)
        if int(verdict):
            return path
        if rank == 0:
            logger.warning(
                "checkpoint %s is incomplete or damaged (manifest does not verify); skipping it", path
            )
    return None


def load_checkpoint(engine: Any, path: str | Path) -> dict[str, Any]:
    """Load weights, optimizer and scheduler from checkpoint folder `path` (one that verified:
    `select_resume_checkpoint`); returns its client state. The files are mapped, not read (see
    the module docstring); no tensor of the engine stays backed by one when it returns."""
    folder = Path(path)
    hashing = hashing_engine(engine)
    base = base_optimizer(engine)
    before = optimizer_tensors(base)  # the moments now: the loaded ones are copied into them
    hashing.mapped = set()
    try:
        load_path, _ = engine.load_checkpoint(
            str(folder.parent), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {folder}")
        own_loaded_state(base, hashing.mapped, before)
    finally:
        hashing.mapped = None
    return read_client_state(folder)
