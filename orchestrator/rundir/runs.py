"""The run record on disk: `<home>/<run-id>/run.json`, written atomically under an fcntl lock.

`run.json` is the orchestrator's memory of a run: its config hash, its state and one entry per
attempt (each start of the worker: a first submission, a SLURM requeue of the same job, or a
resubmission by `watch`/`resume` under a new job id). It is rewritten with temp file + `os.replace`
while `run.json.lock` is held, so concurrent `status`, `watch` and `cancel` never lose an update.

The worker's own files (`events.jsonl`, `progress.json`, `metrics.jsonl`) belong to
`orchestrator.rundir.reports`; they are the source of truth for what happened inside an attempt.
An attempt is named by `attempt_key(job_id, restart)` everywhere: the worker's start event and
progress, this record, and the marker lines of the logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from orchestrator.errors import RunNotFoundError
from orchestrator.rundir.atomic import atomic_write_text
from orchestrator.rundir.checkpoints import checkpoints_dir

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
RUN_FILE = "run.json"


class _Value(str, Enum):
    """A state or reason as run.json spells it: compares equal to, prints as and is written to
    JSON as its value, so run.json stays byte-compatible with the plain strings of before."""

    def __str__(self) -> str:
        return str(self.value)


class RunState(_Value):
    """A run's state (`RunRecord.state`)."""

    PENDING = "pending"
    RUNNING = "running"
    REQUEUED = "requeued"  # SLURM will start the same job again (preemption, time limit, requeue)
    STOPPED = "stopped"  # ended without a requeue, budgets allow more: watch/resume resubmits it
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class AttemptState(_Value):
    """An attempt's state (`Attempt.state`)."""

    PENDING = "pending"
    RUNNING = "running"
    ENDED = "ended"


class StopReason(_Value):
    """Why an attempt stopped (`Attempt.stop_reason`; the worker's `exit` event `reason`)."""

    COMPLETED = "completed"
    PREEMPTED = "preempted"
    TIMEOUT = "timeout"
    NODE_FAIL = "node_fail"
    FAILED = "failed"
    CANCELLED = "cancelled"
    HUNG = "hung"  # no training progress within the stall limit (worker.hang, or `watch`)

    @classmethod
    def parse(cls, text: object) -> StopReason:
        """An `exit` event's reason; anything unknown is a failure (never a silent success)."""
        try:
            return cls(str(text))
        except ValueError:
            return cls.FAILED


FINAL_STATES = frozenset({RunState.COMPLETED, RunState.FAILED, RunState.CANCELLED})
FAILURE_REASONS = frozenset({StopReason.FAILED, StopReason.NODE_FAIL})
PREEMPTION_REASONS = frozenset({StopReason.PREEMPTED, StopReason.TIMEOUT})

SLURM_FINISHING = "finishing"
"""An attempt's `slurm_state` after the worker's exit event while the scheduler still shows the run
alive (the ranks are leaving; sacct lags about a second): lower case, as it is ours, not SLURM's.
The scheduler's final state (and `exit_code`) replace it when its record arrives."""


def attempt_key(job_id: str, restart: int) -> str:
    """`<job_id>.<restart>`: one key per attempt of a run (docs/design.md). `restart` is
    SLURM_RESTART_COUNT (0 outside SLURM, where the job id is the launcher's, e.g. a pid)."""
    return f"{job_id}.{restart}"


@dataclass
class Attempt:
    """One start of the worker (or one submission that has not started yet)."""

    number: int
    job_id: str | None
    attempt_key: str | None = None  # "<job_id>.<restart>" from the worker's start event
    restart: int = 0  # SLURM_RESTART_COUNT of this attempt (requeues of the same job id)
    submitted: float | None = None
    started: float | None = None
    ended: float | None = None
    nodes: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    # Last scheduler state seen (sacct/squeue), e.g. "NODE_FAIL"; SLURM_FINISHING between the
    # worker's exit event and the scheduler's final record.
    slurm_state: str | None = None
    state: AttemptState = AttemptState.PENDING
    stop_reason: StopReason | None = None
    exit_code: str | None = None
    first_step: int | None = None
    last_step: int | None = None
    resumed_from: str | None = None
    steps_redone: int | None = None
    requeued: bool = False  # the worker (or SLURM) requeued the job after this attempt
    error: str | None = None
    note: str | None = None  # why this attempt exists (e.g. "resubmitted after node_fail")
    last_seen_alive: float | None = None
    world_size: int | None = None  # ranks of this attempt (the start event)
    ep_size: int | None = None
    topology_change: dict[str, Any] | None = None  # the start event's: from, to, source, tag (resharded)
    hang: dict[str, Any] | None = None  # the `hang` event: suspects, waiting ranks, hang_s, note
    stragglers: list[dict[str, Any]] = field(default_factory=list)  # `straggler` events: rank, host, factor

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Attempt:
        names = {f.name for f in dataclasses.fields(cls)}
        att = cls(**{k: v for k, v in data.items() if k in names})
        att.state = AttemptState(att.state)
        if att.stop_reason is not None:
            att.stop_reason = StopReason.parse(att.stop_reason)
        return att


@dataclass
class RunRecord:
    run_id: str
    name: str
    config_hash: str
    created: float
    executor: str
    run_dir: str
    home: str
    config_source: str | None = None
    state: RunState = RunState.PENDING
    state_reason: str | None = None
    cancel_requested: bool = False
    budgets: dict[str, Any] = field(default_factory=dict)
    excluded_nodes: list[str] = field(default_factory=list)  # added by watch after NODE_FAIL
    attempts: list[Attempt] = field(default_factory=list)
    updated: float = 0.0
    schema_version: int = SCHEMA_VERSION

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def current(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names and k != "attempts"}
        rec = cls(**values)
        rec.state = RunState(rec.state)
        rec.attempts = [Attempt.from_dict(a) for a in data.get("attempts", [])]
        return rec


# --- where runs live -------------------------------------------------------------------------


def runs_home(home: str | Path | None = None) -> Path:
    """`--home`, else `$MOE_ORCH_HOME`, else `./runs` (absolute)."""
    if home is not None and str(home) != "":
        return Path(home).expanduser().resolve()
    env = os.environ.get("MOE_ORCH_HOME")
    if env:
        return Path(env).expanduser().resolve()
    return (Path.cwd() / "runs").resolve()


def new_run_id(name: str, now: float | None = None) -> str:
    """`<name>-<YYYYmmdd-HHMMSS>-<4 hex>`, e.g. `tiny-cpu-20261128-152000-3fa2`."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now if now is not None else time.time()))
    return f"{name}-{stamp}-{secrets.token_hex(2)}"


def config_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def list_runs(home: Path) -> list[Path]:
    """Run directories under `home` (those holding a run.json), oldest first."""
    if not home.is_dir():
        return []
    dirs = [p for p in home.iterdir() if (p / RUN_FILE).is_file()]
    # The id ends with `-YYYYmmdd-HHMMSS-xxxx`: sort by that stamp, then by name.
    return sorted(dirs, key=lambda p: ("-".join(p.name.rsplit("-", 3)[1:3]), p.name))


def find_run(home: Path, spec: str) -> Path:
    """A run directory from a run id, a unique prefix of one, or a path to the directory."""
    direct = Path(spec).expanduser()
    if (direct / RUN_FILE).is_file():
        return direct.resolve()
    if (home / spec / RUN_FILE).is_file():
        return home / spec
    from orchestrator.rundir.sweeps import element_run_dir

    element = element_run_dir(home, spec)  # a sweep element: <home>/<sweep-id>/<run-id>
    if element is not None:
        return element
    matches = [p for p in list_runs(home) if p.name.startswith(spec)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        known = ", ".join(p.name for p in list_runs(home)[-5:]) or "none"
        raise RunNotFoundError(f"no run {spec!r} under {home} (recent runs: {known}); see `moe-orch status`")
    names = ", ".join(p.name for p in matches)
    raise RunNotFoundError(f"{spec!r} matches several runs ({names}); give more of the run id")


def find_run_with_checkpoints(home: Path, spec: str) -> Path:
    """The run directory `export` reads: a folder holding `checkpoints/`, else a run as `find_run`
    finds it (a folder with run.json, a run id or a unique prefix under `home`).

    A worker started by hand (`python -m worker --run-dir DIR`, torchrun, the rendered sbatch.sh)
    writes run.yaml, tokenizer/ and checkpoints/ but no run.json: its folder is a run directory too.
    """
    direct = Path(spec).expanduser()
    if checkpoints_dir(direct).is_dir():
        return direct.resolve()
    try:
        return find_run(home, spec)
    except RunNotFoundError:
        if direct.is_dir():
            raise RunNotFoundError(
                f"{direct} has no checkpoints/ folder, so there is nothing to export; give a run "
                f"directory whose training has saved a checkpoint, or a run id under {home}"
            ) from None
        raise


# --- the record on disk ----------------------------------------------------------------------


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    with open(run_dir / f"{RUN_FILE}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def write_run(run_dir: Path, record: RunRecord) -> None:
    """Write `run.json` (callers that read-modify-write use `update_run`)."""
    with _locked(run_dir):
        _write_unlocked(run_dir, record)


def _write_unlocked(run_dir: Path, record: RunRecord) -> None:
    record.updated = time.time()
    atomic_write_text(
        run_dir / RUN_FILE, json.dumps(record.to_dict(), indent=2, sort_keys=False) + "\n", private=True
    )


def _read_json(run_dir: Path) -> dict[str, Any]:
    """`run.json` as a dict, once its schema version is one this moe-orch reads."""
    path = run_dir / RUN_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunNotFoundError(f"{run_dir} has no {RUN_FILE}: not a moe-orch run directory") from None
    if not isinstance(data, dict):
        raise RunNotFoundError(f"{path} is not a moe-orch run record (not a JSON object)")
    version = data.get("schema_version", 0)
    if version > SCHEMA_VERSION:
        raise RunNotFoundError(
            f"{path} has schema version {version}, newer than this moe-orch ({SCHEMA_VERSION}); "
            "upgrade moe-orch"
        )
    return data


def read_run(run_dir: Path) -> RunRecord:
    return RunRecord.from_dict(_read_json(run_dir))


def read_cancel_requested(run_dir: Path) -> bool:
    """Whether `moe-orch cancel` recorded a cancellation (it does so before it runs scancel).

    For the worker, which must not fail on this: False when there is no run.json (a worker started
    by hand) or it cannot be read (with a warning naming why).
    """
    try:
        data = _read_json(run_dir)
    except (RunNotFoundError, OSError, ValueError) as exc:
        if (run_dir / RUN_FILE).exists():
            logger.warning("cannot tell whether the run was cancelled: %s", exc)
        return False
    return bool(data.get("cancel_requested"))


def update_run(run_dir: Path, mutate: Callable[[RunRecord], None]) -> RunRecord:
    """Read, change and write `run.json` while holding its lock; returns the new record."""
    with _locked(run_dir):
        record = read_run(run_dir)
        before = record.to_dict()
        mutate(record)
        # NOTE: `status` reconciles every open run on each poll; rewriting (and fsyncing) an
        # unchanged run.json made a 1,000-run status spend most of its time writing.
        if record.to_dict() != before:
            _write_unlocked(run_dir, record)
        return record
