"""Who may read the run home and its run directories: their owner only, or also the owner's group.

A run directory holds what its job executes or unpickles (`rendered/sbatch.sh`, submitit's
`logs/*_submitted.pkl`, `run.yaml`) and what it writes (logs with tracebacks, checkpoints), so:

- `MOE_ORCH_HOME_MODE` chooses, per user or team: `owner` (the default) creates the run home and each
  run directory readable by their owner only (0700), `group` readable by the group as well (0750,
  for a team that looks at each other's runs). Never writable by anyone but the owner.
- The files and folders created inside a run directory (`logs/`, `rendered/`, `attempts/`, the
  worker's `checkpoints/`, `tb/`, ...) are no more open than the run directory and never writable by
  group or others: `submit` creates them under the matching umask (`umask`, `files_umask`), which
  sbatch and the local executor hand on to the job, and the job function sets it again
  (`run_dir_umask`). run.json is 0600, 0640 in a run directory shared with the group
  (`private_file_mode`).
- A home that exists keeps its mode: `moe-orch` never changes it. `validate` and `submit` refuse a
  home others may write to (`check_home`): they could replace a run directory, and with it what a
  job runs. A home writable by its group is refused too, unless the runs are shared with the group.

Standard library only (the job function reads it on every rank).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import stat
from collections.abc import Iterator, Mapping
from enum import Enum
from pathlib import Path

from orchestrator.errors import RunHomeError

HOME_MODE_ENV = "MOE_ORCH_HOME_MODE"


class HomeMode(str, Enum):
    """Who may read the run directories (`MOE_ORCH_HOME_MODE`)."""

    OWNER = "owner"
    GROUP = "group"

    def __str__(self) -> str:
        return str(self.value)

    @property
    def dir_mode(self) -> int:
        """The mode of a new run home and of each new run directory."""
        return 0o750 if self is HomeMode.GROUP else 0o700

    @property
    def refused_write(self) -> int:
        """Write bits that make an existing home unsafe: group and others, or others only when
        the runs are shared with the group (whose members may then add runs of their own)."""
        return 0o002 if self is HomeMode.GROUP else 0o022

    @classmethod
    def configured(cls, environ: Mapping[str, str] | None = None) -> HomeMode:
        """`MOE_ORCH_HOME_MODE` (unset or empty: owner); any other value is a RunHomeError."""
        value = (os.environ if environ is None else environ).get(HOME_MODE_ENV, "").strip()
        try:
            return cls(value.lower() or cls.OWNER.value)
        except ValueError:
            raise RunHomeError(
                f"{HOME_MODE_ENV}={value!r} is not a mode of the run home: use owner (the default: runs "
                "readable by you only) or group (readable by your group too)"
            ) from None


def files_umask(dir_mode: int) -> int:
    """The umask under which what is created in a directory of mode `dir_mode` is no more open than
    the directory, and never writable by group or others: 0700 -> 077, 0750 -> 027, 0755 -> 022."""
    return (0o077 & ~dir_mode) | 0o022


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """Create files under the umask `mask` for the duration (the process's umask: a CLI call).

    Processes started meanwhile keep it: the local executor's ranks, and sbatch, which hands it to
    the job (SLURM_UMASK)."""
    before = os.umask(mask)
    try:
        yield
    finally:
        os.umask(before)


def current_umask() -> int:
    """This process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def private_file_mode(directory: Path) -> int:
    """The mode of a file that only the run's readers may see (run.json): 0600, or 0640 in a
    directory shared with its group and no one else (a `group` home's run directory)."""
    try:
        dir_mode = stat.S_IMODE(directory.stat().st_mode)
    except OSError:
        return 0o600
    return 0o640 if dir_mode & 0o050 == 0o050 and not dir_mode & 0o007 else 0o600


def run_dir_umask(run_dir: str | Path) -> int:
    """The umask for creating files in `run_dir` (`submit`, and each rank of its job): no more open than
    the run directory (owner-only when the directory cannot be read)."""
    try:
        return files_umask(Path(run_dir).stat().st_mode)
    except OSError:
        return files_umask(HomeMode.OWNER.dir_mode)


def _fix(path: Path, bits: int) -> str:
    who = "".join(letter for letter, bit in (("g", 0o020), ("o", 0o002)) if bits & bit)
    return f"chmod {who}-w {shlex.quote(str(path))}"


def check_home(home: Path, mode: HomeMode) -> None:
    """Raise RunHomeError when users other than the owner (and the group, for a shared home) may
    write to the existing `home`; a home that does not exist yet is created safe (`make_home`)."""
    try:
        st = home.stat()
    except OSError:
        return  # not there yet (or not readable: creating runs in it fails with its own error)
    open_bits = stat.S_IMODE(st.st_mode) & mode.refused_write
    if not open_bits:
        return
    perms = f"mode {stat.S_IMODE(st.st_mode):04o}"
    if open_bits & 0o002:
        raise RunHomeError(
            f"the run home {home} is writable by every user ({perms}): anyone could replace a run "
            f"directory and what its job runs; remove their write access: {_fix(home, open_bits)}"
        )
    raise RunHomeError(
        f"the run home {home} is writable by its group ({perms}) and {HOME_MODE_ENV} is owner: "
        f"remove the group's write access: {_fix(home, open_bits)}; or share the runs with the group: "
        f"{HOME_MODE_ENV}=group"
    )


def _set_mode(path: Path, mode: int) -> None:
    """Give a directory this process just created exactly `mode` (whatever the umask), keeping the
    set-group-ID bit it may inherit from its parent (the group of a team's folder)."""
    os.chmod(path, mode | (path.stat().st_mode & stat.S_ISGID))


def make_home(home: Path, mode: HomeMode) -> None:
    """Create the run home with `mode.dir_mode` unless it exists (an existing home keeps its mode);
    folders above it are created as any folder is."""
    if home.is_dir():
        return
    try:
        home.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(home, mode.dir_mode)
    except FileExistsError:
        if home.is_dir():
            return  # created meanwhile by another submit
        raise RunHomeError(f"the run home {home} is not a folder; give another --home") from None
    except OSError as exc:
        raise RunHomeError(f"cannot create the run home {home}: {exc.strerror or exc}") from None
    _set_mode(home, mode.dir_mode)


def make_run_dir(run_dir: Path, mode: HomeMode) -> None:
    """Create a run directory with `mode.dir_mode`; FileExistsError when the name is taken."""
    os.mkdir(run_dir, mode.dir_mode)
    _set_mode(run_dir, mode.dir_mode)
