"""The function submitit runs on every rank: set the config's environment, run the worker.

It is pickled by reference (`orchestrator.lifecycle.job.run_worker`), so the compute nodes need this package
importable by `cluster.python`. torch is imported only by the worker, after the environment is set
(OMP_NUM_THREADS must be set before torch starts).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import time
from collections.abc import Mapping

from orchestrator.errors import WorkerFailedError
from orchestrator.rundir import access, runs
from orchestrator.rundir.exitcodes import EXIT_COMPLETED, EXIT_FAILED, EXIT_STOPPED

logger = logging.getLogger(__name__)

ATTEMPT_MARKER = "=== moe-orch attempt "
"""Start of the line every rank writes to its stdout and stderr when it starts: `logs` splits the
per-rank files (SLURM requeues append to them) into attempts at these lines."""


def attempt_key() -> str:
    """`<job_id>.<restart>` as the worker's start event writes it (local: `<pid>.0`)."""
    from orchestrator.backends.slurm.injob import slurm_job_id

    job_id = slurm_job_id(os.environ) or os.environ.get("SUBMITIT_LOCAL_JOB_ID") or str(os.getpid())
    return runs.attempt_key(job_id, int(os.environ.get("SLURM_RESTART_COUNT") or 0))


def marker_line(key: str, rank: str) -> str:
    return f"{ATTEMPT_MARKER}{key} rank {rank} start {time.time():.3f} ==="


def run_worker(run_yaml: str, run_dir: str, env: Mapping[str, str]) -> int:
    """Run `python -m worker --config run_yaml --run-dir run_dir` in this process."""
    os.environ.update({str(k): str(v) for k, v in env.items()})
    # What the ranks write (checkpoints/, tb/, logs) is no more open than the run directory, whatever
    # umask the scheduler started the job with (orchestrator/rundir/access.py).
    os.umask(access.run_dir_umask(run_dir))
    rank = os.environ.get("SLURM_PROCID") or os.environ.get("SUBMITIT_LOCAL_GLOBALID") or "0"
    line = marker_line(attempt_key(), rank)
    print(line, flush=True)
    print(line, file=sys.stderr, flush=True)
    # imported here: torch is heavy and set up by the env above
    from worker.__main__ import exit_process, main

    code = main(["--config", run_yaml, "--run-dir", run_dir])
    # NOTE: submitit writes its result pickle after we return; then the process must end without
    # the interpreter's teardown, which can abort (SIGABRT, exit 134) on a gloo thread
    # (worker.__main__.exit_process). atexit runs while the interpreter is still whole.
    ok = code in (EXIT_COMPLETED, EXIT_STOPPED)
    atexit.register(exit_process, EXIT_COMPLETED if ok else EXIT_FAILED)
    if ok:
        # 75: stopped on a signal after a durable checkpoint (requeued, or resumable): not an error.
        return code
    if code:
        raise WorkerFailedError(
            f"worker exited with code {code}; see the rank's log (moe-orch logs --stderr)"
        )
    return code
