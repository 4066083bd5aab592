"""`watch`, `resume` and `submit --wait`: the reconciler that brings stopped runs back.

SLURM itself restarts a job the worker requeued (USR2/SIGTERM) or one preempted/node-failed with
`--requeue`. What it does not restart is an attempt that died without a requeue: killed, OOM, a
crash, a job gone from squeue without an exit event. `watch` finds those (state `stopped` after
`reconcile`) and resubmits them as a new job of the same run, within the budgets:
`cluster.max_failures`, `cluster.max_preemptions` and `cluster.max_attempts_without_progress`
(crash loop). Nodes that failed an attempt (NODE_FAIL, and `sinfo` says they are down) go to the
next attempt's `--exclude` (the backend's `unhealthy_nodes`), and so do a hung attempt's suspects
when enough nodes remain (lifecycle.hangs). A running attempt whose every rank's heartbeat went
silent is frozen: `watch` records it `hung`, kills it and resubmits it (lifecycle.hangs). A
cancelled run never comes back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from orchestrator.backends import backend_for
from orchestrator.errors import SubmissionError
from orchestrator.lifecycle.hangs import end_frozen_attempt, frozen_attempt, nodes_to_exclude
from orchestrator.lifecycle.poll import RunView, poll
from orchestrator.lifecycle.reconcile import Budgets, check_budgets
from orchestrator.rundir import reports, runs
from orchestrator.rundir.runs import RunRecord, RunState, StopReason

logger = logging.getLogger(__name__)

Echo = Callable[[str], None]


def _failed_nodes(rec: RunRecord) -> list[str]:
    cur = rec.current
    # NOTE: a node lost under a multi-node job often reads as `failed` (a rank on another node
    # errors in its collective and writes the exit event first), so both reasons ask sinfo.
    if cur is None or cur.stop_reason not in (StopReason.NODE_FAIL, StopReason.FAILED):
        return []
    return backend_for(rec.executor).unhealthy_nodes(cur.nodes)


def resume(run_dir: Path, *, note: str | None = None, force: bool = True) -> RunRecord:
    """Resubmit the run once (new job id, same run directory); resumes from its checkpoint.

    Refused for a cancelled or completed run and for one whose job is still alive.
    """
    from orchestrator.lifecycle.submit import resubmit

    view = poll([run_dir])[0]
    rec = view.record
    cur = rec.current
    if rec.state == RunState.CANCELLED or rec.cancel_requested:
        raise SubmissionError(f"run {rec.run_id} was cancelled; a cancelled run never comes back")
    if rec.state == RunState.COMPLETED:
        raise SubmissionError(f"run {rec.run_id} already completed; nothing to resume")
    if rec.state in (RunState.RUNNING, RunState.PENDING, RunState.REQUEUED):
        job = cur.job_id if cur else "?"
        raise SubmissionError(
            f"run {rec.run_id} is {rec.state} (job {job}); wait for it, or `moe-orch cancel` it first"
        )
    if rec.state == RunState.FAILED and not force:
        raise SubmissionError(f"run {rec.run_id} failed: {rec.state_reason}")
    bad = _failed_nodes(rec)
    suspects, decision = nodes_to_exclude(run_dir, rec)
    bad += [n for n in suspects if n not in bad]
    reason = f"attempt {cur.number} {cur.stop_reason}" if cur else "no attempt"

    from orchestrator.lifecycle.reshard import fit_to_usable_nodes

    shrink = fit_to_usable_nodes(run_dir, rec.executor, sorted({*rec.excluded_nodes, *bad}))

    def _prepare(r: RunRecord) -> None:
        for node in bad:
            if node not in r.excluded_nodes:
                r.excluded_nodes.append(node)
        r.state, r.state_reason = RunState.PENDING, None

    runs.update_run(run_dir, _prepare)
    why = note or f"resumed by hand after {reason}"
    if bad:
        why += f"; excluding node(s) {','.join(bad)}"
    if decision:
        why += f" ({decision})"
    if shrink:
        why += f"; {shrink}"
    resubmit(run_dir, note=why)
    return runs.read_run(run_dir)


def act(view: RunView, echo: Echo) -> str | None:
    """What `watch` does for one refreshed run; returns a line describing the action, if any."""
    rec = view.record
    if rec.state == RunState.RUNNING:
        frozen = frozen_attempt(view)
        if frozen is not None:
            return end_frozen_attempt(view, frozen)
    if rec.state == RunState.STOPPED:
        cur = rec.current
        reason = f"attempt {cur.number} {cur.stop_reason}" if cur else RunState.STOPPED.value
        try:
            new = resume(view.run_dir, note=f"resubmitted by watch after {reason}")
        except SubmissionError as exc:
            return f"{rec.run_id}: resubmission failed: {exc}"
        att = new.current
        job = att.job_id if att else "?"
        return f"{rec.run_id}: {reason}; resubmitted as job {job} ({att.note if att else ''})"
    if rec.state == RunState.REQUEUED:
        verdict = check_budgets(rec.attempts, Budgets.from_dict(rec.budgets))
        if verdict.exhausted:

            def _fail(r: RunRecord) -> None:
                r.state, r.state_reason = RunState.FAILED, verdict.reason

            runs.update_run(view.run_dir, _fail)
            if rec.current and rec.current.job_id:
                backend_for(rec.executor).cancel(rec.current.job_id)
            return f"{rec.run_id}: {verdict.reason}; cancelled the requeued job"
    if (
        rec.state == RunState.CANCELLED
        and view.observation is not None
        and rec.current
        and rec.current.job_id
    ):
        job_id = rec.current.job_id
        if backend_for(rec.executor).cancel_again(job_id, view.observation):
            return f"{rec.run_id}: cancelled run still had job {job_id}; cancel sent again"
    return None


def watch_once(run_dirs: list[Path], echo: Echo) -> list[RunView]:
    from orchestrator import notify

    notify.install("watch")  # the events watch writes itself (a frozen job ended as hung)
    views = poll(run_dirs)
    for view in views:
        line = act(view, echo)
        if line:
            echo(line)
        if notify.notifier_for(view.run_dir) is not None:  # what no event of the job tells
            rec = runs.read_run(view.run_dir)
            notify.notify_unreported(view.run_dir, rec, reports.read_events(view.run_dir))
    return views


def watch(home: Path, specs: list[str], *, interval: float, once: bool, echo: Echo) -> list[RunView]:
    """Reconcile the named runs (default: every unfinished run under `home`) every `interval`
    seconds until all are final (or once)."""
    while True:
        if specs:
            dirs = [runs.find_run(home, s) for s in specs]
        else:
            from orchestrator.rundir import sweeps

            every = runs.list_runs(home) + [d for sd in sweeps.list_sweeps(home) for d in runs.list_runs(sd)]
            dirs = [d for d in every if not runs.read_run(d).final]  # sweep elements too
        views = watch_once(dirs, echo)
        for v in views:
            rec = runs.read_run(v.run_dir)  # after any resubmission
            echo(f"{rec.run_id}: {rec.state}" + (f" ({rec.state_reason})" if rec.state_reason else ""))
        if once or all(v.record.final for v in views):
            return views
        time.sleep(interval)


def follow(run_dir: Path, echo: Echo, *, interval: float = 2.0, timeout_s: float | None = None) -> RunRecord:
    """`submit --wait`: poll (and resubmit per the budgets) until the run is final; print state
    changes and progress."""
    last_state = ""
    last_step: int | None = None
    start = time.time()
    while True:
        view = watch_once([run_dir], echo)[0]
        rec = runs.read_run(run_dir)  # after any resubmission
        label = rec.state + (f" ({rec.state_reason})" if rec.state_reason else "")
        if label != last_state:
            cur = rec.current
            job = f" job {cur.job_id}" if cur and cur.job_id else ""
            echo(f"{rec.run_id}: {label}{job}")
            last_state = label
        step = view.step
        if step is not None and step != last_step and view.progress:
            p = view.progress
            loss = p.get("loss")
            loss_s = f" loss {loss:.4f}" if isinstance(loss, (int, float)) else ""
            echo(f"  step {step}/{p.get('total_steps', '?')}{loss_s}")
            last_step = step
        if rec.final:
            return rec
        if timeout_s is not None and time.time() - start > timeout_s:
            return rec
        time.sleep(interval)
