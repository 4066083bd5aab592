"""Saving and loading a DeepSpeed engine's checkpoints, every rank together.

The files themselves (layout, manifests, verification, `latest`, pruning) belong to
`orchestrator.rundir.checkpoints` (no torch); this module adds what needs the engine or
`torch.distributed`.

A save (`save_checkpoint`, every rank calls it):
1. every rank: `engine.save_checkpoint(checkpoints/.partial-<tag>, tag, save_latest=False)`;
2. barrier; every rank fsyncs and sha256-hashes a share of the files (all_gather to rank 0);
   rank 0 writes `client_state.json`, then `manifest.json` (last), renames
   `.partial-<tag>/<tag>` to `checkpoints/<tag>`, fsyncs the folder, replaces `latest`, prunes
   to `keep_checkpoints` (never the newest valid one) and removes stale `.partial-*` folders
   (`finalize_checkpoint`);
3. barrier: when it returns, the checkpoint is durable on every rank's view.

Resume (`select_resume_checkpoint`) picks the newest checkpoint whose manifest verifies, as
`latest_valid_checkpoint` does, with the hashing split over the ranks. torch is imported inside
the functions.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.rundir.checkpoints import (
    PARTIAL_PREFIX,
    checkpoints_dir,
    finalize_checkpoint,
    hash_files,
    latest_valid_checkpoint,
    list_checkpoints,
    read_client_state,
    tag_for_step,
    verify_checkpoint,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SaveResult:
    tag: str
    path: Path
    save_s: float
    bytes: int


def _gather_hashes(folder: Path, rank: int) -> dict[str, dict[str, Any]]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return hash_files(folder)
    world = dist.get_world_size()
    shares: list[Any] = [None] * world
    dist.all_gather_object(shares, hash_files(folder, rank, world))
    merged: dict[str, dict[str, Any]] = {}
    for share in shares:
        merged.update(share)
    return merged


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


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
    tag = tag_for_step(step)
    root = checkpoints_dir(run_dir)
    partial = root / f"{PARTIAL_PREFIX}{tag}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    _barrier()
    engine.save_checkpoint(str(partial), tag=tag, client_state=client_state, save_latest=False)
    if hold_save_s:
        logger.warning("MOE_ORCH_FAULT hold_save: sleeping %.1f s before the manifest", hold_save_s)
        time.sleep(hold_save_s)
    _barrier()
    # NOTE: every rank fsyncs and hashes a share of the files (a 7B checkpoint is ~100 GB: hashing
    # it on rank 0 alone would eat the signal_delay_s budget); rank 0 gathers the entries.
    known = _gather_hashes(partial / tag, rank)
    total = 0
    if rank == 0:
        total = finalize_checkpoint(run_dir, tag, step, client_state, keep, known)
    _barrier()
    elapsed = time.perf_counter() - started
    return SaveResult(tag=tag, path=root / tag, save_s=elapsed, bytes=total)


def select_resume_checkpoint(run_dir: str | Path, rank: int, world_size: int) -> Path | None:
    """The newest checkpoint whose manifest verifies (sha256 of every file), all ranks agreeing.

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
    """Load weights, optimizer and scheduler from checkpoint folder `path`; returns its client state."""
    folder = Path(path)
    load_path, _ = engine.load_checkpoint(
        str(folder.parent), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {folder}")
    return read_client_state(folder)
