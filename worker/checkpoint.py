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

NOTE: the snapshot's CPU buffers (`SnapshotBuffers`) are kept from one background save to the next,
as torch DCP's async staging keeps its own: the thread hands them back once its files are written,
and the next snapshot copies into them. Copying into memory already faulted in runs at memcpy
speed; fresh buffers pay a page fault and the kernel's zeroing for every 4 KiB (on the bench shape,
145 MB per rank: 67 ms of the 90 ms stall fresh, ~20 ms reused). The cost: every rank keeps one
copy of its own checkpoint files' tensors (its optimizer shard, its experts, rank 0 the non-expert
weights: ~16 B per parameter it holds with fp32 Adam) in CPU memory for the rest of the run, where
a synchronous save or the first background save only needs it for the length of the write.

NOTE: torch's zip writer computes a CRC32 of every record (about as costly as a sha256); saves
turn it off (`torch.serialization.set_crc32_options(False)`): the manifest's digest guards every
byte, and `torch.load` reads such files (only an external `unzip` would complain).

Resume (`select_resume_checkpoint`) picks the newest checkpoint whose manifest verifies, as
`latest_valid_checkpoint` does, with the hashing split over the ranks by bytes; `load_checkpoint`
then loads it with DeepSpeed, whose reads go through `HashingCheckpointEngine.load`: zip files are
mapped (`torch.load(mmap=True)`), not read into new memory, so DeepSpeed's `copy_` into the
engine's parameters and fp32 partitions reads the page cache directly; the optimizer moments that
torch's `Optimizer.load_state_dict` would adopt as they are (file-backed) are copied into the
moments the engine already had (or new memory) before the call returns (`_own_loaded_state`): no
tensor of the engine stays backed by a checkpoint file (which pruning deletes). torch is imported
inside the functions.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.rundir.checkpoints import (
    PARTIAL_PREFIX,
    HashingWriter,
    checkpoints_dir,
    finalize_checkpoint,
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
    """Seconds from the call until the checkpoint was published (a background save: its write too)."""
    bytes: int
    stall_s: float | None = None
    """A background save: the seconds training waited (the snapshot); None for a synchronous one."""


class SnapshotBuffers:
    """The CPU buffers of a background save's snapshot, kept for the next one: the buffer of the
    n-th tensor met in a file (by the file's name in the tag folder) is reused when the tensor
    has the same shape, strides and dtype, and replaced otherwise."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, int], Any] = {}
        self.file = ""
        self.index = 0

    def start_file(self, name: str) -> None:
        self.file, self.index = name, 0

    def copy(self, tensor: Any) -> Any:
        """A CPU copy of `tensor` (detached) in this file's next buffer."""
        import torch

        key = (self.file, self.index)
        self.index += 1
        buffer = self.buffers.get(key)
        if not (
            buffer is not None and buffer.dtype == tensor.dtype and buffer.shape == tensor.shape
            and buffer.stride() == tensor.stride()
        ):  # fmt: skip
            # NOTE: empty_like keeps the strides of a dense tensor (as clone() does) and makes a
            # contiguous one otherwise; a buffer's strides are then its tensor's next time.
            buffer = torch.empty_like(tensor, device="cpu")
            if buffer.stride() != tensor.stride():
                buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
            self.buffers[key] = buffer
        with torch.no_grad():
            buffer.copy_(tensor.detach())
        return buffer

    def nbytes(self) -> int:
        return sum(int(b.untyped_storage().nbytes()) for b in self.buffers.values())


class HashingCheckpointEngine:
    """Wraps the engine's DeepSpeed checkpoint engine (`engine.checkpoint_engine`) so that saves
    hash while writing (`mode` "hash") or only snapshot the state for a background write (`mode`
    "snapshot"), and loads map zip files (`load`); with `mode` None saves go to the wrapped engine."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.mode: str | None = None
        self.folder: Path | None = None  # the tag's folder being saved
        self.entries: dict[str, dict[str, Any]] = {}
        self.fsyncs: list[Future[dict[str, Any]]] = []
        self.snapshots: list[tuple[Path, Any]] = []
        self.buffers: SnapshotBuffers | None = None  # this snapshot's buffers
        self.spare: SnapshotBuffers | None = None  # handed back by a finished background save
        self.mapped: set[int] | None = None  # during `load_checkpoint`: storages of mapped files
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ckpt-fsync")
        self.group: Any = None  # the background saves' gloo group, made at the first one

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def save(self, state_dict: Any, path: str) -> None:
        if self.mode is None:
            self.inner.save(state_dict, path)
        elif self.mode == "snapshot":
            assert self.buffers is not None
            self.buffers.start_file(Path(path).name)
            self.snapshots.append((Path(path), _cpu_snapshot(state_dict, buffers=self.buffers)))
        else:
            writer = _write_hashed(state_dict, Path(path))
            self.fsyncs.append(self.pool.submit(writer.close))
            self.entries[self._rel(Path(path))] = writer.entry()

    def load(self, path: str, map_location: Any = None) -> Any:
        """DeepSpeed's `torch.load` of one checkpoint file: a zip file (every file our saves
        write) is mapped, not read, while `load_checkpoint` collects the mapped storages; another
        (DeepSpeed's legacy format) is read by the wrapped engine."""
        import torch

        if self.mapped is None or not _is_zip(path):
            return self.inner.load(path, map_location=map_location)
        state = torch.load(path, map_location=map_location, weights_only=False, mmap=True)
        _collect_storages(state, self.mapped)
        return state

    def preserves_storage_sharing(self) -> bool:
        # NOTE: in snapshot mode DeepSpeed must not clone first: `_cpu_snapshot` clones the same way
        # (every tensor to its own CPU storage), and twice would double the stall.
        return self.mode != "snapshot" and bool(self.inner.preserves_storage_sharing())

    def _rel(self, path: Path) -> str:
        assert self.folder is not None
        return _relpath(path, self.folder)

    @contextlib.contextmanager
    def recording(self, mode: str, folder: Path) -> Iterator[None]:
        self.mode, self.folder = mode, folder.resolve()
        self.entries, self.fsyncs, self.snapshots = {}, [], []
        try:
            yield
        finally:
            self.mode = None

    def durable_entries(self) -> dict[str, dict[str, Any]]:
        """Wait for this save's fsyncs; the manifest entries of the files this rank wrote."""
        for done in self.fsyncs:
            done.result()
        return dict(self.entries)


def _relpath(path: Path, folder: Path) -> str:
    """`path`'s name in the manifest of the checkpoint folder `folder`."""
    return Path(os.path.relpath(Path(path).resolve(), folder.resolve())).as_posix()


def hashing_engine(engine: Any) -> HashingCheckpointEngine:
    """The engine's `HashingCheckpointEngine`, installed at the first save."""
    current = engine.checkpoint_engine
    if not isinstance(current, HashingCheckpointEngine):
        current = HashingCheckpointEngine(current)
        engine.checkpoint_engine = current
    return current


def _is_zip(path: str | Path) -> bool:
    """Whether `path` is a zip file (torch.save's format since 1.6; `mmap=True` needs it)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _collect_storages(item: Any, into: set[int]) -> None:
    """The data pointers of the storages of every tensor in `item` (dicts, lists, tuples)."""
    import torch

    if isinstance(item, torch.Tensor):
        into.add(item.untyped_storage().data_ptr())
    elif isinstance(item, dict):
        for value in item.values():
            _collect_storages(value, into)
    elif isinstance(item, (list, tuple)):
        for value in item:
            _collect_storages(value, into)


def _cpu_snapshot(
    item: Any, memo: dict[int, Any] | None = None, buffers: SnapshotBuffers | None = None
) -> Any:
    """A copy of `item` that no later optimizer step changes: every tensor copied to CPU memory
    (as DeepSpeed's `clone_tensors_for_torch_save` does; into `buffers` when given), containers
    rebuilt, immutable values shared and other values deep-copied. An object met twice is copied
    once (`memo`), so the pickle keeps the original's sharing."""
    import enum

    import torch

    memo = {} if memo is None else memo
    if item is None or isinstance(item, (bool, int, float, complex, str, bytes, enum.Enum, torch.Size)):
        return item
    if isinstance(item, (torch.dtype, torch.device)):
        return item
    if id(item) in memo:
        return memo[id(item)]
    out: Any
    if isinstance(item, torch.Tensor):
        tensor = item.detach()
        if buffers is not None:
            out = buffers.copy(tensor)
        else:
            out = tensor.clone() if tensor.device.type == "cpu" else tensor.to("cpu")
    elif isinstance(item, dict):
        out = copy.copy(item)  # the same mapping type (OrderedDict, defaultdict), values replaced
        for key, value in item.items():
            out[key] = _cpu_snapshot(value, memo, buffers)
    elif isinstance(item, list):
        out = [_cpu_snapshot(v, memo, buffers) for v in item]
    elif isinstance(item, tuple):
        values = [_cpu_snapshot(v, memo, buffers) for v in item]
        out = type(item)(*values) if hasattr(item, "_fields") else type(item)(values)
    else:
        out = copy.deepcopy(item, memo)
    memo[id(item)] = out
    return out


@contextlib.contextmanager
def _no_crc32() -> Iterator[None]:
    import torch.serialization as ser

    before = ser.get_crc32_options()
    ser.set_crc32_options(False)
    try:
        yield
    finally:
        ser.set_crc32_options(before)


def _write_hashed(state: Any, path: Path) -> HashingWriter:
    """`torch.save(state)` into `path` through a HashingWriter (not yet fsynced nor closed)."""
    import torch

    writer = HashingWriter(path)
    try:
        with _no_crc32():
            torch.save(state, writer)  # type: ignore[arg-type]  # a binary writer, not an IO
    except BaseException:
        writer.close(fsync=False)
        raise
    return writer


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
                    writers.append(_write_hashed(state, path))
                    mine[_relpath(path, folder)] = writers[-1].entry()
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
    base = _base_optimizer(engine)
    before = _optimizer_tensors(base)  # the moments now: the loaded ones are copied into them
    hashing.mapped = set()
    try:
        load_path, _ = engine.load_checkpoint(
            str(folder.parent), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {folder}")
        _own_loaded_state(base, hashing.mapped, before)
    finally:
        hashing.mapped = None
    return read_client_state(folder)


def _base_optimizer(engine: Any) -> Any:
    """The torch optimizer of `engine` (under ZeRO's wrapper: its `.optimizer`), or None."""
    import torch

    optimizer = getattr(engine, "optimizer", None)
    inner = getattr(optimizer, "optimizer", None)
    base = inner if isinstance(inner, torch.optim.Optimizer) else optimizer
    return base if isinstance(base, torch.optim.Optimizer) else None


def _optimizer_tensors(optimizer: Any) -> dict[tuple[int, str], Any]:
    """(id of the parameter, key) -> the state tensor, for every tensor of `optimizer.state`."""
    import torch

    if optimizer is None:
        return {}
    return {
        (id(param), key): value
        for param, state in optimizer.state.items()
        for key, value in state.items()
        if isinstance(value, torch.Tensor)
    }


def _own_loaded_state(optimizer: Any, mapped: set[int], before: dict[tuple[int, str], Any]) -> None:
    """Give the optimizer state tensors that a load left backed by a mapped checkpoint file memory
    of their own: copied into the tensor the same state held before the load when it has the same
    shape, dtype and device (memory already faulted in), or cloned.

    NOTE: torch's `Optimizer.load_state_dict` adopts a loaded tensor of the parameter's dtype and
    device as it is (`.to()` copies nothing), so the moments would otherwise stay file-backed:
    private pages, so training never writes the file, but the mapping would keep the file alive
    after pruning deletes it (on NFS a `.nfs*` file that keeps its folder), and the first step
    would pay copy-on-write faults. DeepSpeed's other loads (`copy_` into parameters and fp32
    partitions) leave nothing mapped.
    """
    import torch

    if optimizer is None or not mapped:
        return
    with torch.no_grad():
        for param, state in optimizer.state.items():
            for key, value in list(state.items()):
                if not (isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() in mapped):
                    continue
                old = before.get((id(param), key))
                if (
                    old is not None and old.shape == value.shape and old.dtype == value.dtype
                    and old.device == value.device and old.untyped_storage().data_ptr() not in mapped
                ):  # fmt: skip
                    old.copy_(value)
                    state[key] = old
                else:
                    state[key] = value.clone()
