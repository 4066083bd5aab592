"""Heartbeats: one small file per rank and attempt, `attempts/<key>/heartbeats/rank-<r>.json`.

Every rank's watchdog thread (`worker.heartbeat`) rewrites its file every `cluster.heartbeat_s`
seconds, whatever its main thread is doing (that thread may be blocked in a collective): the step,
the phase the main thread is in (`data`, `forward`, `backward`, `optimizer`, `collective`,
`checkpoint`, `eval`, ...), its position (how many phases it has entered this attempt: ranks run the
same sequence, so the rank with the lowest position is the one the others wait for), the time of
its last progress (a finished step, save or eval), its host and pid, the stall limit it applies,
its compute time of the last steps (for stragglers) and its time ledger (seconds per phase, for
goodput). The hung attempt's stacks go to `attempts/<key>/stacks/rank-<r>.txt`.

The files are replaced with rename, without fsync: a heartbeat is worth nothing after a crash of
the machine, and a shared filesystem should not pay for one every few seconds per rank.

This module also reads them for `status`, `watch` and the hang report: `diagnose` (who is stuck,
who waits), `stragglers` and `first_failure`. No torch here.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ATTEMPTS = "attempts"
HEARTBEATS = "heartbeats"
STACKS = "stacks"

STARTUP_PHASES = ("startup", "rendezvous", "model", "resume")
"""The phases before training: setup, `init_distributed`, the engine (and a reshard of a checkpoint
of another topology), loading the checkpoint."""

COLLECTIVE_PHASES = frozenset({"collective", "rendezvous"})
"""Phases in which a rank waits for its peers by construction (the step's all-reduce, and the
rendezvous of `init_distributed` before training)."""

NO_HEARTBEAT = "no heartbeat"
"""The phase shown for a rank that never wrote a heartbeat this attempt (stuck before its watchdog
started: imports on a stuck filesystem, a process that never began)."""

SILENT_AFTER_BEATS = 3
"""A rank whose heartbeat file is older than this many intervals (plus `SILENT_SLACK_S`) is silent:
its process is frozen (SIGSTOP, a wedged driver holding the GIL) or gone."""
SILENT_SLACK_S = 10.0

STRAGGLER_WINDOW = 50
"""Steps of compute time each heartbeat keeps, and stragglers are judged on."""


def attempt_dir(run_dir: str | Path, attempt_key: str) -> Path:
    """`<run_dir>/attempts/<job_id>.<restart>`: what one attempt leaves besides the events."""
    return Path(run_dir) / ATTEMPTS / attempt_key


def heartbeat_path(run_dir: str | Path, attempt_key: str, rank: int) -> Path:
    return attempt_dir(run_dir, attempt_key) / HEARTBEATS / f"rank-{rank}.json"


def stacks_path(run_dir: str | Path, attempt_key: str, rank: int) -> Path:
    return attempt_dir(run_dir, attempt_key) / STACKS / f"rank-{rank}.txt"


def write_heartbeat(path: Path, record: Mapping[str, Any]) -> None:
    """Replace `path` with `record` (temp file + rename, no fsync: see the module note)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)


def read_heartbeats(run_dir: str | Path, attempt_key: str) -> dict[int, dict[str, Any]]:
    """Every rank's heartbeat of one attempt, by rank ({} when there is none)."""
    folder = attempt_dir(run_dir, attempt_key) / HEARTBEATS
    beats: dict[int, dict[str, Any]] = {}
    try:
        paths = sorted(folder.glob("rank-*.json"))
    except OSError:
        return beats
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # replaced while we read it: the next poll sees the new one
        if isinstance(data, dict) and isinstance(data.get("rank"), int):
            beats[int(data["rank"])] = data
    return beats


def latest_attempt_key(run_dir: str | Path) -> str | None:
    """The attempt whose heartbeats were written last (for a worker started by hand)."""
    root = Path(run_dir) / ATTEMPTS
    try:
        dirs = [d for d in root.iterdir() if (d / HEARTBEATS).is_dir()]
    except OSError:
        return None
    if not dirs:
        return None
    return max(dirs, key=lambda d: (d / HEARTBEATS).stat().st_mtime).name


# --- diagnosis -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankState:
    """One rank as its heartbeat shows it (for the `hang` event and `status`)."""

    rank: int
    host: str
    pid: int | None
    step: int | None
    phase: str
    position: int
    idle_s: float  # since its last progress
    silent_s: float  # since its heartbeat was last written
    heartbeat: bool = True  # False: it wrote none (idle_s and silent_s then mean nothing)

    @classmethod
    def without_heartbeat(cls, rank: int, host: str) -> RankState:
        return cls(rank=rank, host=host, pid=None, step=None, phase=NO_HEARTBEAT, position=-1, idle_s=0.0,
                   silent_s=0.0, heartbeat=False)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        if not self.heartbeat:
            return {"rank": self.rank, "host": self.host, "pid": None, "step": None, "phase": self.phase,
                    "position": None, "idle_s": None, "silent_s": None}  # fmt: skip
        return {
            "rank": self.rank, "host": self.host, "pid": self.pid, "step": self.step, "phase": self.phase,
            "position": self.position, "idle_s": round(self.idle_s, 1), "silent_s": round(self.silent_s, 1),
        }  # fmt: skip


@dataclass(frozen=True)
class Diagnosis:
    """Who stopped the attempt and who waits for it.

    - `silent`: ranks whose heartbeat file stopped being written (process frozen or gone), and
      the expected ranks that never wrote one (`missing`);
    - `suspects`: the silent ranks, else the ranks furthest behind (lowest position) when the
      ranks are not all at the same point; empty when nothing tells them apart;
    - `waiting`: the other ranks that sit in a collective (the step's all-reduce) or further on,
      i.e. waiting for the suspects.
    """

    ranks: list[RankState]
    suspects: list[RankState] = field(default_factory=list)
    waiting: list[RankState] = field(default_factory=list)
    silent: list[RankState] = field(default_factory=list)
    missing: list[RankState] = field(default_factory=list)

    @property
    def last_progress_age_s(self) -> float:
        """Seconds since ANY rank last made progress."""
        return min((r.idle_s for r in self.ranks), default=0.0)

    def summary(self) -> str:
        def names(rs: Sequence[RankState]) -> str:
            return ", ".join(f"rank {r.rank} on {r.host} ({r.phase}, step {r.step})" for r in rs)

        if self.suspects:
            if all(not r.heartbeat for r in self.suspects):
                why = "no heartbeat"
            else:
                why = "silent" if self.silent else "behind the others"
            text = f"suspect {names(self.suspects)}: {why}"
        else:
            where = sorted({(str(r.step), r.phase) for r in self.ranks})
            point = f"step {where[0][0]}, {where[0][1]}" if len(where) == 1 else "the same point"
            text = f"no single suspect: every rank stopped at {point}"
        if self.waiting:
            text += f"; waiting: {names(self.waiting)}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "suspects": [r.to_dict() for r in self.suspects],
            "waiting": [r.to_dict() for r in self.waiting],
            "silent": [r.rank for r in self.silent],
            "missing": [r.rank for r in self.missing],
            "summary": self.summary(),
        }


def rank_states(beats: Mapping[int, Mapping[str, Any]], now: float) -> list[RankState]:
    out = []
    for rank in sorted(beats):
        b = beats[rank]
        written = _num(b.get("written"), now)
        last = _num(b.get("last_progress"), written)
        step = b.get("step")
        out.append(
            RankState(
                rank=rank,
                host=str(b.get("host") or "?"),
                pid=b.get("pid") if isinstance(b.get("pid"), int) else None,
                step=step if isinstance(step, int) else None,
                phase=str(b.get("phase") or "?"),
                position=int(_num(b.get("position"), 0)),
                idle_s=max(0.0, now - last),
                silent_s=max(0.0, now - written),
            )
        )
    return out


def silent_after_s(heartbeat_s: float) -> float:
    return SILENT_AFTER_BEATS * heartbeat_s + SILENT_SLACK_S


def diagnose(
    beats: Mapping[int, Mapping[str, Any]], now: float, *, heartbeat_s: float,
    expected: Mapping[int, str] | None = None,
) -> Diagnosis:  # fmt: skip
    """Tell the stuck ranks from the waiting ones, from the heartbeats alone. `expected` (every
    rank of the job and its host) makes a rank without a heartbeat a suspect: before the first
    step a rank stuck before its watchdog started has none."""
    ranks = rank_states(beats, now)
    expected = expected or {}
    missing = [RankState.without_heartbeat(r, expected[r]) for r in sorted(expected) if r not in beats]
    silent = missing + [r for r in ranks if r.silent_s > silent_after_s(heartbeat_s)]
    everyone = len(ranks) + len(missing)
    if silent and len(silent) < everyone:
        suspects = silent
    else:
        lowest = min((r.position for r in ranks), default=0)
        behind = [r for r in ranks if r.position == lowest]
        suspects = behind if len(behind) < len(ranks) else []
    suspect_ranks = {r.rank for r in suspects}
    waiting = [r for r in ranks if r.rank not in suspect_ranks and (suspects or r.phase in COLLECTIVE_PHASES)]
    return Diagnosis(ranks=ranks, suspects=suspects, waiting=waiting, silent=silent, missing=missing)


def stall_limit_s(beats: Mapping[int, Mapping[str, Any]], configured: float | None) -> float | None:
    """The stall limit the ranks apply (the largest they state), else the configured one."""
    stated = [
        float(b["stall_limit_s"]) for b in beats.values() if isinstance(b.get("stall_limit_s"), (int, float))
    ]
    return max(stated) if stated else configured


def frozen(beats: Mapping[int, Mapping[str, Any]], now: float, *, heartbeat_s: float, limit_s: float) -> bool:
    """Whether the whole attempt looks frozen from outside: every rank silent for longer than the
    stall limit (or than silence allows), or no rank has made progress for the stall limit plus the
    time its own watchdog needed to act (it did not: its process cannot run it)."""
    ranks = rank_states(beats, now)
    if not ranks:
        return False
    grace = silent_after_s(heartbeat_s)
    if all(r.silent_s > max(limit_s, grace) for r in ranks):
        return True
    return all(r.idle_s > limit_s + grace + 60.0 for r in ranks)


# --- stragglers and failures -----------------------------------------------------------------


@dataclass(frozen=True)
class Straggler:
    rank: int
    host: str
    factor: float  # its mean compute time per step over the median of the other ranks'
    compute_s: float

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "host": self.host, "factor": round(self.factor, 2),
                "compute_s": round(self.compute_s, 4)}  # fmt: skip


def stragglers(
    beats: Mapping[int, Mapping[str, Any]], factor: float, *, min_steps: int = 5
) -> list[Straggler]:
    """Ranks whose mean compute time per step (the last `STRAGGLER_WINDOW` steps, time waiting in
    the step's all-reduce left out) exceeds `factor` times the median of the OTHER ranks' means.

    NOTE: against the others, not all ranks: with two ranks the median of both sits halfway, and a
    rank three times slower than its peer would read 1.5x.
    """
    means: dict[int, float] = {}
    hosts: dict[int, str] = {}
    for rank, b in beats.items():
        times = [float(t) for t in b.get("compute_s") or [] if isinstance(t, (int, float))]
        times = times[-STRAGGLER_WINDOW:]
        if len(times) >= min_steps:
            means[rank] = sum(times) / len(times)
            hosts[rank] = str(b.get("host") or "?")
    out = []
    for rank, mean in sorted(means.items()):
        others = [m for r, m in means.items() if r != rank]
        if not others:
            continue
        median = statistics.median(others)
        if median > 0 and mean > factor * median:
            out.append(Straggler(rank, hosts[rank], mean / median, mean))
    return out


def first_failure(beats: Mapping[int, Mapping[str, Any]]) -> dict[str, Any] | None:
    """The rank that failed first (its heartbeat's `error` with the earliest `failed_at`), with the
    later failures as its consequences; None when no rank recorded an error."""
    failed = [
        (float(b["failed_at"]), rank, b)
        for rank, b in beats.items()
        if b.get("error") and isinstance(b.get("failed_at"), (int, float))
    ]
    if not failed:
        return None
    failed.sort(key=lambda item: (item[0], item[1]))
    at, rank, b = failed[0]
    return {
        "rank": rank,
        "host": b.get("host"),
        "error": b.get("error"),
        "time": at,
        "consequences": [
            {"rank": r, "host": other.get("host"), "error": other.get("error"), "after_s": round(t - at, 3)}
            for t, r, other in failed[1:]
        ],
    }


def _num(value: Any, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default
