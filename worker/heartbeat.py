"""Heartbeats and the stall watchdog of one rank.

`Pulse` is what the main thread tells: the phase it enters (a few attribute writes, no I/O, no
lock: the step never waits on this), a finished step, save or eval (progress). `Watchdog` is a
daemon thread, because the main thread may be blocked inside a collective: every
`cluster.heartbeat_s` it writes the rank's heartbeat file (`orchestrator.rundir.heartbeats`), and
once a second it checks that training made progress within the stall limit. When it did not, the
watchdog calls `on_stall` (worker.hang), which never returns.

The watchdog is armed from the worker's start: a rank stuck in the rendezvous, model loading, the
checkpoint load or the first collective is a hang too. Until this attempt's first step the limit is
`cluster.startup_timeout_s` (counted from the worker's start, or from the last progress: the eval
at step 0); after it, `cluster.stall_timeout_s` when set, else derived from what this rank
measured: the larger of `DERIVED_FLOOR_S` and `DERIVED_FACTOR` times its slowest step, save or eval
so far (docs/design.md, "Hangs").

The pulse also keeps this attempt's time ledger (seconds per phase since the process started), the
cumulative time in optimizer steps (`train_s`) and the compute time of the last steps (the time
waiting in the step's all-reduce left out), for goodput and stragglers.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.rundir.heartbeats import STARTUP_PHASES, STRAGGLER_WINDOW, heartbeat_path, write_heartbeat

logger = logging.getLogger(__name__)

DERIVED_FLOOR_S = 300.0
DERIVED_FACTOR = 10.0
BEFORE_FIRST_STEP_S = 1800.0
"""The startup limit of a pulse told none (`cluster.startup_timeout_s` defaults to the same)."""

PHASES = (
    *STARTUP_PHASES, "data", "forward", "backward", "optimizer", "collective", "logging", "checkpoint",
    "eval", "export", "stopping", "hung", "done",
)  # fmt: skip


def process_start_time() -> float:
    """When this process started (Unix seconds), from /proc; now where /proc cannot tell."""
    try:
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


class Pulse:
    """What one rank's main thread is doing, read by its watchdog thread."""

    def __init__(
        self, *, rank: int, attempt_key: str, configured_limit_s: float | None,
        startup_limit_s: float = BEFORE_FIRST_STEP_S,
    ) -> None:  # fmt: skip
        self.rank = rank
        self.attempt_key = attempt_key
        self.configured_limit_s = configured_limit_s
        self.startup_limit_s = startup_limit_s
        # NOTE: SLURM's node name, which --exclude takes (fake nodes share one host name here).
        self.host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        self.pid = os.getpid()
        self.launched = process_start_time()
        self.phase = "startup"
        self.phase_since = self.launched
        self.position = 0
        # NOTE: every key exists from the start, so the watchdog's copy never sees the dict grow.
        self.ledger: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.step: int | None = None
        # NOTE: from the worker's start, not the process's (`launched`): a caller that runs the
        # worker in a long-lived process must not find it late already. Imports before it are not
        # bounded here; a rank stuck in them writes no heartbeat, and its peers name it.
        self.last_progress = time.time()
        self.armed = True
        self.steps_done = 0
        self.train_s = 0.0
        self.max_step_s = self.max_save_s = self.max_eval_s = 0.0
        self.compute_s: deque[float] = deque(maxlen=STRAGGLER_WINDOW)
        self.error: str | None = None
        self.failed_at: float | None = None

    # --- main thread ---------------------------------------------------------------------------
    def enter(self, phase: str) -> None:
        now = time.time()
        self.ledger[self.phase] = self.ledger.get(self.phase, 0.0) + (now - self.phase_since)
        self.phase, self.phase_since = phase, now
        self.position += 1

    def training_starts(self, step: int) -> None:
        """Training starts at `step` (after loading and resuming). The startup limit still applies
        until the first step: the clock is not reset here."""
        self.step = step

    def disarm(self) -> None:
        self.armed = False

    def step_done(self, step: int, step_s: float, wait_s: float) -> None:
        self.step = step
        self.steps_done += 1
        self.train_s += step_s
        self.max_step_s = max(self.max_step_s, step_s)
        self.compute_s.append(max(0.0, step_s - wait_s))
        self.last_progress = time.time()

    def saved(self, save_s: float) -> None:
        self.max_save_s = max(self.max_save_s, save_s)
        self.last_progress = time.time()

    def evaluated(self, eval_s: float) -> None:
        self.max_eval_s = max(self.max_eval_s, eval_s)
        self.last_progress = time.time()

    def failed(self, error: str) -> None:
        self.error, self.failed_at = error, time.time()

    # --- either thread -------------------------------------------------------------------------
    @property
    def starting(self) -> bool:
        """Before this attempt's first optimizer step: the startup limit applies."""
        return self.steps_done == 0

    def limit_s(self) -> float:
        if self.starting:
            return self.startup_limit_s
        if self.configured_limit_s is not None:
            return self.configured_limit_s
        slowest = max(self.max_step_s, self.max_save_s, self.max_eval_s)
        return max(DERIVED_FLOOR_S, DERIVED_FACTOR * slowest)

    def ledger_now(self) -> dict[str, float]:
        """Seconds per phase up to now (the current phase included)."""
        out = dict(self.ledger)
        phase, since = self.phase, self.phase_since
        out[phase] = out.get(phase, 0.0) + max(0.0, time.time() - since)
        return {k: round(v, 3) for k, v in out.items() if v > 0}

    def record(self) -> dict[str, Any]:
        now = time.time()
        return {
            "rank": self.rank,
            "host": self.host,
            "pid": self.pid,
            "attempt_key": self.attempt_key,
            "step": self.step,
            "phase": self.phase,
            "phase_since": self.phase_since,
            "position": self.position,
            "last_progress": self.last_progress,
            "written": now,
            "launched": self.launched,
            "stall_limit_s": self.limit_s(),
            "train_s": round(self.train_s, 3),
            "compute_s": [round(t, 4) for t in list(self.compute_s)],
            "ledger": self.ledger_now(),
            "error": self.error,
            "failed_at": self.failed_at,
        }


class Watchdog(threading.Thread):
    """Writes the heartbeat every `heartbeat_s`; calls `on_stall` once when training has made no
    progress for the pulse's stall limit (it must not return: it ends the process)."""

    def __init__(
        self,
        pulse: Pulse,
        run_dir: Path,
        *,
        heartbeat_s: float,
        on_stall: Callable[[Pulse], None],
        on_beat: Callable[[Pulse], None] | None = None,
    ) -> None:
        super().__init__(name="moe-orch-watchdog", daemon=True)
        self.pulse = pulse
        self.path = heartbeat_path(run_dir, pulse.attempt_key, pulse.rank)
        self.heartbeat_s = heartbeat_s
        self.on_stall = on_stall
        self.on_beat = on_beat
        self._stop = threading.Event()
        self._last_write = 0.0
        self.fired = False

    def beat(self) -> None:
        try:
            write_heartbeat(self.path, {**self.pulse.record(), "heartbeat_s": self.heartbeat_s})
        except OSError as exc:  # a full or flaky shared filesystem must not stop training
            logger.warning("could not write the heartbeat %s: %s", self.path, exc)
        self._last_write = time.monotonic()
        if self.on_beat is not None:
            try:
                self.on_beat(self.pulse)
            except Exception:
                logger.exception("heartbeat hook failed")

    def run(self) -> None:
        tick = min(1.0, self.heartbeat_s)
        self.beat()
        while not self._stop.wait(tick):
            if time.monotonic() - self._last_write >= self.heartbeat_s:
                self.beat()
            p = self.pulse
            if p.armed and not self.fired and time.time() - p.last_progress > p.limit_s():
                self.fired = True
                self.beat()
                self.on_stall(p)

    def stop(self) -> None:
        """Stop the thread after one last heartbeat (the rank is leaving)."""
        self._stop.set()
        self.beat()
