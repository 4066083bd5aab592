"""Refresh run records: the one place where records meet the scheduler.

`poll` asks each run's backend first (one `observe` per backend for all its runs: one `squeue` + one
`sacct` for every SLURM job of every run, pid checks for local jobs), then reads each run's events,
reconciles its record in memory and rewrites `run.json` (under its lock, fsynced) only when that
changed the record. A job merely seen alive again changes only its liveness stamp: that goes to the
home's one sightings file (`rundir/liveness.py`), not to every run.json. No torch here.

`RunView` is what a poll returns for a run: its record, its progress and what its backend saw.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.backends import Backend, Observation, backend_for
from orchestrator.lifecycle.reconcile import Budgets, reconcile
from orchestrator.redact import redact
from orchestrator.rundir import liveness, reports, runs
from orchestrator.rundir.runs import AttemptState, RunRecord, RunState, StopReason

logger = logging.getLogger(__name__)


@dataclass
class RunView:
    """A refreshed run with what its table row shows."""

    run_dir: Path
    record: RunRecord
    progress: dict[str, Any] | None
    observation: Observation | None
    """What the run's backend saw at this poll (None when the run was not refreshed)."""

    @property
    def step(self) -> int | None:
        if self.progress and isinstance(self.progress.get("step"), int):
            return int(self.progress["step"])
        steps = [a.last_step for a in self.record.attempts if a.last_step is not None]
        return max(steps) if steps else None

    @property
    def total_steps(self) -> int | None:
        total = (self.progress or {}).get("total_steps")
        return int(total) if isinstance(total, int) else None

    def eta_s(self) -> float | None:
        p = self.progress or {}
        step, total, dt = p.get("step"), p.get("total_steps"), p.get("step_time_s")
        if self.record.state != RunState.RUNNING:
            return None
        if not (
            isinstance(step, (int, float))
            and isinstance(total, (int, float))
            and isinstance(dt, (int, float))
        ):
            return None
        return max(0.0, (float(total) - float(step)) * float(dt))


def needs_refresh(run_dir: Path, rec: RunRecord, backend: Backend) -> bool:
    """Whether the poll must refresh the run: it is not final, its backend still has something to
    say about it, or its worker wrote events since the record was written."""
    open_attempt = rec.current is not None and rec.current.state != AttemptState.ENDED
    return not rec.final or open_attempt or backend.needs_scheduler(rec) or _events_newer(run_dir, rec)


def poll(run_dirs: list[Path], *, now: float | None = None) -> list[RunView]:
    """Refresh every run in `run_dirs` (one scheduler query per backend for all) and return their
    views."""
    records: list[tuple[Path, RunRecord, Backend]] = []
    for d in run_dirs:
        try:
            rec = runs.read_run(d)
            records.append((d, rec, backend_for(rec.executor)))
        except Exception as exc:  # a broken run.json must not hide the others
            logger.warning("skipping %s: %s", d, exc)
    stale = [(d, rec, backend) for d, rec, backend in records if needs_refresh(d, rec, backend)]
    observed: dict[Path, Observation] = {}
    for backend in {b.name: b for _, _, b in stale}.values():
        observed.update(backend.observe([(d, rec) for d, rec, b in stale if b.name == backend.name]))
    stamp = now if now is not None else time.time()
    sightings = {home: liveness.read(home) for home in {d.parent for d in observed}}
    new_sightings: dict[Path, dict[str, liveness.Sightings]] = {}
    views: list[RunView] = []
    for d, rec, _ in records:
        progress = reports.read_progress(d)
        if d not in observed:
            views.append(RunView(d, rec, progress, None))
            continue
        known = sightings[d.parent].get(d.name, {})
        refresh = _refresher(d, observed[d], progress, known, stamp)
        # NOTE: refreshed in memory first; run.json is rewritten (under its lock, fsynced) only
        # when that changed more than a liveness stamp: 500 running runs used to cost 500 fsyncs
        # per `status`.
        trial: RunRecord = pickle.loads(pickle.dumps(rec))  # a deep copy (dataclasses.asdict is slow)
        refresh(trial)
        seen_now = liveness.of(trial)
        if seen_now != known:
            new_sightings.setdefault(d.parent, {})[d.name] = seen_now
        if _same_record(rec, trial):
            views.append(RunView(d, trial, progress, observed[d]))
            continue
        try:
            rec = runs.update_run(d, refresh)
        except OSError as exc:  # read-only home: show what we can
            logger.warning("cannot update %s: %s", d, exc)
            rec = trial
        views.append(RunView(d, rec, progress, observed[d]))
    for home, updates in new_sightings.items():
        liveness.record(home, updates)
    return views


def _refresher(
    run_dir: Path,
    seen: Observation,
    progress: dict[str, Any] | None,
    known: liveness.Sightings,
    now: float,
) -> Callable[[RunRecord], None]:
    """The refresh of one run's record: the home's sightings, its events, what its backend saw,
    its budgets (for `runs.update_run`, which hands it the record read under the lock)."""

    def refresh(rec: RunRecord) -> None:
        liveness.apply(rec, known)
        reconcile(
            rec,
            reports.read_events(run_dir),
            progress=progress,
            observed=seen,
            budgets=Budgets.from_dict(rec.budgets),
            now=now,
        )
        _attach_result_errors(rec, run_dir)

    return refresh


def _same_record(before: RunRecord, after: RunRecord) -> bool:
    """Whether a refresh changed nothing worth a run.json write: the same record but for the
    attempts' `last_seen_alive` (the home's sightings file holds those)."""
    # NOTE: the fields' values are plain data (str, numbers, lists, dicts), so the dataclasses'
    # own dicts compare by value, without `dataclasses.asdict`'s deep copy.
    old = {**vars(before), "attempts": [{**vars(a), "last_seen_alive": None} for a in before.attempts]}
    new = {**vars(after), "attempts": [{**vars(a), "last_seen_alive": None} for a in after.attempts]}
    return old == new


def result_error(run_dir: Path, job_id: str) -> str | None:
    """The last line of the first error traceback submitit pickled for `job_id` (a rank that
    raised before the worker could write an `exit` event, e.g. an import error)."""
    for path in sorted((run_dir / "logs").glob(f"{job_id}_*_result.pkl")):
        try:
            with path.open("rb") as f:
                outcome = pickle.load(f)
        except Exception:  # a pickle being written, or one needing unavailable classes
            continue
        if isinstance(outcome, tuple) and len(outcome) == 2 and outcome[0] == "error":
            lines = [ln for ln in str(outcome[1]).strip().splitlines() if ln.strip()]
            if lines:  # a traceback's last line may hold a URL with credentials
                rank = path.name[len(job_id) + 1 :].split("_")[0]  # `<job>_<rank>_result.pkl`
                return redact(f"{lines[-1].strip()} (rank {rank})")
    return None


def _attach_result_errors(rec: RunRecord, run_dir: Path) -> None:
    for att in rec.attempts:
        generic = att.error is None or "without an exit event" in att.error
        if (
            att.state == AttemptState.ENDED
            and att.job_id
            and att.stop_reason == StopReason.FAILED
            and generic
        ):
            found = result_error(run_dir, att.job_id)
            if found:
                att.error = found


def _events_newer(run_dir: Path, rec: RunRecord) -> bool:
    try:
        return reports.events_path(run_dir).stat().st_mtime > rec.updated
    except OSError:
        return False
