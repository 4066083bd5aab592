"""Signal-safe preemption: handlers only set a flag; the training loop acts at a step boundary.

- SIGUSR2 (SLURM's `--signal=USR2@N` before the time limit, or preemption with
  `preempt_send_user_signal`) and SIGTERM (requeue, preemption, scancel): stop. At the next
  optimizer-step boundary the ranks all-reduce their flags; if any rank was signalled, every rank
  saves one checkpoint together, rank 0 writes a `signal` and an `exit` event, requeues the job
  (when `cluster.requeue` and its scheduler requeues: SLURM), and every rank exits.
- SIGUSR1, or a file `<run_dir>/SAVE_NOW`: save at the next boundary and continue.

NOTE: nothing is saved inside a handler (Lightning #21406: saving in the handler hangs and risks
corruption). The handlers replace submitit's, which would otherwise ignore SIGTERM on every rank
and requeue from rank 0 only, leaving the other ranks to linger until SIGKILL.

The worker's exit codes (0 completed, 1 failed, 2 usage, 75 stopped after a durable checkpoint)
are defined in `orchestrator.rundir.exitcodes`, which the job function reads too.

Fault hooks for tests (`MOE_ORCH_FAULT`, comma-separated; every rank acts on them):
- `crash_at_start`: raise `InjectedFault` (orchestrator.errors) before the first step (an `exit`
  event with reason `failed` is written).
- `crash_at_step:N`: raise right after optimizer step N of this process (N counts from the run's
  start, not from the resume point, so a resumed attempt past N does not crash again).
- `hold_save:S`: sleep S seconds inside every save, after DeepSpeed has written its files into
  the temporary folder but before the manifest (a kill then leaves an incomplete checkpoint).
- `exit_without_progress`: exit with code 1 before the first step, writing no `exit` event.
- `hang_at_step:N:R` / `hang_at_step:N:R:collective`: rank R stops for good before step N (N
  counts from the run's start), outside any collective, or inside one that no other rank joins;
  once per run (not when events.jsonl already has a `hang` event), so the resumed attempt trains
  on. The stall watchdog (worker.heartbeat, worker.hang) is what ends it.
- `hang_at_startup:R`: rank R stops for good before `init_distributed` (its peers wait in the
  rendezvous); once per run, like `hang_at_step`. The startup limit (`cluster.startup_timeout_s`)
  ends it.
- `slow_rank:R:F`: rank R takes F times as long for each step's compute (a straggler).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from orchestrator.backends.local import LocalRunningJob
from orchestrator.backends.slurm.injob import SlurmRunningJob
from orchestrator.rundir import runs
from orchestrator.rundir.runs import StopReason

if TYPE_CHECKING:
    from orchestrator.backends.base import RunningJob
    from worker.dist import DistInfo

logger = logging.getLogger(__name__)

TIMEOUT_MARGIN_S = 90
"""A stop signal counts as the time limit when the job ends within `signal_delay_s` + this."""

SAVE_NOW_FILE = "SAVE_NOW"
STOP_SIGNALS = {signal.SIGUSR2: "USR2", signal.SIGTERM: "TERM"}


@dataclass
class Faults:
    """The parsed `MOE_ORCH_FAULT` hooks."""

    crash_at_start: bool = False
    crash_at_step: int | None = None
    hold_save_s: float = 0.0
    exit_without_progress: bool = False
    hang_at_step: int | None = None
    hang_rank: int = 0
    hang_in_collective: bool = False
    hang_at_startup: int | None = None  # the rank that hangs before init_distributed
    slow_rank: int | None = None
    slow_factor: float = 1.0

    @classmethod
    def parse(cls, spec: str | None) -> Faults:
        faults = cls()
        for item in (spec or "").split(","):
            item = item.strip()
            if not item:
                continue
            name, _, arg = item.partition(":")
            if name == "crash_at_start":
                faults.crash_at_start = True
            elif name == "crash_at_step" and arg:
                faults.crash_at_step = int(arg)
            elif name == "hold_save" and arg:
                faults.hold_save_s = float(arg)
            elif name == "exit_without_progress":
                faults.exit_without_progress = True
            elif name == "hang_at_step" and arg:
                parts = arg.split(":")
                faults.hang_at_step = int(parts[0])
                faults.hang_rank = int(parts[1]) if len(parts) > 1 else 0
                faults.hang_in_collective = len(parts) > 2 and parts[2] == "collective"
            elif name == "hang_at_startup" and arg:
                faults.hang_at_startup = int(arg)
            elif name == "slow_rank" and arg:
                rank, _, factor = arg.partition(":")
                faults.slow_rank, faults.slow_factor = int(rank), float(factor or 2.0)
            else:
                raise ValueError(
                    f"MOE_ORCH_FAULT: unknown hook {item!r}; use crash_at_start, crash_at_step:N, "
                    "hold_save:S, exit_without_progress, hang_at_step:N:R[:collective], hang_at_startup:R or "
                    "slow_rank:R:F"
                )
        return faults

    @classmethod
    def from_env(cls) -> Faults:
        return cls.parse(os.environ.get("MOE_ORCH_FAULT"))

    def after_a_hang(self) -> None:
        """The run already had a `hang` event: the injected hangs happen once per run, so the
        resumed attempt trains on."""
        self.hang_at_step = None
        self.hang_at_startup = None


@dataclass
class SignalState:
    """What the handlers saw since the last boundary. Handlers only write these fields."""

    stop_signal: str | None = None  # "USR2" | "TERM"
    save_requested: bool = False
    received: list[str] = field(default_factory=list)

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        name = STOP_SIGNALS.get(signal.Signals(signum), str(signum))
        self.received.append(name)
        if self.stop_signal is None:
            self.stop_signal = name

    def _on_save(self, signum: int, frame: FrameType | None) -> None:
        self.received.append("USR1")
        self.save_requested = True

    def install(self) -> None:
        """Replace any earlier handlers (submitit's) for USR2, TERM and USR1."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGUSR1, self._on_save)

    def stop_before_time_limit(self, job: RunningJob, signal_delay_s: int) -> float | None:
        """Set the stop flag, as SLURM's `--signal=USR2@signal_delay_s` would, `signal_delay_s`
        before the job's time limit (a timer thread; rank 0 alone: the step's all-reduce of the
        flags stops every rank). Returns when it fires (None: no known limit).

        NOTE: slurmctld checks time limits every ~30 s, so its USR2 comes up to 30 s early; with
        `continue_with: chain` the job stops itself on time, and the USR2 still stops it if first.
        """
        end = job.time_limit_end()
        if end is None:
            return None
        at = end - signal_delay_s

        def fire() -> None:
            self.received.append("time limit")
            if self.stop_signal is None:
                self.stop_signal = "USR2"

        timer = threading.Timer(max(0.0, at - time.time()), fire)
        timer.daemon = True
        timer.start()
        logger.info("stop in %.0f s, %d s before the time limit", at - time.time(), signal_delay_s)
        return at

    def ignore_from_now(self) -> None:
        """The rank is leaving (training completed, or stopped after its save): a later USR2, TERM
        or USR1 changes nothing, so ignore it until the process is gone.

        NOTE: at interpreter shutdown CPython puts every Python-level handler back to SIG_DFL, so a
        late USR2 (SLURM's time-limit warning, a preemption) killed the exiting rank with signal 12
        and SLURM recorded a completed job as `FAILED 12:0`. SIG_IGN survives shutdown. A TERM that
        must end the process anyway is followed by SLURM's (or torchrun's) SIGKILL.
        """
        for sig in (*STOP_SIGNALS, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)

    def take_save_request(self, run_dir: Path, check_file: bool) -> bool:
        """Whether a save was asked for (USR1, or SAVE_NOW when `check_file`); clears the request."""
        asked = self.save_requested
        self.save_requested = False
        if check_file and (run_dir / SAVE_NOW_FILE).exists():
            asked = True
        return asked


def clear_save_now(run_dir: Path) -> None:
    """Remove `SAVE_NOW` after the save it asked for."""
    try:
        (run_dir / SAVE_NOW_FILE).unlink()
    except FileNotFoundError:
        pass


# Signal names as strings and how the loop encodes them for the all-reduce (MAX of codes).
SIGNAL_CODES = {None: 0, "USR2": 1, "TERM": 2}
CODE_SIGNALS = {code: name for name, code in SIGNAL_CODES.items()}


def stop_reason(*, end_time: float | None, signal_delay_s: int, now: float) -> StopReason:
    """`timeout` when the job's time limit ends (`end_time`) within `signal_delay_s` + 90 s, else
    `preempted` (also when nobody can tell when it ends)."""
    horizon = signal_delay_s + TIMEOUT_MARGIN_S
    if end_time is not None:
        return StopReason.TIMEOUT if end_time - now <= horizon else StopReason.PREEMPTED
    return StopReason.PREEMPTED


def running_job(info: DistInfo, env: Mapping[str, str] | None = None) -> RunningJob:
    """The scheduler side of the job this rank runs in (`backends.RunningJob`): SLURM's inside a
    SLURM allocation, else submitit's local executor's (or none for a rank started by hand)."""
    if info.slurm_job:
        return SlurmRunningJob(info.job_id, info.restart_count)
    return LocalRunningJob.from_env(os.environ if env is None else env)


def job_stop_reason(job: RunningJob, signal_delay_s: int) -> StopReason:
    """`stop_reason` for `job`: when its time limit ends, as its scheduler tells."""
    return stop_reason(end_time=job.time_limit_end(), signal_delay_s=signal_delay_s, now=time.time())


def cancel_requested(run_dir: Path) -> bool:
    """`moe-orch cancel` records the request in run.json before it runs scancel."""
    return runs.read_cancel_requested(run_dir)
