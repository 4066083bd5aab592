"""Goodput: where a run's allocation went, per attempt and in total, from the run directory alone.

An attempt is what one `start` event opens (its `attempt_key`). Its allocation runs from its rank
0's process start (`launched` in the start event) to its `exit` event (for an attempt still running,
or killed without one: to the last heartbeat of its rank 0), times its ranks (`world_size`; GPUs on a
GPU cluster): allocated time is in rank-seconds. The worker's time ledger (seconds per phase,
worker.heartbeat, carried by the `exit` event or else rank 0's last heartbeat) splits it into:

- `startup_s`: process start -> training loop (imports, rendezvous, model, resume);
- `productive_s`: optimizer steps that are part of the final trajectory;
- `redone_s`: optimizer steps whose result was thrown away (after the checkpoint the next attempt
  resumed from) and computed again by a later attempt; `steps_redone` counts them;
- `checkpoint_s`: saves; `eval_s`: evaluations;
- `hang_s`: from a hung attempt's last progress to its end (the detection, `hang_s` of the `hang`
  event, and the report that follows);
- `lost_s`: the partial step a failure or a hang interrupted (beyond `hang_s`), and, for a run
  that ended without completing, the steps after its last checkpoint;
- `other_s`: per-step reporting (progress, metrics, TensorBoard), stopping, export and teardown
  inside the worker;
- `unattributed_s`: what the ledger does not cover (a heartbeat's age for a killed attempt).

`queue_s` (submission, or the previous attempt's end, -> process start) is shown, not allocated.
`goodput = productive_s / allocated_s`. Step times between checkpoints are interpolated from the
cumulative step time each `checkpoint` event carries (`train_s`). No torch here.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from orchestrator.rundir import reports
from orchestrator.rundir.heartbeats import STARTUP_PHASES, read_heartbeats

STEP_PHASES = ("data", "forward", "backward", "optimizer", "collective")
OTHER_PHASES = ("logging", "stopping", "export", "done", "hung")
PARTS = (
    "startup_s", "productive_s", "redone_s", "checkpoint_s", "eval_s", "hang_s", "lost_s", "other_s",
    "unattributed_s",
)  # fmt: skip


@dataclass
class Goodput:
    """Allocated rank-seconds and their split (see the module docstring); `queue_s` in seconds."""

    allocated_s: float = 0.0
    queue_s: float = 0.0
    startup_s: float = 0.0
    productive_s: float = 0.0
    redone_s: float = 0.0
    checkpoint_s: float = 0.0
    eval_s: float = 0.0
    hang_s: float = 0.0
    lost_s: float = 0.0
    other_s: float = 0.0
    unattributed_s: float = 0.0
    steps_redone: int = 0

    @property
    def goodput(self) -> float | None:
        return self.productive_s / self.allocated_s if self.allocated_s > 0 else None

    def add(self, other: Goodput) -> None:
        for name in ("allocated_s", "queue_s", *PARTS):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.steps_redone += other.steps_redone

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()
        }
        out["goodput"] = None if self.goodput is None else round(self.goodput, 4)
        return out


@dataclass
class _Attempt:
    key: str
    ranks: int
    launched: float
    resumed_step: int
    end: float | None = None
    end_step: int | None = None
    ledger: Mapping[str, float] | None = None
    train_s: float = 0.0
    checkpoints: list[tuple[int, float]] | None = None  # (step, cumulative train_s)
    reason: str | None = None
    previous_end: float | None = None


def _attempts(events: Sequence[Mapping[str, Any]]) -> list[_Attempt]:
    out: list[_Attempt] = []
    cur: _Attempt | None = None
    for ev in events:
        kind = ev.get("event")
        if kind == "start":
            launched = ev.get("launched")
            prev_end = cur.end if cur is not None else None
            cur = _Attempt(
                key=str(ev.get("attempt_key")),
                ranks=int(ev.get("world_size") or 1),
                launched=float(launched if isinstance(launched, (int, float)) else ev.get("time") or 0.0),
                resumed_step=int(ev.get("resumed_step") or 0),
                checkpoints=[],
                previous_end=prev_end,
            )
            out.append(cur)
        elif cur is None:
            continue
        elif kind == "checkpoint" and isinstance(ev.get("train_s"), (int, float)):
            assert cur.checkpoints is not None
            cur.checkpoints.append((int(ev.get("step") or 0), float(ev["train_s"])))
        elif kind == "exit" and cur.end is None:
            cur.end = float(ev.get("time") or 0.0)
            cur.end_step = ev.get("step") if isinstance(ev.get("step"), int) else None
            cur.ledger = ev.get("ledger") if isinstance(ev.get("ledger"), dict) else None
            cur.train_s = float(ev.get("train_s") or 0.0)
            cur.reason = str(ev.get("reason"))
    return out


def _fill_from_heartbeat(att: _Attempt, beat: Mapping[str, Any] | None) -> None:
    """An attempt without an exit event (running, or killed): rank 0's last heartbeat."""
    if att.end is not None or not beat:
        return
    att.end = float(beat.get("written") or att.launched)
    att.end_step = beat.get("step") if isinstance(beat.get("step"), int) else None
    att.ledger = beat.get("ledger") if isinstance(beat.get("ledger"), dict) else None
    att.train_s = float(beat.get("train_s") or 0.0)


def _time_at(att: _Attempt, step: int) -> float:
    """Cumulative step time of `att` when it finished `step` (linear between known points)."""
    points = [(att.resumed_step, 0.0), *(att.checkpoints or [])]
    if att.end_step is not None:
        points.append((att.end_step, att.train_s))
    points.sort()
    if step <= points[0][0]:
        return 0.0
    for (s0, t0), (s1, t1) in itertools.pairwise(points):
        if s0 <= step <= s1:
            return t0 if s1 == s0 else t0 + (t1 - t0) * (step - s0) / (s1 - s0)
    return points[-1][1]


def compute(
    events: Sequence[Mapping[str, Any]],
    heartbeats: Mapping[str, Mapping[str, Any] | None],
    *,
    submitted: Mapping[str, float] | None = None,
    run_ended_incomplete: bool = False,
) -> tuple[Goodput, list[tuple[str, Goodput]]]:
    """The run's goodput and each attempt's (by attempt key). `heartbeats`: rank 0's last heartbeat
    per attempt key; `submitted`: when each attempt's job was submitted (run.json), for queue time;
    `run_ended_incomplete`: the run is over without completing (its last work after a checkpoint
    is lost, not pending)."""
    atts = _attempts(events)
    for att in atts:
        _fill_from_heartbeat(att, heartbeats.get(att.key))
    total = Goodput()
    per: list[tuple[str, Goodput]] = []
    for i, att in enumerate(atts):
        g = Goodput()
        later = [a.resumed_step for a in atts[i + 1 :]]
        end = att.end if att.end is not None else att.launched
        wall = max(0.0, end - att.launched)
        r = float(att.ranks)
        g.allocated_s = wall * r
        waits_from = [t for t in ((submitted or {}).get(att.key), att.previous_end) if t is not None]
        g.queue_s = max(0.0, att.launched - max(waits_from)) if waits_from else 0.0
        ledger = dict(att.ledger or {})
        g.startup_s = sum(ledger.get(p, 0.0) for p in STARTUP_PHASES) * r
        g.checkpoint_s = ledger.get("checkpoint", 0.0) * r
        g.eval_s = ledger.get("eval", 0.0) * r
        g.other_s = sum(ledger.get(p, 0.0) for p in OTHER_PHASES) * r
        step_phases = sum(ledger.get(p, 0.0) for p in STEP_PHASES)
        in_flight = max(0.0, step_phases - att.train_s)
        # NOTE: a hung attempt's whole stall is hang time: last progress -> detection (`hang_s` of
        # the event) and the report that follows until the ranks exit.
        hang = in_flight if att.reason == "hung" else 0.0
        g.hang_s = hang * r
        g.lost_s = (in_flight - hang) * r
        reached = att.end_step if att.end_step is not None else att.resumed_step
        kept_until = min([reached, *later]) if later else reached
        kept = _time_at(att, max(kept_until, att.resumed_step))
        discarded = max(0.0, att.train_s - kept)
        if later:
            g.redone_s = discarded * r
            g.steps_redone = max(0, reached - max(kept_until, att.resumed_step))
        elif run_ended_incomplete:
            last_ckpt = max([s for s, _ in att.checkpoints or []] + [att.resumed_step])
            lost_steps = max(0.0, att.train_s - _time_at(att, last_ckpt))
            g.lost_s += lost_steps * r
            kept -= lost_steps
        g.productive_s = max(0.0, kept) * r
        g.unattributed_s = g.allocated_s - sum(getattr(g, p) for p in PARTS if p != "unattributed_s")
        total.add(g)
        per.append((att.key, g))
    return total, per


def from_run_dir(
    run_dir: str | Path, *, submitted: Mapping[str, float] | None = None, run_ended_incomplete: bool = False
) -> tuple[Goodput, list[tuple[str, Goodput]]]:
    """`compute` on a run directory's events and heartbeats."""
    events = reports.read_events(run_dir)
    keys = {str(e.get("attempt_key")) for e in events if e.get("event") == "start"}
    beats = {key: read_heartbeats(run_dir, key).get(0) for key in keys}
    return compute(events, beats, submitted=submitted, run_ended_incomplete=run_ended_incomplete)


def summary_lines(total: Goodput) -> list[str]:
    """`goodput 87.1% of 1,234 rank-s allocated: productive 1,075, startup 60, ...` and queue."""
    if total.allocated_s <= 0:
        return ["goodput: nothing allocated yet"]
    pct = 100.0 * (total.goodput or 0.0)
    parts = ", ".join(
        f"{name.removesuffix('_s')} {getattr(total, name):,.1f}"
        for name in PARTS
        if name == "productive_s" or abs(getattr(total, name)) >= 0.05
    )
    redone = f" ({total.steps_redone} steps redone)" if total.steps_redone else ""
    return [
        f"goodput {pct:.1f}% of {total.allocated_s:,.1f} rank-s allocated: {parts}{redone}",
        f"queue wait {total.queue_s:,.1f} s (not allocated)",
    ]
