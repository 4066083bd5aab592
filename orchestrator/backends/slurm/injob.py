"""SLURM seen from inside the job: what rank 0 asks when the ranks stop on a signal.

- the job's time limit (`squeue -o %S|%l`: its start plus its limit), so a stop reads as `timeout`
  or `preempted`;
- `scontrol requeue`, when `cluster.requeue`;
- `scontrol show job -o`, to tell a cancellation (`scancel`) from a requeue or a preemption;
- after a hang, `sinfo` and `scontrol update ExcNodeList`, to keep a stuck rank's node out of the next run.

Also SLURM's time formats, which the login side (`scheduler.py`) parses with the same functions.
Every rank imports this module: the standard library only (no jinja2, typer, rich or submitit).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from orchestrator.backends.nodelist import plan_exclusion

logger = logging.getLogger(__name__)


def slurm_job_id(env: Mapping[str, str]) -> str | None:
    """The job id as moe-orch records it: `<array job id>_<task index>` for a job array's task
    (SLURM_ARRAY_JOB_ID, SLURM_ARRAY_TASK_ID; as squeue, sacct and submitit name it), else
    SLURM_JOB_ID; None outside SLURM.

    NOTE: an array task's SLURM_JOB_ID is an id of its own (`1236` for `1234_2`); scontrol, squeue,
    sacct and scancel take either spelling, but run.json, the events and the log names use
    `1234_2`. Ports are derived from SLURM_JOB_ID, unique per task (`worker/dist.py`).
    """
    array_id, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_id and task:
        return f"{array_id}_{task}"
    return env.get("SLURM_JOB_ID") or None


def parse_time(text: str) -> float | None:
    """`2026-11-28T15:20:01` (local time, as squeue, sacct and scontrol print it) -> Unix seconds;
    None for `Unknown`, `None`, `N/A`, `(null)` or empty."""
    text = text.strip()
    if not text or text in ("Unknown", "None", "N/A", "(null)"):
        return None
    # NOTE: datetime.fromisoformat, ~10x faster than time.strptime (two per job in every poll),
    # restricted to the one form SLURM prints.
    if len(text) != 19 or text[10] != "T":
        return None
    try:
        return datetime.fromisoformat(text).timestamp()  # naive: local time, as mktime read it
    except ValueError:
        return None


def parse_duration(text: str) -> float | None:
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


def time_limit_end(job_id: str) -> float | None:
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
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("squeue failed (%s); calling the stop a preemption", exc)
        return None
    lines = out.stdout.strip().splitlines()
    if not lines:
        return None
    start_text, _, limit_text = lines[0].partition("|")
    start, limit = parse_time(start_text), parse_duration(limit_text)
    return start + limit if start is not None and limit is not None else None


ALREADY_REQUEUED = "pending execution"
"""scontrol's answer when the job is already back in the queue (`scontrol requeue` by an admin,
or a preemption, sent the SIGTERM that stopped us): SLURM restarts it, as if we had requeued it."""


def requeue_job(job_id: str) -> bool:
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


def ignore_term() -> None:
    """In a child process before it runs: ignore SIGTERM (SIG_IGN survives exec).

    NOTE: `scontrol requeue` makes SLURM send SIGTERM to every process of the job's step at once,
    our own children included; the worker's handler keeps the rank alive, but an `sinfo` or
    `scontrol update` started after the requeue died with it (measured: the hang report's exclusion
    read an empty partition). Ignoring TERM, `scontrol update ExcNodeList` works while the job is
    COMPLETING, and the restart lands on another node.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def parse_scontrol_job(text: str) -> dict[str, str]:
    """`scontrol show job -o ID` -> {"Restarts": "0", "PreemptTime": "None", ...}."""
    fields: dict[str, str] = {}
    for token in text.split():
        key, sep, value = token.partition("=")
        if sep and key not in fields:
            fields[key] = value
    return fields


def scontrol_show_job(job_id: str) -> dict[str, str]:
    """The job's `scontrol show job -o` fields; {} when scontrol cannot tell."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id],
            capture_output=True, text=True, timeout=30, check=False, preexec_fn=ignore_term,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("scontrol show job %s failed: %s", job_id, exc)
        return {}
    return parse_scontrol_job(out.stdout) if out.returncode == 0 else {}


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


def partition_nodes(partition: str | None) -> dict[str, str]:
    """`sinfo -N`: the partition's nodes (every node when None) and their states; {} on failure."""
    args = ["sinfo", "-h", "-N", "-o", "%N|%T"] + (["-p", partition] if partition else [])
    try:
        out = subprocess.run(
            args, capture_output=True, text=True, timeout=30, check=False, preexec_fn=ignore_term
        )
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("sinfo failed: %s", exc)
        return {}
    pool: dict[str, str] = {}
    for line in out.stdout.splitlines():
        node, sep, state = line.strip().partition("|")
        if sep:
            pool[node] = state.rstrip("*~#!%$@^-")
    return pool


def exclude_next_run(job_id: str, hosts: Sequence[str], nodes_needed: int) -> str:
    """`plan_exclusion` for this job, applied with `scontrol update JobId=... ExcNodeList=...`
    (the job is pending again after its requeue)."""
    shown = scontrol_show_job(job_id)
    current = shown.get("ExcNodeList", "(null)")
    excluded = [] if current in ("(null)", "", "None") else current.split(",")
    pool = partition_nodes(os.environ.get("SLURM_JOB_PARTITION"))
    new, sentence = plan_exclusion(hosts, pool, excluded, nodes_needed)
    logger.warning("exclusion of %s: partition %s, excluded %s: %s", hosts, pool, excluded, sentence)
    if new is None:
        return sentence
    try:
        out = subprocess.run(
            ["scontrol", "update", f"JobId={job_id}", f"ExcNodeList={','.join(new)}"],
            capture_output=True, text=True, timeout=30, check=False, preexec_fn=ignore_term,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        return f"could not exclude {','.join(hosts)}: {exc}"
    if out.returncode != 0:
        return f"could not exclude {','.join(hosts)}: {(out.stderr or out.stdout).strip()}"
    return sentence


@dataclass(frozen=True)
class SlurmRunningJob:
    """The SLURM job this process runs in (`RunningJob`): one run of it, `restart_count` being its
    SLURM_RESTART_COUNT."""

    job_id: str
    restart_count: int = 0

    def time_limit_end(self) -> float | None:
        return time_limit_end(self.job_id)

    def requeue(self) -> bool:
        return requeue_job(self.job_id)

    def term_is_cancellation(self) -> bool:
        job = scontrol_show_job(self.job_id)
        return bool(job) and term_is_cancellation(job, self.restart_count)

    def exclude_next(self, hosts: Sequence[str], nodes_needed: int) -> str:
        return exclude_next_run(self.job_id, hosts, nodes_needed)

    def submit_successor(self, run_dir: Path) -> str | None:
        from orchestrator.backends.slurm.chain import submit_successor

        return submit_successor(self.job_id, run_dir)
