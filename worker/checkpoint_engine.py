"""DeepSpeed's checkpoint engine, wrapped: how each checkpoint file reaches the disk and comes back.

`HashingCheckpointEngine` takes the place of `engine.checkpoint_engine` (`hashing_engine`) and, while
`worker/checkpoint.py` saves or loads:
- a synchronous save writes each file through a `HashingWriter` (its xxh3_128 computed from the bytes
  as they are written, never by reading the file back) and fsyncs it in a thread while the next file
  is serialized (`write_hashed`);
- a background save only snapshots what DeepSpeed hands to `torch.save` into CPU memory
  (`cpu_snapshot`), for a thread to write;
- a load maps zip files (`torch.load(mmap=True)`), not read into new memory, so DeepSpeed's `copy_`
  into the engine's parameters and fp32 partitions reads the page cache directly; the optimizer
  moments that torch's `Optimizer.load_state_dict` would adopt as they are (file-backed) are then
  copied into the moments the engine already had, or new memory (`own_loaded_state`).

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

torch is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from orchestrator.rundir.checkpoints import HashingWriter


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
            self.snapshots.append((Path(path), cpu_snapshot(state_dict, buffers=self.buffers)))
        else:
            writer = write_hashed(state_dict, Path(path))
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
        # NOTE: in snapshot mode DeepSpeed must not clone first: `cpu_snapshot` clones the same way
        # (every tensor to its own CPU storage), and twice would double the stall.
        return self.mode != "snapshot" and bool(self.inner.preserves_storage_sharing())

    def _rel(self, path: Path) -> str:
        assert self.folder is not None
        return relpath(path, self.folder)

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


def relpath(path: Path, folder: Path) -> str:
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


def cpu_snapshot(
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
            out[key] = cpu_snapshot(value, memo, buffers)
    elif isinstance(item, list):
        out = [cpu_snapshot(v, memo, buffers) for v in item]
    elif isinstance(item, tuple):
        values = [cpu_snapshot(v, memo, buffers) for v in item]
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


def write_hashed(state: Any, path: Path) -> HashingWriter:
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


def base_optimizer(engine: Any) -> Any:
    """The torch optimizer of `engine` (under ZeRO's wrapper: its `.optimizer`), or None."""
    import torch

    optimizer = getattr(engine, "optimizer", None)
    inner = getattr(optimizer, "optimizer", None)
    base = inner if isinstance(inner, torch.optim.Optimizer) else optimizer
    return base if isinstance(base, torch.optim.Optimizer) else None


def optimizer_tensors(optimizer: Any) -> dict[tuple[int, str], Any]:
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


def own_loaded_state(optimizer: Any, mapped: set[int], before: dict[tuple[int, str], Any]) -> None:
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
