"""Hangs seen from outside the job (`watch`), and the nodes a hang or a straggler keeps out.

The ranks' own watchdogs (worker.heartbeat, worker.hang) handle a rank stuck while its process
still runs. What they cannot handle is a job whose every process is frozen (SIGSTOP, a wedged
driver holding the GIL): their heartbeats go silent. `watch` reads the running attempt's heartbeats
at each poll (`frozen_attempt`); when every rank is silent for longer than the stall limit the
ranks stated (or no rank made progress long after that limit), it writes the same `hang` event the
worker would (detected by `watch`) and an `exit` event with stop reason `hung`, then kills the
job (`Backend.kill`: SIGKILL, as a frozen process can save nothing). The next poll finds the run
`stopped` and `watch` resubmits it, within `cluster.max_hangs`.

`nodes_to_exclude`: the next attempt's `--exclude` gains a hang suspect's node (and, with
`cluster.exclude_stragglers`, a straggler's) only when the partition keeps enough other nodes for
the job (`backends.nodelist.plan_exclusion`); otherwise the run retries on the same nodes and says so.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import yaml

from orchestrator.backends import backend_for
from orchestrator.backends.nodelist import plan_exclusion
from orchestrator.errors import SchedulerError
from orchestrator.lifecycle.poll import RunView
from orchestrator.rundir import heartbeats, reports
from orchestrator.rundir.heartbeats import Diagnosis
from orchestrator.rundir.runs import AttemptState, RunRecord, RunState, StopReason

logger = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_S = 10.0


def frozen_attempt(view: RunView, now: float | None = None) -> Diagnosis | None:
    """The diagnosis of the running attempt when its heartbeats say it is frozen, else None."""
    rec = view.record
    cur = rec.current
    if rec.state != RunState.RUNNING or cur is None or not cur.attempt_key:
        return None
    if cur.state != AttemptState.RUNNING:
        return None
    beats = heartbeats.read_heartbeats(view.run_dir, cur.attempt_key)
    if not beats:
        return None
    stamp = now if now is not None else time.time()
    beat_s = max(float(b.get("heartbeat_s") or DEFAULT_HEARTBEAT_S) for b in beats.values())
    limit = heartbeats.stall_limit_s(beats, None) or 1800.0
    if not heartbeats.frozen(beats, stamp, heartbeat_s=beat_s, limit_s=limit):
        return None
    return heartbeats.diagnose(beats, stamp, heartbeat_s=beat_s)


def end_frozen_attempt(view: RunView, diag: Diagnosis, now: float | None = None) -> str:
    """Record the hang (events `hang` and `exit`, as the worker would) and kill the job."""
    rec = view.record
    cur = rec.current
    assert cur is not None and cur.attempt_key and cur.job_id
    stamp = now if now is not None else time.time()
    beats = heartbeats.read_heartbeats(view.run_dir, cur.attempt_key)
    last_progress = max((float(b.get("last_progress") or 0.0) for b in beats.values()), default=stamp)
    hangs = 1 + sum(1 for ev in reports.read_events(view.run_dir) if ev.get("event") == "hang")
    budget = int(rec.budgets.get("max_hangs", 2))
    note = f"hang {hangs} of cluster.max_hangs={budget}; every rank frozen: killed by watch"
    reports.append_event(
        view.run_dir, "hang", attempt_key=cur.attempt_key, step=max((r.step or 0) for r in diag.ranks),
        detected_by="watch", stall_limit_s=heartbeats.stall_limit_s(beats, None), last_progress=last_progress,
        hang_s=round(stamp - last_progress, 1),
        stacks=None, note=note, **diag.to_dict(),
    )  # fmt: skip
    main = beats.get(0) or {}
    reports.append_event(
        view.run_dir, "exit", reason=StopReason.HUNG, step=main.get("step"), requeued=False,
        error=f"hung: {diag.summary()} (frozen: no heartbeat; killed by watch)",
        ledger=_ledger_until(main, stamp), train_s=main.get("train_s"), attempt_key=cur.attempt_key,
    )  # fmt: skip
    try:
        backend_for(rec.executor).kill(cur.job_id)
    except SchedulerError as exc:
        logger.warning("killing the frozen job %s: %s", cur.job_id, exc)
    return f"{rec.run_id}: attempt {cur.number} hung ({diag.summary()}); killed job {cur.job_id}"


def _ledger_until(beat: dict[str, Any], now: float) -> dict[str, float]:
    """Rank 0's last ledger, its current phase extended to `now` (the frozen time)."""
    ledger = {str(k): float(v) for k, v in (beat.get("ledger") or {}).items()}
    written = beat.get("written")
    if isinstance(written, (int, float)) and beat.get("phase"):
        phase = str(beat["phase"])
        ledger[phase] = ledger.get(phase, 0.0) + max(0.0, now - float(written))
    return ledger


def nodes_to_exclude(run_dir: Path, rec: RunRecord) -> tuple[list[str], str]:
    """Nodes to add to the next attempt's `--exclude` after the last attempt's hang suspects (and
    its stragglers, with `cluster.exclude_stragglers`), and a sentence saying what was decided."""
    cur = rec.current
    if cur is None:
        return [], ""
    hosts: list[str] = []
    if cur.stop_reason == StopReason.HUNG and cur.hang:
        # NOTE: "?" is a rank whose node nobody could tell (no heartbeat, an odd layout).
        suspects = cur.hang.get("suspects") or []
        hosts += [str(s["host"]) for s in suspects if s.get("host") not in (None, "", "?")]
    if rec.budgets.get("exclude_stragglers"):
        hosts += [str(s.get("host")) for s in cur.stragglers if s.get("host")]
    hosts = sorted(set(hosts) - set(rec.excluded_nodes))
    if not hosts:
        return [], ""
    cluster = _cluster_section(run_dir)
    pool = backend_for(rec.executor).node_pool(cluster.get("partition"))
    if not pool:
        return [], f"not excluding {','.join(hosts)}: the scheduler has no other nodes to offer"
    new, sentence = plan_exclusion(hosts, pool, rec.excluded_nodes, int(cluster.get("nodes") or 1))
    return ([h for h in (new or []) if h not in rec.excluded_nodes], sentence)


def _cluster_section(run_dir: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load((run_dir / "run.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    cluster = data.get("cluster") if isinstance(data, dict) else None
    return cluster if isinstance(cluster, dict) else {}
