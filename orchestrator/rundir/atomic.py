"""Durable writes for the run directory: replace a file whole (temp file + `os.replace`), fsync.

Readers of a file written with `atomic_write_text` see the old content or the new, never a part:
`progress.json`, `checkpoints/latest` and every checkpoint's `manifest.json` are written this way
and so is `run.json` (by `runs.py`, under the run's lock). No torch here: the orchestrator
and the worker both use it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from orchestrator.rundir.access import private_file_mode


def fsync_file(path: Path) -> None:
    """Flush a file that someone else wrote (e.g. DeepSpeed's checkpoint files) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str, *, private: bool = False) -> None:
    """Write `text` to `path` so that readers see the old or the new content, never a part.

    The temporary file sits next to `path` and is removed if the write fails. It is created with
    the umask's mode, as `path` would be, or readable by its owner only when `private` (run.json,
    as it has always been: `tempfile.mkstemp`'s 0600), and by the group of a run directory shared
    with it (`access.private_file_mode`: 0640).
    """
    if private:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp, fh = Path(name), os.fdopen(fd, "w")
    else:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        fh = tmp.open("w")
    try:
        with fh:
            if private:
                os.fchmod(fh.fileno(), private_file_mode(path.parent))
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
