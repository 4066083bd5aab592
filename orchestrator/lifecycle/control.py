"""`cancel`: stop a run for good.

`cancel` records the run as `cancelled` in run.json BEFORE it signals anything, so `watch` and the
worker's requeue logic see it first, then asks the run's backend to cancel the job (`scancel`
under SLURM, SIGINT to submitit's local controller).
"""

from __future__ import annotations

import logging
from pathlib import Path

from orchestrator.backends import backend_for
from orchestrator.errors import NothingToCancelError
from orchestrator.rundir import runs
from orchestrator.rundir.runs import RunRecord, RunState

logger = logging.getLogger(__name__)


def cancel(run_dir: Path) -> RunRecord:
    """Cancel the run: record `cancelled` first, then cancel its job (the run's backend)."""

    def _mark(r: RunRecord) -> None:
        if r.state in (RunState.COMPLETED, RunState.FAILED):
            raise NothingToCancelError(f"run {r.run_id} already {r.state}; nothing to cancel")
        r.cancel_requested = True
        r.state, r.state_reason = RunState.CANCELLED, "cancelled by moe-orch cancel"

    rec = runs.update_run(run_dir, _mark)
    cur = rec.current
    if cur is None or not cur.job_id:
        return rec
    # A job that already ended is not an error: the record says cancelled either way.
    backend_for(rec.executor).cancel(cur.job_id)
    return rec
