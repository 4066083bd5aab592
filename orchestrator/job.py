"""The function submitit runs on every rank: set the config's environment, run the worker.

It is pickled by reference (`orchestrator.job.run_worker`), so the compute nodes need this package
importable by `cluster.python`. torch is imported only by the worker, after the environment is set
(OMP_NUM_THREADS must be set before torch starts).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

logger = logging.getLogger(__name__)


class WorkerFailedError(RuntimeError):
    """The worker returned a non-zero exit code (its traceback is in the rank's .err log)."""


def run_worker(run_yaml: str, run_dir: str, env: Mapping[str, str]) -> int:
    """Run `python -m worker --config run_yaml --run-dir run_dir` in this process."""
    os.environ.update({str(k): str(v) for k, v in env.items()})
    from worker.__main__ import main  # imported here: torch is heavy and set up by the env above

    code = main(["--config", run_yaml, "--run-dir", run_dir])
    if code:
        raise WorkerFailedError(
            f"worker exited with code {code}; see the rank's log (moe-orch logs --stderr)"
        )
    return 0
