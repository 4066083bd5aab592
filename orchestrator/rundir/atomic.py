"""Durable writes for the run directory: replace a file whole (temp file + `os.replace`), fsync.

Readers of a file written with `atomic_write_text` see the old content or the new, never a part:
`progress.json`, `checkpoints/latest` and every checkpoint's `manifest.json` are written this way
(`run.json` has its own writer in `runs.py`, under the run's lock). No torch here: the orchestrator
and the worker both use it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


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


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old or the new content, never a part.

    The temporary file is `.<name>.tmp-<pid>` next to `path` (created with the umask's mode, as
    `path` would be); it is removed if the write fails.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
