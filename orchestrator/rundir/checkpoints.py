"""Checkpoints on disk, file by file: layout, manifests, verification, `latest`, pruning.

The one module that reads and writes `checkpoints/<tag>/manifest.json`, `client_state.json` and
`checkpoints/latest` (docs/design.md). No torch and no DeepSpeed here: the orchestrator calls it on
the login node (`status`, `export`), and `worker.checkpoint` (the save protocol across ranks, the
engine's load) builds on it.

Layout: `<run_dir>/checkpoints/<tag>/` (tag `step-000120`) holds DeepSpeed's files for that tag,
`client_state.json` (step, epoch, micro-batch position, seeds) and `manifest.json` (`{"tag",
"step", "hash": "xxh3_128", "files": {relpath: {"xxh3_128", "size"}}, "complete": true}`), written
last. The manifest names its hash (`HASH`); one without `"hash"` (written before xxh3_128) holds
sha256 digests and still verifies.

NOTE: xxh3_128 (the `xxhash` package) guards against torn, truncated and bit-flipped files, what a
manifest is for, at ~30 GB/s per core against sha256's ~1.8 GB/s (with SHA-NI): verification on
resume costs about a read of the files instead of 3x. It is not a cryptographic hash: a manifest
does not defend against someone who rewrites both a file and the manifest.
`checkpoints/latest` holds the newest complete tag (written atomically). A save is staged in
`checkpoints/.partial-<tag>/<tag>` and renamed into place by `finalize_checkpoint` after its
manifest.

A checkpoint is valid only when its manifest verifies (`verify_checkpoint`). Export and the
orchestrator use `latest_valid_checkpoint`, which skips (and warns about) incomplete or damaged
ones; the training ranks use `worker.checkpoint.select_resume_checkpoint`, the same choice with
the hashing split over the ranks.

NOTE: all ranks share the run directory (a shared filesystem, as in every SLURM training setup).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from orchestrator.errors import CheckpointError
from orchestrator.rundir.atomic import atomic_write_text, fsync_dir, fsync_file

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
CLIENT_STATE = "client_state.json"
MODEL_STATES = "mp_rank_00_model_states.pt"
"""DeepSpeed's file of the non-expert weights (its `module`), one per checkpoint."""
EXPERT_FILE_RE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")
"""DeepSpeed's file of one expert: MoE layer L (in block order), global expert id E."""
PARTIAL_PREFIX = ".partial-"
TAG_RE = re.compile(r"^step-(\d+)$")
RESHARD_TAG_RE = re.compile(r"^(step-\d+)-(w\d+e\d+)$")
"""A resharded copy of a checkpoint for another topology (`step-000120-w4e2`: 4 ranks, ep_size 2),
written by `worker.reshard` next to the original; `list_checkpoints` leaves it out (training saves
only), pruning a tag removes its resharded copies."""


def tag_for_step(step: int) -> str:
    """`step-000120`: sorts by name in step order up to a million steps."""
    return f"step-{step:06d}"


def step_of_tag(tag: str) -> int | None:
    match = TAG_RE.match(tag)
    return int(match.group(1)) if match else None


def reshard_tag(tag: str, suffix: str) -> str:
    """`step-000120` + `w4e2` -> `step-000120-w4e2`."""
    return f"{tag}-{suffix}"


def resharded_copies(run_dir: str | Path, tag: str) -> list[Path]:
    """The resharded copies of checkpoint `tag` (any topology), valid or not."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if (m := RESHARD_TAG_RE.match(p.name)) and m.group(1) == tag and p.is_dir()
    )


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


HASH = "xxh3_128"
"""The hash of new manifests (`"hash"` in the manifest; each entry's digest under this key)."""
LEGACY_HASH = "sha256"
"""The hash of manifests without `"hash"`, written before xxh3_128."""
HASHES = (HASH, LEGACY_HASH)


class _Digest(Protocol):
    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...


def new_digest(algorithm: str = HASH) -> _Digest:
    """An empty running digest of `algorithm` (one of HASHES)."""
    if algorithm == HASH:
        import xxhash  # a dependency of moe-orch; imported here to keep `moe-orch` import light

        return xxhash.xxh3_128()
    if algorithm == LEGACY_HASH:
        return hashlib.sha256()
    raise ValueError(f"unknown checkpoint hash {algorithm!r}; known: {', '.join(HASHES)}")


def file_digest(path: Path, algorithm: str = HASH) -> str:
    """The hex digest of a file's bytes, read once in 4 MiB chunks into one reused buffer."""
    digest = new_digest(algorithm)
    buffer = bytearray(4 << 20)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def file_entry(digest: str, size: int, algorithm: str = HASH) -> dict[str, Any]:
    """A manifest entry: `{"<algorithm>": digest, "size"}`."""
    return {algorithm: digest, "size": size}


class HashingWriter:
    """A new file written once, front to back, whose digest (`HASH`) is computed from the bytes as
    they pass (no second read of the file). `torch.save(obj, HashingWriter(path))` serializes
    through it; `close()` fsyncs and returns the file's manifest entry.

    NOTE: `xxhash`, `hashlib` and `os.write` release the GIL on large buffers, so a thread writing a
    checkpoint leaves the training thread to run.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self._digest = new_digest(HASH)
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        view = memoryview(data).cast("B")
        n = len(view)
        self._digest.update(view)
        while view:
            view = view[os.write(self._fd, view) :]
        self.size += n
        return n

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Only forward, as torch's zip writer skips metadata-only records: the gap is written as
        zeros (and hashed), so the file is still written front to back."""
        target = offset if whence == os.SEEK_SET else self.size + offset if whence == os.SEEK_CUR else -1
        if target < self.size:
            raise OSError(f"{self.path}: a checkpoint file is written front to back (seek to {target})")
        gap = target - self.size
        while gap:
            chunk = min(gap, 1 << 20)
            self.write(bytes(chunk))
            gap -= chunk
        return self.size

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        """Nothing is buffered here (every write goes to the kernel); `close` makes it durable."""

    def entry(self) -> dict[str, Any]:
        """The manifest entry of what was written so far."""
        return file_entry(self._digest.hexdigest(), self.size, HASH)

    def close(self, *, fsync: bool = True) -> dict[str, Any]:
        """fsync (unless told not to) and close; returns the manifest entry."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        return self.entry()


def hash_files(
    folder: Path, rank: int = 0, world_size: int = 1, algorithm: str = HASH
) -> dict[str, dict[str, Any]]:
    """fsync and hash this rank's share of `folder`'s files (every `world_size`-th, from `rank`)."""
    entries: dict[str, dict[str, Any]] = {}
    for path in _files(folder)[rank::world_size]:
        fsync_file(path)
        rel = path.relative_to(folder).as_posix()
        entries[rel] = file_entry(file_digest(path, algorithm), path.stat().st_size, algorithm)
    return entries


def write_manifest(
    folder: Path,
    tag: str,
    step: int,
    known: dict[str, dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
    algorithm: str = HASH,
) -> int:
    """fsync and hash every file of `folder` not in `known` (entries other ranks computed with
    `algorithm`), then write its manifest (last), with `extra` keys (a resharded copy's
    `resharded_from`). Returns the bytes covered."""
    files = dict(known or {})
    for path in _files(folder):
        rel = path.relative_to(folder).as_posix()
        if rel not in files:
            fsync_file(path)
            files[rel] = file_entry(file_digest(path, algorithm), path.stat().st_size, algorithm)
    total = sum(int(entry["size"]) for entry in files.values())
    manifest = {**(extra or {}), "tag": tag, "step": step, "files": files, "complete": True}
    if algorithm != LEGACY_HASH:
        manifest["hash"] = algorithm
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return total


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The manifest of a checkpoint folder, or None when it is missing or unreadable."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def verify_checkpoint(path: str | Path, *, full: bool = True, rank: int = 0, world_size: int = 1) -> bool:
    """Whether `path` is a complete checkpoint: its manifest lists every file with the right size
    and (when `full`) digest (the manifest's `"hash"`, sha256 when it names none), and no file is
    missing. `full=False` checks sizes only (fast).

    With `world_size` > 1, sizes are checked for every file but only this rank's share
    (`hash_shares`: about 1/world_size of the bytes) is hashed: the ranks split the work and
    combine the answers.
    """
    folder = Path(path)
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("complete") is not True:
        return False
    if not isinstance(manifest.get("files"), dict):
        return False
    files: dict[str, Any] = manifest["files"]
    if not files:
        return False
    for rel, meta in sorted(files.items()):
        try:
            if (folder / rel).stat().st_size != meta["size"]:
                return False
        except (OSError, KeyError, TypeError):
            return False
    if not full:
        return True
    algorithm = manifest.get("hash", LEGACY_HASH)
    if algorithm not in HASHES:
        logger.warning("checkpoint %s: its manifest's hash %r is unknown here (known: %s)", folder, algorithm,
                       ", ".join(HASHES))  # fmt: skip
        return False
    mine = hash_shares({rel: int(meta["size"]) for rel, meta in files.items()}, world_size)[rank]
    return all(file_digest(folder / rel, algorithm) == files[rel].get(algorithm) for rel in mine)


def hash_shares(sizes: dict[str, int], world_size: int) -> list[list[str]]:
    """Split files over `world_size` ranks by bytes (largest first, each to the least loaded rank;
    ties by name), so the ranks hash about as much each. The same answer on every rank."""
    shares: list[list[str]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for rel, size in sorted(sizes.items(), key=lambda item: (-item[1], item[0])):
        r = loads.index(min(loads))
        shares[r].append(rel)
        loads[r] += size
    return shares


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint folder found under `checkpoints/` (not necessarily valid)."""

    tag: str
    step: int
    path: Path


def list_checkpoints(run_dir: str | Path) -> list[CheckpointInfo]:
    """Every `checkpoints/step-*` folder, oldest first (temporary `.partial-*` folders excluded)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        step = step_of_tag(child.name)
        if step is not None and child.is_dir():
            found.append(CheckpointInfo(tag=child.name, step=step, path=child))
    return sorted(found, key=lambda info: info.step)


def choose_checkpoint(run_dir: Path, tag: str | None, purpose: str) -> Path:
    """The checkpoint `tag` of a run, or its newest valid one when `tag` is None, for `purpose`
    ("export", "reshard"); raises CheckpointError naming the checkpoints there when there is none
    or `tag` does not verify."""
    tags = [info.tag for info in list_checkpoints(run_dir)]
    have = f"checkpoints there: {', '.join(tags)}" if tags else "it has no checkpoints yet"
    if tag is None:
        path = latest_valid_checkpoint(run_dir)
        if path is None:
            raise CheckpointError(f"run {run_dir.name} has no valid checkpoint to {purpose} ({have})")
        return path
    path = checkpoints_dir(run_dir) / tag  # also a resharded copy (`<tag>-w<W>e<E>`), not listed
    if not path.is_dir():
        raise CheckpointError(f"run {run_dir.name} has no checkpoint {tag!r} ({have})")
    if not verify_checkpoint(path):
        raise CheckpointError(
            f"checkpoint {tag} of run {run_dir.name} is incomplete or damaged (its manifest does not "
            f"verify); {purpose} another one ({have})"
        )
    return path


def latest_valid_checkpoint(run_dir: str | Path, *, full: bool = True) -> Path | None:
    """The newest checkpoint whose manifest verifies; warns about every newer invalid one."""
    for info in reversed(list_checkpoints(run_dir)):
        if verify_checkpoint(info.path, full=full):
            return info.path
        logger.warning(
            "checkpoint %s is incomplete or damaged (manifest does not verify); skipping it", info.path
        )
    return None


def read_client_state(path: str | Path) -> dict[str, Any]:
    """`client_state.json` of a checkpoint (step, epoch, micro-batch position, seeds)."""
    data: dict[str, Any] = json.loads((Path(path) / CLIENT_STATE).read_text())
    return data


def read_latest_tag(run_dir: str | Path) -> str | None:
    """The tag in `checkpoints/latest` (a hint; `latest_valid_checkpoint` is the authority)."""
    try:
        return (checkpoints_dir(run_dir) / LATEST).read_text().strip() or None
    except OSError:
        return None


def prune_checkpoints(run_dir: str | Path, keep: int | None) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (never the newest valid one). Returns what went."""
    if keep is None:
        return []
    infos = list_checkpoints(run_dir)
    newest_valid = None
    for info in reversed(infos):
        if verify_checkpoint(info.path, full=False):
            newest_valid = info.path
            break
    removed = []
    for info in infos[: max(len(infos) - keep, 0)]:
        if info.path == newest_valid:
            continue
        for sibling in resharded_copies(run_dir, info.tag):
            shutil.rmtree(sibling, ignore_errors=True)
        shutil.rmtree(info.path, ignore_errors=True)
        removed.append(info.path)
    if removed:
        logger.info("pruned %d old checkpoint(s): %s", len(removed), ", ".join(p.name for p in removed))
    return removed


def remove_stale_partials(run_dir: str | Path, keep: str | None = None) -> None:
    """Remove `.partial-*` folders left by saves that never finished (except `keep`)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return
    for child in root.iterdir():
        if child.name.startswith(PARTIAL_PREFIX) and child.name != keep:
            shutil.rmtree(child, ignore_errors=True)


def finalize_checkpoint(
    run_dir: str | Path,
    tag: str,
    step: int,
    client_state: dict[str, Any],
    keep: int | None,
    known: dict[str, dict[str, Any]] | None = None,
    algorithm: str = HASH,
) -> int:
    """Rank 0's half of a save, once every rank's files are in `.partial-<tag>/<tag>`.

    Writes client_state.json and the manifest (`known`: `algorithm` digests the ranks already
    computed), renames the folder into place, updates `latest`, prunes. Returns the bytes of the
    checkpoint.
    """
    root = checkpoints_dir(run_dir)
    partial = root / f"{PARTIAL_PREFIX}{tag}"
    staged = partial / tag
    (staged / CLIENT_STATE).write_text(json.dumps(client_state, indent=1, sort_keys=True) + "\n")
    total = write_manifest(staged, tag, step, known, algorithm=algorithm)
    final = root / tag
    if final.exists():
        # An older, invalid folder with the same tag (a save killed after its rename is impossible,
        # so this is a damaged copy): the new one replaces it.
        shutil.rmtree(final)
    os.replace(staged, final)
    fsync_dir(root)
    shutil.rmtree(partial, ignore_errors=True)
    atomic_write_text(root / LATEST, tag + "\n")
    prune_checkpoints(run_dir, keep)
    remove_stale_partials(run_dir)
    return total


def write_checkpoint_files(
    run_dir: str | Path,
    tag: str,
    step: int,
    client_state: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> int:
    """Publish a checkpoint staged in `.partial-<tag>/<tag>` that is not a training save (a
    resharded copy): client_state.json, the manifest (with `extra`), the rename into place.
    `latest` and pruning are left alone. Returns the bytes of the checkpoint."""
    root = checkpoints_dir(run_dir)
    partial = root / f"{PARTIAL_PREFIX}{tag}"
    staged = partial / tag
    (staged / CLIENT_STATE).write_text(json.dumps(client_state, indent=1, sort_keys=True) + "\n")
    total = write_manifest(staged, tag, step, extra=extra)
    final = root / tag
    if final.exists():
        shutil.rmtree(final)  # an invalid copy (its manifest did not verify): the new one replaces it
    os.replace(staged, final)
    fsync_dir(root)
    shutil.rmtree(partial, ignore_errors=True)
    return total
