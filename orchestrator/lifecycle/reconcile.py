"""Bring a run record up to date from the worker's events and one scheduler observation (pure).

Sources, in order of trust:
1. `events.jsonl` (the worker): `start` opens an attempt (keyed by `attempt_key` =
   `<job_id>.<restart>`), `exit` closes it with the worker's own stop reason.
2. What the run's backend saw at the poll (`backends.Observation`, gathered before the events were
   read): it closes attempts that died without an `exit` event and tells whether the job is still
   alive. SLURM (`backends/slurm/attempts.py`, `task_reports.py`): squeue + sacct -D (requeues,
   NODE_FAIL, OUT_OF_MEMORY, PREEMPTED without a signal, a job lost from both), and srun's reports
   of the rank that ended first; submitit's local executor (`backends/local.py`): the controller's pid.

Budgets (`cluster.max_failures`, `max_preemptions`, `max_hangs`, `max_attempts_without_progress`) decide
whether a run whose last attempt stopped without a requeue is `stopped` (watch/resume may
resubmit it) or `failed`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator.backends.base import Observation
from orchestrator.rundir import runs
from orchestrator.rundir.runs import Attempt, AttemptState, RunRecord, RunState, StopReason

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budgets:
    max_failures: int = 3
    max_preemptions: int | None = None
    max_attempts_without_progress: int = 3
    max_hangs: int = 2
    total_time_min: int | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Budgets:
        if not data:
            return cls()
        return cls(
            max_failures=int(data.get("max_failures", 3)),
            max_preemptions=None if data.get("max_preemptions") is None else int(data["max_preemptions"]),
            max_attempts_without_progress=int(data.get("max_attempts_without_progress", 3)),
            max_hangs=int(data.get("max_hangs", 2)),
            total_time_min=None if data.get("total_time_min") is None else int(data["total_time_min"]),
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
                    and other.state != AttemptState.ENDED
                    and other.started
                ):
                    if other.number < att.number:
                        other.state = AttemptState.ENDED
                        other.ended = other.ended or when
                        other.requeued = True
                        other.stop_reason = other.stop_reason or StopReason.PREEMPTED
            att.restart = int(ev.get("restart") or 0)
            att.started = att.started or when
            att.nodes = [str(n) for n in ev.get("nodes") or []] or att.nodes
            att.resumed_from = ev.get("resumed_from")
            att.world_size = ev.get("world_size") if isinstance(ev.get("world_size"), int) else att.world_size
            att.ep_size = ev.get("ep_size") if isinstance(ev.get("ep_size"), int) else att.ep_size
            att.topology_change = ev.get("topology_change") or None
            att.steps_redone = ev.get("steps_redone")
            if ev.get("resumed_step") is not None and att.last_step is None:
                att.last_step = int(ev["resumed_step"])
            if att.state != AttemptState.ENDED:
                att.state = AttemptState.RUNNING
            cur = att
        elif cur is None:
            continue
        elif kind == "first_step":
            cur.first_step = ev.get("step")
            _bump_step(cur, ev.get("step"))
        elif kind in ("checkpoint", "signal"):
            _bump_step(cur, ev.get("step"))
        elif kind == "hang":
            keep = ("detected_by", "step", "hang_s", "stall_limit_s", "summary", "suspects", "waiting")
            cur.hang = {k: ev.get(k) for k in (*keep, "note")}
        elif kind == "straggler":
            entry = {k: ev.get(k) for k in ("rank", "host", "factor", "step")}
            if all(s.get("rank") != entry["rank"] for s in cur.stragglers):
                cur.stragglers.append(entry)
        elif kind == "exit":
            if cur.stop_reason == StopReason.HUNG and cur.state == AttemptState.ENDED:
                continue  # a rank's error after the hang report is its consequence, not the reason
            cur.state = AttemptState.ENDED
            cur.ended = when
            cur.stop_reason = StopReason.parse(ev.get("reason") or StopReason.FAILED)
            _bump_step(cur, ev.get("step"))
            cur.requeued = bool(ev.get("requeued"))
            cur.error = ev.get("error")
            if ev.get("successor"):
                _chained_attempt(rec, cur, str(ev["successor"]), when)
    if progress and rec.attempts:
        key = progress.get("attempt_key")
        for att in rec.attempts:
            if key is not None and att.attempt_key == key:
                _bump_step(att, progress.get("step"))


def _chained_attempt(rec: RunRecord, prev: Attempt, job_id: str, when: Any) -> None:
    """`cluster.continue_with: chain`: the job that `prev`'s job submitted to continue the run (its
    `exit` event names it) is the run's next attempt, pending until its `start` event."""
    if any(a.job_id == job_id for a in rec.attempts):
        return
    rec.attempts.append(
        Attempt(
            number=len(rec.attempts) + 1,
            job_id=job_id,
            submitted=when if isinstance(when, (int, float)) else None,
            exclude=list(prev.exclude),
            note=f"chained by job {prev.job_id} (cluster.continue_with: chain)",
        )
    )


def _bump_step(att: Attempt, step: Any) -> None:
    if isinstance(step, int) and (att.last_step is None or step > att.last_step):
        att.last_step = step


# --- run state and budgets ----------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetVerdict:
    exhausted: bool
    reason: str
    failures: int
    preemptions: int
    no_progress_streak: int


def check_budgets(attempts: list[Attempt], budgets: Budgets) -> BudgetVerdict:
    ended = [a for a in attempts if a.state == AttemptState.ENDED]
    failures = sum(1 for a in ended if a.stop_reason in runs.FAILURE_REASONS)
    hangs = sum(1 for a in ended if a.stop_reason == StopReason.HUNG)
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
    if hangs > budgets.max_hangs:
        why = f"{hangs} hung attempts, more than cluster.max_hangs={budgets.max_hangs}"
        return BudgetVerdict(True, why, failures, preemptions, streak)
    started = [a.started for a in attempts if a.started is not None]
    last_end = max((a.ended for a in ended if a.ended is not None), default=None)
    if budgets.total_time_min is not None and started and last_end is not None:
        total = last_end - min(started)
        if total > budgets.total_time_min * 60:
            cap = budgets.total_time_min
            why = f"ran {total / 60:.1f} min in total, more than cluster.total_time_min={cap}"
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
        rec.state = RunState.PENDING
        return
    if cur.state == AttemptState.RUNNING or (
        cur.state != AttemptState.ENDED and cur.slurm_state in ("RUNNING", "CONFIGURING")
    ):
        # NOTE: the job runs before the worker's start event (imports take seconds).
        rec.state, rec.state_reason = RunState.RUNNING, None
        return
    if cur.state != AttemptState.ENDED:
        rec.state, rec.state_reason = RunState.PENDING, None
        return
    if cur.stop_reason == StopReason.COMPLETED:
        rec.state, rec.state_reason = RunState.COMPLETED, None
        return
    if cur.stop_reason == StopReason.CANCELLED and not cur.requeued:
        rec.state, rec.state_reason = (
            RunState.CANCELLED,
            f"job {cur.job_id} was cancelled ({cur.slurm_state})",
        )
        return
    if job_alive and cur.requeued:
        rec.state, rec.state_reason = (
            RunState.REQUEUED,
            f"attempt {cur.number} {cur.stop_reason}; SLURM requeued it",
        )
        return
    verdict = check_budgets(rec.attempts, budgets)
    if verdict.exhausted:
        rec.state, rec.state_reason = RunState.FAILED, verdict.reason
        return
    rec.state = RunState.STOPPED
    rec.state_reason = f"attempt {cur.number} {cur.stop_reason}" + (f": {cur.error}" if cur.error else "")


def job_alive(rec: RunRecord, observed: Observation | None) -> bool:
    """Whether the poll saw the run's latest job alive (pending, running or requeued)."""
    cur = rec.current
    if cur is None or not cur.job_id or observed is None:
        return False
    return observed.alive(cur.job_id)


def reconcile(
    rec: RunRecord,
    events: list[dict[str, Any]],
    *,
    progress: Mapping[str, Any] | None,
    observed: Observation | None,
    budgets: Budgets,
    now: float,
) -> RunRecord:
    """Update `rec` in place (and return it). Gather `observed` (the backend's `observe`) BEFORE
    reading `events`, so an exit event written just before the process ended is never missed;
    None when the scheduler was not asked (the events alone decide)."""
    apply_events(rec, events, progress)
    if observed is not None:
        observed.apply(rec, events, now)
    derive_state(rec, budgets, job_alive(rec, observed))
    return rec
