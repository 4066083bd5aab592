"""`status`: describe runs refreshed by `poll.py` (the table of all runs, one run in detail).

`list_status` is the table of `moe-orch status` (`table_lines` as text): the runs that are not
finished are polled; a finished run that has nothing left to ask (its row cannot change) is read
once and its row kept in `<home>/.status-rows.json` (this module's file: `{"version", "runs":
{run_id: {"run_mtime_ns", "events_mtime_ns", "ended", "created", "row", "eval_loss" (sweep
elements)}}}`), valid while its run.json and events.jsonl keep their mtimes. By default the table
holds the active runs and the `RECENT_FINISHED` most recently ended ones; `--all` every run.

A sweep (`rundir/sweeps.py`) is one row among the runs, in the order of its id's stamp: state
`sweep`, attempts summed over its elements, step its elements counted by state (`1 pending, 1
running, 2 completed`), progress its finished elements, loss its lowest eval loss (`eval 1.2500`;
`status SWEEP` names the element). Its elements go through the same poll and row cache as runs,
so a finished sweep costs a read of sweep.json and two stats per element; it counts as finished
(for the `RECENT_FINISHED` runs shown) once every element is.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.backends import backend_for
from orchestrator.lifecycle.poll import RunView, needs_refresh, poll
from orchestrator.lifecycle.sweep_ops import last_eval_loss
from orchestrator.redact import redact_values
from orchestrator.rundir import checkpoints, goodput, heartbeats, reports, runs, sweeps
from orchestrator.rundir.atomic import atomic_write_text
from orchestrator.rundir.runs import FINAL_STATES, AttemptState, RunRecord, RunState, StopReason
from orchestrator.rundir.sweeps import SweepRecord

logger = logging.getLogger(__name__)


# --- presentation helpers (plain data; the CLI renders them with rich) -------------------------


def human_age(seconds: float) -> str:
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def progress_bar(step: int | None, total: int | None, width: int = 12) -> str:
    if step is None or not total:
        return ""
    filled = min(width, round(width * step / total))
    return "█" * filled + "░" * (width - filled)


def table_rows(views: list[RunView], now: float | None = None) -> list[dict[str, str]]:
    """One row per run: name, state, attempts, step/total + bar, loss, tokens/s, ETA, age."""
    stamp = now if now is not None else time.time()
    rows = []
    for v in views:
        r, p = v.record, v.progress or {}
        step, total = v.step, v.total_steps
        loss = p.get("loss")
        tps = p.get("tokens_per_s")
        eta = v.eta_s()
        rows.append(
            {
                "run": r.run_id,
                "state": r.state,
                "attempts": str(len(r.attempts)),
                "step": (f"{step}/{total}" if total else (str(step) if step is not None else "-")),
                "progress": progress_bar(step, total),
                "loss": f"{loss:.4f}" if isinstance(loss, (int, float)) else "-",
                "tokens/s": f"{tps:,.0f}" if isinstance(tps, (int, float)) else "-",
                "eta": human_age(eta) if eta is not None else "-",
                "age": human_age(stamp - r.created),
            }
        )
    return rows


def format_table(rows: list[dict[str, str]]) -> list[str]:
    """Rows of equal keys as aligned text lines: a header of the keys, columns two spaces apart.

    NOTE: plain text, not a rich Table: rich took about a millisecond per row (a second for a
    1,000-run home)."""
    if not rows:
        return []
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns).rstrip()]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in columns).rstrip() for r in rows]
    return lines


RECENT_FINISHED = 10
"""Finished runs the `status` table shows by default, most recently ended first to go."""
ROW_CACHE = ".status-rows.json"
ROW_CACHE_VERSION = 1


@dataclass
class StatusTable:
    """What `moe-orch status` shows: one row per run (oldest first) and what was left out."""

    rows: list[dict[str, str]]
    hidden_finished: int = 0
    polled: int = 0
    cached: int = 0
    errors: list[str] = field(default_factory=list)


def _mtime_ns(path: Path) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _read_row_cache(home: Path) -> dict[str, Any]:
    try:
        data = json.loads((home / ROW_CACHE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != ROW_CACHE_VERSION:
        return {}
    found = data.get("runs")
    return found if isinstance(found, dict) else {}


def _write_row_cache(home: Path, entries: dict[str, Any]) -> None:
    try:
        text = json.dumps({"version": ROW_CACHE_VERSION, "runs": entries})
        atomic_write_text(home / ROW_CACHE, text + "\n")
    except OSError as exc:  # a home this user may read but not write: no cache, same table
        logger.debug("cannot write %s: %s", home / ROW_CACHE, exc)


def _ended(rec: RunRecord) -> float:
    ends = [a.ended for a in rec.attempts if a.ended is not None]
    return max(ends) if ends else rec.updated or rec.created


def _cached(cache: dict[str, Any], run_dir: Path) -> dict[str, Any] | None:
    """The run's cache entry while its run.json and events.jsonl keep the mtimes it was made with."""
    hit = cache.get(run_dir.name)
    if (
        isinstance(hit, dict)
        and hit.get("run_mtime_ns") == _mtime_ns(run_dir / runs.RUN_FILE)
        and hit.get("events_mtime_ns") == _mtime_ns(reports.events_path(run_dir))
    ):
        return hit
    return None


def _sweeps(home: Path) -> list[tuple[Path, SweepRecord]]:
    found = []
    for sweep_dir in sweeps.list_sweeps(home):
        try:
            found.append((sweep_dir, sweeps.read_sweep(sweep_dir)))
        except Exception as exc:  # a broken sweep.json must not hide the runs
            logger.warning("skipping %s: %s", sweep_dir, exc)
    return found


def _id_stamp(path: Path) -> tuple[str, str]:
    # NOTE: runs.list_runs's order (the id's `-YYYYmmdd-HHMMSS-` stamp, then the name); a sweep id
    # is made like a run id.
    return "-".join(path.name.rsplit("-", 3)[1:3]), path.name


def sweep_row(
    rec: SweepRecord, elements: list[dict[str, str]], eval_losses: list[float | None], now: float
) -> dict[str, str]:
    """A sweep's row in the `status` table (see the module docstring), from its elements' rows."""
    counts = {state: sum(1 for r in elements if r["state"] == state) for state in RunState}
    finished = sum(counts[state] for state in FINAL_STATES)
    scored = [loss for loss in eval_losses if loss is not None]
    return {
        "run": rec.sweep_id,
        "state": "sweep",
        "attempts": str(sum(int(r["attempts"]) for r in elements)),
        "step": ", ".join(f"{n} {state.value}" for state, n in counts.items() if n) or "-",
        "progress": progress_bar(finished, len(rec.elements)),
        "loss": f"eval {min(scored):.4f}" if scored else "-",
        "tokens/s": "-",
        "eta": "-",
        "age": human_age(now - rec.created),
    }


def list_status(
    home: Path, *, show_all: bool = False, recent: int = RECENT_FINISHED, now: float | None = None
) -> StatusTable:
    """The `status` table of every run and sweep under `home` (see the module docstring): the
    active runs and sweep elements polled (one scheduler query per backend for all), finished ones
    from the row cache when it is valid, and by default only the `recent` most recently ended
    finished runs and sweeps."""
    stamp = now if now is not None else time.time()
    cache = _read_row_cache(home)
    fresh: dict[str, Any] = {}
    top = runs.list_runs(home)
    swept = _sweeps(home)
    members = {sweep_dir: [sweep_dir / e.run_id for e in sweep.elements] for sweep_dir, sweep in swept}
    elements = {d for dirs in members.values() for d in dirs}
    entries = [(d, _cached(cache, d)) for d in [*top, *sorted(elements)]]  # (run dir, entry or None)
    fresh.update((d.name, hit) for d, hit in entries if hit is not None)
    views = {v.run_dir: v for v in poll([d for d, hit in entries if hit is None], now=stamp)}
    rows: dict[Path, dict[str, str]] = {}
    ended: dict[Path, float] = {}  # finished runs: when they ended
    losses: dict[Path, float | None] = {}  # sweep elements: their latest eval loss
    for d, hit in entries:
        if hit is not None:
            rows[d] = {**hit["row"], "age": human_age(stamp - float(hit["created"]))}
            ended[d] = float(hit["ended"])
            losses[d] = hit.get("eval_loss")
            continue
        view = views.get(d)
        if view is None:  # an unreadable run.json: poll warned about it
            continue
        (rows[d],) = table_rows([view], now=stamp)
        losses[d] = last_eval_loss(d) if d in elements else None
        rec = view.record
        if rec.final:
            ended[d] = _ended(rec)
            if not needs_refresh(d, rec, backend_for(rec.executor)):  # nothing left to ask: cache its row
                fresh[d.name] = {
                    "run_mtime_ns": _mtime_ns(d / runs.RUN_FILE),
                    "events_mtime_ns": _mtime_ns(reports.events_path(d)),
                    "ended": ended[d],
                    "created": rec.created,
                    "row": {k: v for k, v in rows[d].items() if k != "age"},
                    **({"eval_loss": losses[d]} if d in elements else {}),
                }
    if fresh != cache:
        _write_row_cache(home, fresh)
    for sweep_dir, sweep in swept:  # its elements' rows become the sweep's one row
        dirs = members[sweep_dir]
        seen = [d for d in dirs if d in rows]
        rows[sweep_dir] = sweep_row(sweep, [rows[d] for d in seen], [losses[d] for d in seen], stamp)
        if dirs and all(d in ended for d in dirs):
            ended[sweep_dir] = max(ended[d] for d in dirs)
        for d in dirs:
            rows.pop(d, None)
            ended.pop(d, None)
    shown = set(rows)
    hidden = 0
    if not show_all:
        newest = sorted(ended, key=lambda d: ended[d], reverse=True)
        for d in newest[recent:]:
            shown.discard(d)
        hidden = max(0, len(newest) - recent)
    order = sorted([*top, *(sweep_dir for sweep_dir, _ in swept)], key=_id_stamp) if swept else top
    return StatusTable(
        rows=[rows[d] for d in order if d in shown],
        hidden_finished=hidden,
        polled=len(views),
        cached=sum(1 for _, hit in entries if hit is not None),
    )


def table_lines(home: Path, *, show_all: bool = False) -> list[str]:
    """`moe-orch status`: the table as aligned text lines, and a last line on the finished runs it
    left out; no lines when `home` holds no run."""
    listing = list_status(home, show_all=show_all)
    lines = format_table(listing.rows)
    if listing.hidden_finished:
        lines.append(f"({listing.hidden_finished} older finished runs not shown; --all shows every run)")
    return lines


def details(run_dirs: list[Path]) -> list[dict[str, Any]]:
    """`status [RUN] --json`: each run refreshed (one poll for all) and described (`run_detail`)."""
    return [run_detail(view) for view in poll(run_dirs)]


def run_lines(run_dir: Path) -> list[str]:
    """`moe-orch status RUN`: the run refreshed and described as text (`detail_lines`)."""
    return detail_lines(run_detail(poll([run_dir])[0]))


def latest_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The newest checkpoint whose manifest verifies (file sizes only), as {tag, step, path}."""
    try:
        found = checkpoints.latest_valid_checkpoint(run_dir, full=False)
    except Exception as exc:  # status must not fail on a checkpoint problem
        logger.warning("checking checkpoints in %s: %s", run_dir, exc)
        return None
    if found is None:
        return None
    manifest = checkpoints.read_manifest(found)
    return {"tag": found.name, "step": manifest.get("step") if manifest else None, "path": str(found)}


def routing_mi(run_dir: Path) -> dict[str, Any] | None:
    """The newest logged label/expert mutual information (`routing_mi_bits` in metrics.jsonl) as
    {step, max_bits, bits: {layer: MI}, answer_bits: {layer: MI}}; None before one is logged."""
    for rec in reversed(reports.read_metrics(run_dir)):
        if isinstance(rec.get("routing_mi_bits"), dict) and rec["routing_mi_bits"]:
            return {
                "step": rec.get("step"),
                "max_bits": rec.get("routing_mi_max_bits"),
                "bits": rec["routing_mi_bits"],
                "answer_bits": rec.get("routing_mi_answer_bits") or {},
            }
    return None


def routing_mi_line(mi: dict[str, Any]) -> str:
    """`  routing MI (expert_label; top-1 expert), step 600: layer 0 0.41, layer 1 0.37 of 2 bits
    (answer tokens 0.52, 0.44)`"""
    layers = sorted(mi["bits"], key=lambda x: (len(x), x))
    every = ", ".join(f"layer {k} {float(mi['bits'][k]):.2f}" for k in layers)
    answer = ", ".join(f"{float(mi['answer_bits'][k]):.2f}" for k in layers if k in mi["answer_bits"])
    top = mi.get("max_bits")
    ceiling = f" of {float(top):g} bits" if isinstance(top, (int, float)) else " bits"
    return f"  routing MI (expert_label; top-1 expert), step {mi['step']}: {every}{ceiling}" + (
        f" (answer tokens {answer})" if answer else ""
    )


def run_detail(view: RunView) -> dict[str, Any]:
    """`status RUN`: the record plus latest valid checkpoint and progress (also `--json`), every
    string redacted (an error or state reason may quote a URL with credentials)."""
    data = view.record.to_dict()
    data["progress"] = view.progress
    data["latest_checkpoint"] = latest_checkpoint(view.run_dir)
    data.update(health(view))
    data["routing_mi"] = routing_mi(view.run_dir)
    detail: dict[str, Any] = redact_values(data)
    return detail


def health(view: RunView, now: float | None = None) -> dict[str, Any]:
    """`status RUN`'s goodput (docs/design.md, "Goodput"), and for a running attempt its ranks as
    their heartbeats show them (phase, step, seconds since progress) and its stragglers."""
    rec, stamp = view.record, now if now is not None else time.time()
    submitted = {a.attempt_key: a.submitted for a in rec.attempts if a.attempt_key and a.submitted}
    incomplete = rec.final and rec.state != RunState.COMPLETED
    total, per = goodput.from_run_dir(view.run_dir, submitted=submitted, run_ended_incomplete=incomplete)
    number = {a.attempt_key: a.number for a in rec.attempts}
    out: dict[str, Any] = {
        "goodput": {
            **total.to_dict(),
            "attempts": [{"attempt": number.get(key), "attempt_key": key, **g.to_dict()} for key, g in per],
        },
        "ranks": [],
        "stragglers": [],
        "first_failure": None,
    }
    cur = rec.current
    if cur is not None and cur.attempt_key and cur.stop_reason == StopReason.FAILED:
        beats = heartbeats.read_heartbeats(view.run_dir, cur.attempt_key)
        out["first_failure"] = heartbeats.first_failure(beats)
    if cur is not None and cur.attempt_key and cur.state == AttemptState.RUNNING:
        beats = heartbeats.read_heartbeats(view.run_dir, cur.attempt_key)
        out["ranks"] = [r.to_dict() for r in heartbeats.rank_states(beats, stamp)]
        factor = float(rec.budgets.get("straggler_factor", 1.5))
        out["stragglers"] = [s.to_dict() for s in heartbeats.stragglers(beats, factor)]
    return out


def detail_lines(detail: dict[str, Any]) -> list[str]:
    """`status RUN` as text: state, folder, latest valid checkpoint, one line per attempt."""
    reason = f" ({detail['state_reason']})" if detail.get("state_reason") else ""
    lines = [f"run {detail['run_id']}: {detail['state']}{reason}", f"  folder: {detail['run_dir']}"]
    ckpt = detail.get("latest_checkpoint")
    where = f"{ckpt['tag']} (step {ckpt['step']})" if isinstance(ckpt, dict) else "none"
    lines.append(f"  latest valid checkpoint: {where}")
    if isinstance(detail.get("routing_mi"), dict):
        lines.append(routing_mi_line(detail["routing_mi"]))
    for att in detail.get("attempts", []):
        nodes = ",".join(att["nodes"]) or "-"
        sched = att["slurm_state"] or "-"
        if sched == runs.SLURM_FINISHING:
            sched = f"{sched} (the worker exited; the scheduler's final record is not in yet)"
        elif att["state"] == "ended" and sched.split()[0] in ("RUNNING", "COMPLETING"):
            # A record written before `finishing` existed (sacct lag).
            sched = f"{sched} (last seen; the job is finishing)"
        lines.append(
            f"  attempt {att['number']}: job {att['job_id']} ({att['attempt_key'] or 'not started'}) "
            f"{att['state']}, stop {att['stop_reason'] or '-'}, scheduler {sched}, "
            f"steps {att['first_step']}..{att['last_step']}, resumed from {att['resumed_from'] or '-'}, "
            f"redone {att['steps_redone'] if att['steps_redone'] is not None else '-'}, nodes {nodes}"
        )
        if att.get("world_size"):
            ep = f", ep_size {att['ep_size']}" if att.get("ep_size") else ""
            change = att.get("topology_change") or {}
            moved = ""
            if change.get("from"):
                was = change["from"]
                moved = (
                    f", resharded from {was.get('world_size')} ranks / ep_size {was.get('ep_size')} "
                    f"({change.get('tag')})"
                )
            lines.append(f"      topology: {att['world_size']} ranks{ep}{moved}")
        if att.get("note"):
            lines.append(f"      note: {att['note']}")
        if att.get("error"):
            lines.append(f"      error: {att['error']}")
        hang = att.get("hang")
        if hang:
            lines.append(
                f"      hang: detected by {hang.get('detected_by')} {hang.get('hang_s')} s after the last "
                f"progress (limit {hang.get('stall_limit_s')} s): {hang.get('summary')}"
            )
            if hang.get("note"):
                lines.append(f"      hang note: {hang['note']}")
        for slow in att.get("stragglers") or []:
            lines.append(
                f"      straggler: rank {slow['rank']} on {slow['host']}, {slow['factor']}x the others"
            )
    for r in detail.get("ranks") or []:
        lines.append(
            f"  rank {r['rank']} on {r['host']}: step {r['step']}, {r['phase']}, "
            f"{r['idle_s']:.0f} s since progress, heartbeat {r['silent_s']:.0f} s ago"
        )
    for slow in detail.get("stragglers") or []:
        lines.append(
            f"  straggler now: rank {slow['rank']} on {slow['host']}: "
            f"{slow['factor']}x the others' compute per step"
        )
    first = detail.get("first_failure")
    if isinstance(first, dict):
        then = "".join(
            f"; then rank {c['rank']} (+{c['after_s']} s): {c['error']}" for c in first["consequences"]
        )
        lines.append(f"  first failure: rank {first['rank']} on {first['host']}: {first['error']}{then}")
    good = detail.get("goodput")
    if isinstance(good, dict) and good.get("allocated_s"):
        lines += ["  " + line for line in goodput.summary_lines(goodput.Goodput(**{
            k: v for k, v in good.items() if k in goodput.Goodput.__dataclass_fields__
        }))]  # fmt: skip
    return lines
