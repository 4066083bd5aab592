"""When each run's job was last seen alive: one file per home, `<home>/.liveness.json`.

A poll sees every running job alive. The stamp (`Attempt.last_seen_alive`) only bridges the moment
a job has left squeue while sacct does not show it yet (`backends/slurm/attempts.py`
LOST_AFTER_S): it needs neither a run.json rewrite nor durability. Writing it into each run.json
(under the run's lock, fsynced) made every `status` over 500 running runs a second slower (issue
14); now a poll writes the sightings of all its runs to this one file, merges the file back into
the records before reconciling them, and a run.json gets the stamp with its next real change.

Format: `{run folder name: {job id: unix time}}`, only attempts not yet ended. A lost or stale file
costs nothing but the bridge: the stamps in run.json still apply.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from orchestrator.rundir.atomic import atomic_write_text
from orchestrator.rundir.runs import AttemptState, RunRecord

logger = logging.getLogger(__name__)

LIVENESS_FILE = ".liveness.json"

Sightings = dict[str, float]
"""One run's open attempts: job id -> when the poll last saw it alive (unix time)."""


def read(home: Path) -> dict[str, Sightings]:
    """Every run's sightings in `home` (empty when the file is missing or unreadable)."""
    try:
        data = json.loads((home / LIVENESS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        str(run): {str(job): float(t) for job, t in jobs.items() if isinstance(t, (int, float))}
        for run, jobs in data.items()
        if isinstance(jobs, dict)
    }


def apply(rec: RunRecord, seen: Mapping[str, float]) -> None:
    """Bring the open attempts' `last_seen_alive` up to `seen` (never back)."""
    for att in rec.attempts:
        when = seen.get(att.job_id) if att.job_id else None
        if when is not None and att.state != AttemptState.ENDED and (att.last_seen_alive or 0.0) < when:
            att.last_seen_alive = when


def of(rec: RunRecord) -> Sightings:
    """The sightings `rec` holds for its open attempts."""
    return {
        att.job_id: att.last_seen_alive
        for att in rec.attempts
        if att.job_id and att.state != AttemptState.ENDED and att.last_seen_alive is not None
    }


def record(home: Path, updates: Mapping[str, Sightings]) -> None:
    """Merge `updates` (run folder name -> its sightings; empty: forget the run) into the home's
    file: atomically replaced, the newest stamp of each job kept (a second poll, `watch` or
    `status`, may have written meanwhile). A home this user cannot write keeps the old file."""
    merged = read(home)
    for run, jobs in updates.items():
        if jobs:
            old = merged.get(run, {})
            merged[run] = {job: max(t, old.get(job, 0.0)) for job, t in jobs.items()}
        else:
            merged.pop(run, None)
    try:
        atomic_write_text(home / LIVENESS_FILE, json.dumps(merged, sort_keys=True) + "\n")
    except OSError as exc:
        logger.debug("cannot write %s: %s", home / LIVENESS_FILE, exc)
