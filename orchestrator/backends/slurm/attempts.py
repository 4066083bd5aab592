"""Attempts from one squeue/sacct snapshot: the SLURM half of `lifecycle.reconcile`.

The worker's events come first (`reconcile.apply_events`); the snapshot then closes attempts that
died without an `exit` event (killed, NODE_FAIL, OUT_OF_MEMORY, PREEMPTED without a signal), tells
whether SLURM requeued the job, and, after `LOST_AFTER_S` absent from both squeue and sacct (sacct
lags about a second behind a state change, so absence alone is not proof), declares it lost.

An ended attempt whose job the scheduler still shows alive is `slurm_state` `finishing` (the ranks
are leaving, sacct lags) until the scheduler's final state and exit code arrive.
"""

from __future__ import annotations

from orchestrator.backends.slurm.scheduler import (
    ALIVE_STATES,
    SUBMIT_SLACK_S,
    AcctRow,
    QueueRow,
    Snapshot,
    expand_nodelist,
    rows_since,
    stop_reason_for,
)
from orchestrator.rundir import runs
from orchestrator.rundir.runs import Attempt, AttemptState, RunRecord, StopReason

LOST_AFTER_S = 60.0
"""An attempt absent from squeue and sacct this long after it was last seen is lost."""


def _queue_row(snap: Snapshot, att: Attempt, first_submit: float | None) -> QueueRow | None:
    row = snap.queue.get(att.job_id or "")
    if row is None:
        return None
    if first_submit is not None and row.submit is not None and row.submit < first_submit - SUBMIT_SLACK_S:
        return None  # an older job with a reused id
    return row


def _acct_row(snap: Snapshot, att: Attempt, first_submit: float | None) -> AcctRow | None:
    rows = rows_since(snap.acct.get(att.job_id or "", []), first_submit)
    if not rows:
        return None
    # sacct -D: one row per run of the job, oldest first; row i is restart i.
    return rows[att.restart] if att.restart < len(rows) else None


def apply_scheduler(rec: RunRecord, snap: Snapshot, now: float) -> None:
    """Close or update attempts from squeue/sacct (SLURM runs)."""
    first_submit: dict[str, float | None] = {}
    for att in rec.attempts:
        if att.job_id and att.job_id not in first_submit:
            first_submit[att.job_id] = att.submitted
    for att in rec.attempts:
        if not att.job_id:
            continue
        latest_of_job = att is [a for a in rec.attempts if a.job_id == att.job_id][-1]
        q = _queue_row(snap, att, first_submit.get(att.job_id))
        acct = _acct_row(snap, att, first_submit.get(att.job_id))
        if acct is not None and acct.final:
            att.slurm_state = acct.state + (f" by {acct.cancelled_by}" if acct.cancelled_by else "")
            att.exit_code = acct.exit_code
        if att.state == AttemptState.ENDED:
            if acct is None or not acct.final:
                shown_alive = att.slurm_state is not None and att.slurm_state.split()[0] in ALIVE_STATES
                if q is not None and not q.alive and latest_of_job:
                    att.slurm_state = q.state  # finished, sacct not there yet
                elif shown_alive or (att.slurm_state is None and latest_of_job and q is not None and q.alive):
                    # NOTE: the worker's exit event comes before the scheduler's final record (the
                    # ranks are still leaving; sacct lags about a second): an ended attempt is never
                    # shown RUNNING.
                    att.slurm_state = runs.SLURM_FINISHING
            if acct is not None and acct.state == "REQUEUED" and not att.requeued:
                # SLURM requeued the job itself (`scontrol requeue`, preemption): the worker's
                # exit event may say it could not requeue; the job comes back all the same.
                att.requeued = True
            continue
        if q is not None and q.alive and latest_of_job:
            att.last_seen_alive = now
            if att.started and q.state in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"):
                # The job was requeued (by the worker, by SLURM on preemption or node failure).
                att.state = AttemptState.ENDED
                att.requeued = True
                att.ended = (acct.end if acct else None) or now
                att.stop_reason = (stop_reason_for(acct.state) if acct else None) or StopReason.PREEMPTED
            else:
                att.slurm_state = q.state
                if not att.nodes and q.nodelist:
                    att.nodes = expand_nodelist(q.nodelist)
            continue
        final_state: str | None = None
        ended: float | None = None
        if acct is not None and acct.final:
            final_state, ended = acct.state, acct.end
        elif q is not None and not q.alive and latest_of_job:
            final_state = q.state
        if final_state is not None:
            att.state = AttemptState.ENDED
            att.ended = ended or now
            att.slurm_state = att.slurm_state or final_state
            att.stop_reason = stop_reason_for(final_state) or StopReason.FAILED
            if acct is not None and acct.state in ("NODE_FAIL", "PREEMPTED", "REQUEUED"):
                att.requeued = q is not None and q.alive
            if att.stop_reason not in (StopReason.COMPLETED, StopReason.CANCELLED) and not att.error:
                att.error = f"SLURM state {final_state} without an exit event from the worker"
            continue
        seen = att.last_seen_alive or att.submitted or now
        if not snap.errors and now - seen > LOST_AFTER_S:
            att.state = AttemptState.ENDED
            att.ended = now
            att.stop_reason = StopReason.FAILED
            att.error = "the job vanished from squeue and sacct without an exit event"
