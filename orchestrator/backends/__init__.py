"""Scheduler backends, one per scheduler, each holding both sides (like submitit's `slurm/` and
`local/`): what runs on the login node and what runs inside the job.

- `base.py`: the interface (`Backend` for the login node, `RunningJob` inside the job);
- `slurm/`: SLURM (squeue/sacct/sinfo/scancel, the submitit SLURM executor, scontrol inside the job);
- `local.py`: submitit's local executor (processes on this machine);
- `nodelist.py`: SLURM node-list expansion (`n[1-3]`), shared with the renderer and the worker.

`backend_for(executor)` is the one place that maps `cluster.executor` to a backend. Importing this
package is light (the worker imports the in-job sides): each backend is imported when asked for.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from orchestrator.backends.base import Backend, Observation, RunningJob
from orchestrator.errors import UnknownExecutorError

__all__ = ["EXECUTORS", "Backend", "Observation", "RunningJob", "backend_for"]


def _slurm() -> Backend:
    from orchestrator.backends.slurm.backend import SlurmBackend

    return SlurmBackend()


def _local() -> Backend:
    from orchestrator.backends.local import LocalBackend

    return LocalBackend()


_FACTORIES: dict[str, Callable[[], Backend]] = {"local": _local, "slurm": _slurm}
EXECUTORS = tuple(sorted(_FACTORIES))
"""The executor names a backend exists for (`cluster.executor`)."""


@functools.cache
def backend_for(executor: str) -> Backend:
    """The backend for `executor` (`cluster.executor`, or a run.json's `executor`)."""
    factory = _FACTORIES.get(executor)
    if factory is None:
        raise UnknownExecutorError(
            f"unknown executor {executor!r}: no scheduler backend has this name. "
            f"Valid executors are: {', '.join(EXECUTORS)} (cluster.executor)"
        )
    return factory()
