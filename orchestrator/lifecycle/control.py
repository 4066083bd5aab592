"""Acting on a live job: whether a local job is alive, and `cancel`.

A local job's id is the pid of submitit's controller process (`python -m submitit.local._local`);
it is alive while that process exists and is not a zombie. `cancel` records the run as
`cancelled` in run.json BEFORE it signals anything, so `watch` and the worker's requeue logic see
it first, then runs `scancel` (SLURM) or sends SIGINT to the local controller.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from orchestrator.errors import MoeOrchError, SchedulerError
from orchestrator.rundir import runs
from orchestrator.rundir.runs import RunRecord

logger = logging.getLogger(__name__)


class NothingToCancelError(MoeOrchError):
    """The run already ended (completed or failed)."""


def local_alive(job_ids: list[str]) -> dict[str, bool]:
    """Whether each local job's controller (pid = job id) is alive and is submitit's."""
    out: dict[str, bool] = {}
    for jid in job_ids:
        out[jid] = _pid_is_local_controller(jid)
    return out


def _pid_is_local_controller(jid: str) -> bool:
    if not jid.isdigit():
        return False
    proc = Path("/proc") / jid
    try:
        stat = (proc / "stat").read_text()
        cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0] if ")" in stat else "?"
    return state not in ("Z", "X") and "submitit" in cmdline


def cancel(run_dir: Path) -> RunRecord:
    """Cancel the run: record `cancelled` first, then scancel (or signal the local job)."""

    def _mark(r: RunRecord) -> None:
        if r.state in (runs.COMPLETED, runs.FAILED):
            raise NothingToCancelError(f"run {r.run_id} already {r.state}; nothing to cancel")
        r.cancel_requested = True
        r.state, r.state_reason = runs.CANCELLED, "cancelled by moe-orch cancel"

    rec = runs.update_run(run_dir, _mark)
    cur = rec.current
    if cur is None or not cur.job_id:
        return rec
    if rec.executor == "local":
        if _pid_is_local_controller(cur.job_id):
            # NOTE: submitit's local controller turns SIGINT into killing its tasks (SIGINT, then
            # SIGKILL after 1 s), like LocalJob.cancel().
            os.kill(int(cur.job_id), signal.SIGINT)
        return rec
    from orchestrator.backends import slurm

    try:
        slurm.scancel(cur.job_id)
    except SchedulerError as exc:
        # A job that already ended cannot be cancelled; the record says cancelled either way.
        if "completed" not in str(exc) and "Invalid job id" not in str(exc):
            raise
        logger.info("%s", exc)
    return rec
