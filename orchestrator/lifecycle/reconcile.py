"""Bring a run record up to date from the worker's events and one scheduler snapshot (pure).

Sources, in order of trust:
1. `events.jsonl` (the worker): `start` opens an attempt (keyed by `attempt_key` =
   `<job_id>.<restart>`), `exit` closes it with the worker's own stop reason.
2. The scheduler snapshot (squeue + sacct -D, or the local controller's pid): closes attempts
   that died without an `exit` event (killed, NODE_FAIL, OUT_OF_MEMORY, PREEMPTED without a
   signal) and tells whether SLURM requeued the job.
3. Time: an attempt that is gone from both squeue and sacct for `LOST_AFTER_S` is declared lost
   (sacct lags about a second behind a state change, so absence alone is not proof).
4. srun's task reports (`slurm.task_exits`): a failed attempt's error names the rank that ended
   first, on which node and how (`rank 1 on n2 was killed by signal 9 (SIGKILL)`), then what its
   peers said (rank 0's `exit` event: typically gloo's "Connection reset by peer").

An ended attempt whose job the scheduler still shows alive is `slurm_state` `finishing` (the ranks
are leaving, sacct lags) until the scheduler's final state and exit code arrive.

Budgets (`cluster.max_failures`, `max_preemptions`, `max_attempts_without_progress`) decide
whether a run whose last attempt stopped without a requeue is `stopped` (watch/resume may
resubmit it) or `failed`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.backends.slurm import (
    ALIVE_STATES,
    SUBMIT_SLACK_S,
    AcctRow,
    QueueRow,
    Snapshot,
    TaskExit,
    expand_nodelist,
    rows_since,
    stop_reason_for,
)
from orchestrator.rundir import runs
from orchestrator.rundir.runs import Attempt, RunRecord

logger = logging.getLogger(__name__)

LOST_AFTER_S = 60.0
"""An attempt absent from squeue and sacct this long after it was last seen is lost."""


@dataclass(frozen=True)
class Budgets:
    max_failures: int = 3
    max_preemptions: int | None = None
    max_attempts_without_progress: int = 3

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Budgets:
        if not data:
            return cls()
        return cls(
            max_failures=int(data.get("max_failures", 3)),
            max_preemptions=None if data.get("max_preemptions") is None else int(data["max_preemptions"]),
            max_attempts_without_progress=int(data.get("max_attempts_without_progress", 3)),
        )


# --- events -----------------------------------------------------------------------------------


def _attempt_for_start(rec: RunRecord, ev: Mapping[str, Any]) -> Attempt:
    key = str(ev.get("attempt_key"))
    job_id = str(ev.get("job_id")) if ev.get("job_id") is not None else key.split(".")[0]
    for att in rec.attempts:
        if att.attempt_key == key:
            return att
    for att in rec.attempts:
        if att.job_id == job_id and att.attempt_key is None:
            att.attempt_key = key
            return att
    restart = int(ev.get("restart") or 0)
    att = Attempt(
        number=len(rec.attempts) + 1,
        job_id=job_id,
        attempt_key=key,
        restart=restart,
        submitted=ev.get("time"),
        exclude=list(rec.attempts[-1].exclude) if rec.attempts else [],
        note=f"requeued by SLURM (restart {restart} of job {job_id})",
    )
    rec.attempts.append(att)
    return att


def apply_events(
    rec: RunRecord, events: list[dict[str, Any]], progress: Mapping[str, Any] | None = None
) -> None:
    """Open and close attempts from the worker's events (idempotent)."""
    cur: Attempt | None = None
    for ev in events:
        kind = ev.get("event")
        when = ev.get("time")
        if kind == "start":
            att = _attempt_for_start(rec, ev)
            # An earlier run of the same job that never wrote `exit` ended when SLURM restarted it.
            for other in rec.attempts:
                if (
                    other is not att
                    and other.job_id == att.job_id
                    and other.state != "ended"
                    and other.started
                ):
                    if other.number < att.number:
                        other.state = "ended"
                        other.ended = other.ended or when
                        other.requeued = True
                        other.stop_reason = other.stop_reason or "preempted"
            att.restart = int(ev.get("restart") or 0)
            att.started = att.started or when
            att.nodes = [str(n) for n in ev.get("nodes") or []] or att.nodes
            att.resumed_from = ev.get("resumed_from")
            att.steps_redone = ev.get("steps_redone")
            if ev.get("resumed_step") is not None and att.last_step is None:
                att.last_step = int(ev["resumed_step"])
            if att.state != "ended":
                att.state = runs.RUNNING
            cur = att
        elif cur is None:
            continue
        elif kind == "first_step":
            cur.first_step = ev.get("step")
            _bump_step(cur, ev.get("step"))
        elif kind in ("checkpoint", "signal"):
            _bump_step(cur, ev.get("step"))
        elif kind == "exit":
            cur.state = "ended"
            cur.ended = when
            cur.stop_reason = str(ev.get("reason") or "failed")
            _bump_step(cur, ev.get("step"))
            cur.requeued = bool(ev.get("requeued"))
            cur.error = ev.get("error")
    if progress and rec.attempts:
        key = progress.get("attempt_key")
        for att in rec.attempts:
            if key is not None and att.attempt_key == key:
                _bump_step(att, progress.get("step"))


def _bump_step(att: Attempt, step: Any) -> None:
    if isinstance(step, int) and (att.last_step is None or step > att.last_step):
        att.last_step = step


# --- scheduler ----------------------------------------------------------------------------------


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
        if att.state == "ended":
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
                att.state = "ended"
                att.requeued = True
                att.ended = (acct.end if acct else None) or now
                att.stop_reason = (stop_reason_for(acct.state) if acct else None) or "preempted"
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
            att.state = "ended"
            att.ended = ended or now
            att.slurm_state = att.slurm_state or final_state
            att.stop_reason = stop_reason_for(final_state) or "failed"
            if acct is not None and acct.state in ("NODE_FAIL", "PREEMPTED", "REQUEUED"):
                att.requeued = q is not None and q.alive
            if att.stop_reason not in ("completed", "cancelled") and not att.error:
                att.error = f"SLURM state {final_state} without an exit event from the worker"
            continue
        seen = att.last_seen_alive or att.submitted or now
        if not snap.errors and now - seen > LOST_AFTER_S:
            att.state = "ended"
            att.ended = now
            att.stop_reason = "failed"
            att.error = "the job vanished from squeue and sacct without an exit event"


def explain_failure(reports: Sequence[TaskExit], worker_error: str | None) -> str | None:
    """A failed attempt's error from srun's task reports (in the order the tasks ended) and rank 0's
    own error (its `exit` event): the rank that ended first is the cause, the rest what followed.
    None when the error already in the record says more."""
    if not reports:
        return None
    cause, *rest = reports
    if worker_error is not None:
        if 0 in cause.ranks:
            return None  # rank 0 ended first and said why (even if it then died at exit)
        # NOTE: rank 0 writes the events, so its error is a symptom when another rank ended first
        # (a dead peer shows as gloo's "Connection reset by peer ... GLHF!").
        return f"{cause.describe()}; then rank 0: {worker_error}"
    if not cause.died:
        return None  # it exited with a code: its pickled traceback says why (status.result_error)
    then = "; ".join(r.describe() for r in rest)
    return cause.describe() + (f"; then {then}" if then else "")


def apply_task_exits(
    rec: RunRecord, task_exits: Mapping[str, Sequence[TaskExit]], worker_errors: Mapping[str, str]
) -> None:
    """Name the rank that ended first in each failed attempt (srun's reports, by job id)."""
    for att in rec.attempts:
        if att.state != "ended" or att.stop_reason != "failed" or not att.job_id:
            continue
        if att is not [a for a in rec.attempts if a.job_id == att.job_id][-1]:
            continue  # srun's reports are those of the job's last run
        explained = explain_failure(task_exits.get(att.job_id, ()), worker_errors.get(att.attempt_key or ""))
        if explained:
            att.error = explained


def _worker_errors(events: list[dict[str, Any]]) -> dict[str, str]:
    """The error of each attempt's `exit` event, by attempt key (rank 0's words)."""
    key: str | None = None
    out: dict[str, str] = {}
    for ev in events:
        if ev.get("event") == "start":
            key = str(ev.get("attempt_key"))
        elif ev.get("event") == "exit" and key is not None and ev.get("error"):
            out[key] = str(ev["error"])
    return out


def apply_local(rec: RunRecord, alive: Mapping[str, bool], now: float) -> None:
    """Close attempts of local jobs whose controller process is gone without an `exit` event."""
    for att in rec.attempts:
        if not att.job_id:
            continue
        if att.state == "ended":
            if att.slurm_state == "RUNNING":  # the worker wrote its exit event
                att.slurm_state = "EXITED"
            continue
        if alive.get(att.job_id, False):
            att.last_seen_alive = now
            att.slurm_state = "RUNNING"
            continue
        att.state = "ended"
        att.ended = now
        att.slurm_state = "EXITED"
        if rec.cancel_requested:
            att.stop_reason = "cancelled"
        else:
            att.stop_reason = "failed"
            att.error = att.error or "the local job ended without an exit event from the worker"


# --- run state and budgets ----------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetVerdict:
    exhausted: bool
    reason: str
    failures: int
    preemptions: int
    no_progress_streak: int


def check_budgets(attempts: list[Attempt], budgets: Budgets) -> BudgetVerdict:
    ended = [a for a in attempts if a.state == "ended"]
    failures = sum(1 for a in ended if a.stop_reason in runs.FAILURE_REASONS)
    preemptions = sum(1 for a in ended if a.stop_reason in runs.PREEMPTION_REASONS)
    best = 0  # step 0: nothing trained yet
    streak = 0
    for att in ended:
        step = att.last_step if att.last_step is not None else 0
        if step > best:
            best = step
            streak = 0
        else:
            streak += 1
    if failures > budgets.max_failures:
        why = f"{failures} failed attempts, more than cluster.max_failures={budgets.max_failures}"
        return BudgetVerdict(True, why, failures, preemptions, streak)
    if budgets.max_preemptions is not None and preemptions > budgets.max_preemptions:
        why = (
            f"{preemptions} preemptions/time limits, "
            f"more than cluster.max_preemptions={budgets.max_preemptions}"
        )
        return BudgetVerdict(True, why, failures, preemptions, streak)
    if streak >= budgets.max_attempts_without_progress:
        why = (
            f"crash loop: {streak} consecutive attempts without a new step "
            f"(cluster.max_attempts_without_progress={budgets.max_attempts_without_progress})"
        )
        return BudgetVerdict(True, why, failures, preemptions, streak)
    return BudgetVerdict(False, "", failures, preemptions, streak)


def derive_state(rec: RunRecord, budgets: Budgets, job_alive: bool) -> None:
    """Set `rec.state` (final states are sticky)."""
    if rec.final:
        return
    cur = rec.current
    if cur is None:
        rec.state = runs.PENDING
        return
    if cur.state == runs.RUNNING or (cur.state != "ended" and cur.slurm_state in ("RUNNING", "CONFIGURING")):
        # NOTE: the job runs before the worker's start event (imports take seconds).
        rec.state, rec.state_reason = runs.RUNNING, None
        return
    if cur.state != "ended":
        rec.state, rec.state_reason = runs.PENDING, None
        return
    if cur.stop_reason == "completed":
        rec.state, rec.state_reason = runs.COMPLETED, None
        return
    if cur.stop_reason == "cancelled" and not cur.requeued:
        rec.state, rec.state_reason = runs.CANCELLED, f"job {cur.job_id} was cancelled ({cur.slurm_state})"
        return
    if job_alive and cur.requeued:
        rec.state, rec.state_reason = (
            runs.REQUEUED,
            f"attempt {cur.number} {cur.stop_reason}; SLURM requeued it",
        )
        return
    verdict = check_budgets(rec.attempts, budgets)
    if verdict.exhausted:
        rec.state, rec.state_reason = runs.FAILED, verdict.reason
        return
    rec.state = runs.STOPPED
    rec.state_reason = f"attempt {cur.number} {cur.stop_reason}" + (f": {cur.error}" if cur.error else "")


def job_alive(rec: RunRecord, snap: Snapshot | None, local_alive: Mapping[str, bool] | None) -> bool:
    cur = rec.current
    if cur is None or not cur.job_id:
        return False
    if rec.executor == "local":
        return bool(local_alive and local_alive.get(cur.job_id))
    if snap is None:
        return False
    q = snap.queue.get(cur.job_id)
    return q is not None and q.alive


def reconcile(
    rec: RunRecord,
    events: list[dict[str, Any]],
    *,
    progress: Mapping[str, Any] | None,
    snapshot: Snapshot | None,
    local_alive: Mapping[str, bool] | None,
    budgets: Budgets,
    now: float,
    task_exits: Mapping[str, Sequence[TaskExit]] | None = None,
) -> RunRecord:
    """Update `rec` in place (and return it). Gather `snapshot`/`local_alive` BEFORE reading
    `events`, so an exit event written just before the process ended is never missed.
    `task_exits`: srun's task reports by job id (`slurm.task_exits`)."""
    apply_events(rec, events, progress)
    if rec.executor == "local":
        apply_local(rec, local_alive or {}, now)
    elif snapshot is not None:
        apply_scheduler(rec, snapshot, now)
    if rec.executor == "slurm" and task_exits:
        apply_task_exits(rec, task_exits, _worker_errors(events))
    derive_state(rec, budgets, job_alive(rec, snapshot, local_alive))
    return rec
