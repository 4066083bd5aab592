"""Signal-safe preemption: handlers only set a flag; the training loop acts at a step boundary.

- SIGUSR2 (SLURM's `--signal=USR2@N` before the time limit, or preemption with
  `preempt_send_user_signal`) and SIGTERM (requeue, preemption, scancel): stop. At the next
  optimizer-step boundary the ranks all-reduce their flags; if any rank was signalled, every rank
  saves one checkpoint together, rank 0 writes a `signal` and an `exit` event, requeues the SLURM
  job (when under SLURM and `cluster.requeue`), and every rank exits.
- SIGUSR1, or a file `<run_dir>/SAVE_NOW`: save at the next boundary and continue.

NOTE: nothing is saved inside a handler (Lightning #21406: saving in the handler hangs and risks
corruption). The handlers replace submitit's, which would otherwise ignore SIGTERM on every rank
and requeue from rank 0 only, leaving the other ranks to linger until SIGKILL.

Exit codes of the worker (`python -m worker`, `worker.__main__.main`):
- `EXIT_COMPLETED` 0: training reached its last step (final checkpoint saved).
- `EXIT_FAILED` 1: an error (the traceback is on that rank's stderr; rank 0 writes an `exit` event
  with reason `failed` when it can), including a save that failed after a signal.
- `EXIT_USAGE` 2: bad arguments or config (nothing was trained).
- `EXIT_STOPPED` 75 (EX_TEMPFAIL, "try again"): stopped on a signal after a durable checkpoint;
  the job was requeued (or, outside SLURM, can be resumed by running it again).

Fault hooks for tests (`MOE_ORCH_FAULT`, comma-separated; every rank acts on them):
- `crash_at_start`: raise before the first step (an `exit` event with reason `failed` is written).
- `crash_at_step:N`: raise right after optimizer step N of this process (N counts from the run's
  start, not from the resume point, so a resumed attempt past N does not crash again).
- `hold_save:S`: sleep S seconds inside every save, after DeepSpeed has written its files into
  the temporary folder but before the manifest (a kill then leaves an incomplete checkpoint).
- `exit_without_progress`: exit with code 1 before the first step, writing no `exit` event.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

logger = logging.getLogger(__name__)

_PROCESS_START = time.time()
TIMEOUT_MARGIN_S = 90
"""A stop signal counts as the time limit when the job ends within `signal_delay_s` + this."""

EXIT_COMPLETED = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_STOPPED = 75

SAVE_NOW_FILE = "SAVE_NOW"
STOP_SIGNALS = {signal.SIGUSR2: "USR2", signal.SIGTERM: "TERM"}


class InjectedFault(RuntimeError):
    """Raised by a `MOE_ORCH_FAULT` hook (tests of crash handling)."""


@dataclass
class Faults:
    """The parsed `MOE_ORCH_FAULT` hooks."""

    crash_at_start: bool = False
    crash_at_step: int | None = None
    hold_save_s: float = 0.0
    exit_without_progress: bool = False

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
            else:
                raise ValueError(
                    f"MOE_ORCH_FAULT: unknown hook {item!r}; use crash_at_start, crash_at_step:N, "
                    "hold_save:S or exit_without_progress"
                )
        return faults

    @classmethod
    def from_env(cls) -> Faults:
        return cls.parse(os.environ.get("MOE_ORCH_FAULT"))


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


def parse_slurm_time(text: str) -> float | None:
    """`squeue -o %e` / `scontrol` time (`2026-11-28T16:21:03`, local time) as Unix seconds."""
    text = text.strip()
    try:
        return _dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:
        return None  # N/A, Unknown, NONE, empty


def parse_slurm_duration(text: str) -> float | None:
    """`squeue -o %l` time limit (`10:00` = 10 min, `1:00:00`, `2-00:00:00`, `30`) in seconds; None
    for `UNLIMITED`, `NOT_SET`, `INVALID` or empty."""
    text = text.strip()
    days = 0
    if "-" in text:
        head, _, text = text.partition("-")
        if not head.isdigit():
            return None
        days = int(head)
    parts = text.split(":")
    if not text or not all(p.isdigit() for p in parts) or len(parts) > 3:
        return None
    nums = [int(p) for p in parts]
    if days and len(parts) == 1:
        hours, minutes, seconds = nums[0], 0, 0  # D-HH
    elif days and len(parts) == 2:
        hours, minutes, seconds = nums[0], nums[1], 0  # D-HH:MM
    elif len(parts) == 1:
        hours, minutes, seconds = 0, nums[0], 0  # MM
    elif len(parts) == 2:
        hours, minutes, seconds = 0, nums[0], nums[1]  # MM:SS
    else:
        hours, minutes, seconds = nums
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


def slurm_end_time(job_id: str) -> float | None:
    """When the job's time limit ends (Unix seconds): its start plus its time limit; None when
    squeue cannot tell.

    NOTE: not squeue's end time (`%e`): when a job is preempted, SLURM moves that to now +
    GraceTime, which would read as a time limit (seen on the localhost cluster: a partition
    preemption reported as `timeout`).
    """
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%S|%l"],
            capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("squeue failed (%s); calling the stop a preemption", exc)
        return None
    lines = out.stdout.strip().splitlines()
    if not lines:
        return None
    start_text, _, limit_text = lines[0].partition("|")
    start, limit = parse_slurm_time(start_text), parse_slurm_duration(limit_text)
    return start + limit if start is not None and limit is not None else None


def stop_reason(
    *,
    end_time: float | None,
    signal_delay_s: int,
    now: float,
    local_timeout_s: float | None = None,
    process_start: float | None = None,
) -> str:
    """`timeout` when the job's time limit is within `signal_delay_s` + 90 s, else `preempted`.

    `end_time` is SLURM's; for submitit's local executor pass `local_timeout_s`
    (`SUBMITIT_LOCAL_TIMEOUT_S`), measured from this process's start.
    """
    horizon = signal_delay_s + TIMEOUT_MARGIN_S
    if end_time is not None:
        return "timeout" if end_time - now <= horizon else "preempted"
    if local_timeout_s is not None:
        started = _PROCESS_START if process_start is None else process_start
        return "timeout" if started + local_timeout_s - now <= horizon else "preempted"
    return "preempted"


def stop_reason_from_env(env: Mapping[str, str], job_id: str, slurm_job: bool, signal_delay_s: int) -> str:
    """`stop_reason` for this job: asks squeue under SLURM, reads submitit's local timeout otherwise."""
    now = time.time()
    if slurm_job:
        return stop_reason(end_time=slurm_end_time(job_id), signal_delay_s=signal_delay_s, now=now)
    local = env.get("SUBMITIT_LOCAL_TIMEOUT_S")
    return stop_reason(
        end_time=None, signal_delay_s=signal_delay_s, now=now, local_timeout_s=float(local) if local else None
    )


ALREADY_REQUEUED = "pending execution"
"""scontrol's answer when the job is already back in the queue (`scontrol requeue` by an admin,
or a preemption, sent the SIGTERM that stopped us): SLURM restarts it, as if we had requeued it."""


def requeue_slurm_job(job_id: str) -> bool:
    """`scontrol requeue <job_id>`; False (with a warning) when it fails. True also when SLURM
    already requeued the job (`Job is pending execution`)."""
    try:
        out = subprocess.run(
            ["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("scontrol requeue %s failed: %s", job_id, exc)
        return False
    if out.returncode != 0:
        message = (out.stderr or out.stdout).strip()
        if ALREADY_REQUEUED in message:
            logger.info("SLURM job %s is already requeued (%s)", job_id, message)
            return True
        logger.warning("scontrol requeue %s failed: %s", job_id, message)
        return False
    logger.info("requeued SLURM job %s", job_id)
    return True


def parse_scontrol_job(text: str) -> dict[str, str]:
    """`scontrol show job -o ID` -> {"Restarts": "0", "PreemptTime": "None", ...}."""
    fields: dict[str, str] = {}
    for token in text.split():
        key, sep, value = token.partition("=")
        if sep and key not in fields:
            fields[key] = value
    return fields


def term_is_cancellation(job: Mapping[str, str], restart_count: int) -> bool:
    """Whether the SIGTERM we got is a cancellation (`scancel`), not a requeue or preemption.

    Measured on SLURM 22.05: at the SIGTERM of `scontrol requeue` the job's `Restarts` is already
    one more than our attempt's SLURM_RESTART_COUNT; a preemption sets `PreemptTime`; `scancel`
    does neither. Requeueing after a cancellation would bring a cancelled job back to life.
    """
    try:
        restarts = int(job.get("Restarts", "0"))
    except ValueError:
        return False
    preempted = job.get("PreemptTime", "None") not in ("None", "", "Unknown")
    return restarts <= restart_count and not preempted


def slurm_job_fields(job_id: str) -> dict[str, str]:
    """The job's `scontrol show job -o` fields; {} when scontrol cannot tell."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("scontrol show job %s failed: %s", job_id, exc)
        return {}
    return parse_scontrol_job(out.stdout) if out.returncode == 0 else {}


def cancel_requested(run_dir: Path) -> bool:
    """`moe-orch cancel` records the request in run.json before it runs scancel."""
    try:
        record = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(isinstance(record, dict) and record.get("cancel_requested"))
