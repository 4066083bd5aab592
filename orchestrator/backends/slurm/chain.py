"""Chaining without requeue (`cluster.continue_with: chain`), inside the job: rank 0 submits the
job that continues the run, then this job ends.

- the successor runs the same batch script a single submission of the run sends
  (`<run>/logs/successor.sh`, written at submission by `SlurmBackend.successor_script`), held by
  `--dependency=afterany:<this job>` until this job has ended, whatever its end;
- submitit's runner in the successor loads `<run>/logs/<new id>_submitted.pkl`: a copy of this
  job's own pickle (the same job function and arguments), put in place before this job ends;
- sbatch runs with this job's environment minus what describes this job (`SLURM_*` but
  `SLURM_CONF`, `SUBMITIT_*`, the rendezvous variables), as a submission from the login node
  would: a successor of an array task is a plain job and must not read itself as an array task;
- whether a successor is sent at all: `successor_refusal`, the same budgets `reconcile` applies
  (`max_preemptions`, `max_attempts_without_progress`, `total_time_min`), read from the events.

Every rank may import this module: the standard library only.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SUCCESSOR_SCRIPT = "successor.sh"
"""In `<run>/logs/`: the batch script a chained job submits as its successor."""

_JOB_PREFIXES = ("SLURM_", "SLURMD_", "SUBMITIT_", "SBATCH_")
_KEEP = frozenset({"SLURM_CONF"})
_RENDEZVOUS = frozenset(
    {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"}
)


def successor_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` without the variables that describe the running job (see the module docstring)."""
    return {
        k: v for k, v in env.items() if k in _KEEP or not (k.startswith(_JOB_PREFIXES) or k in _RENDEZVOUS)
    }


def successor_refusal(
    events: Sequence[Mapping[str, Any]],
    *,
    now: float,
    step: int,
    max_preemptions: int | None,
    max_attempts_without_progress: int,
    total_time_min: int | None,
) -> str | None:
    """Why this stop (a preemption or time limit at `step`) must not be continued by a successor,
    or None: the budgets of `lifecycle.reconcile.check_budgets`, counted over the run's `exit`
    events plus this stop."""
    starts = [float(e["time"]) for e in events if e.get("event") == "start" and e.get("time") is not None]
    if total_time_min is not None and starts and now - min(starts) > total_time_min * 60:
        return (
            f"the run has run {(now - min(starts)) / 60:.1f} min since its first start, more than "
            f"cluster.total_time_min={total_time_min}"
        )
    exits = [e for e in events if e.get("event") == "exit"]
    stops = sum(1 for e in exits if e.get("reason") in ("preempted", "timeout")) + 1
    if max_preemptions is not None and stops > max_preemptions:
        return f"{stops} preemptions/time limits, more than cluster.max_preemptions={max_preemptions}"
    best, streak = 0, 0
    for at in [*(e.get("step") for e in exits), step]:
        value = at if isinstance(at, int) else 0
        if value > best:
            best, streak = value, 0
        else:
            streak += 1
    if streak >= max_attempts_without_progress:
        return (
            f"crash loop: {streak} consecutive attempts without a new step "
            f"(cluster.max_attempts_without_progress={max_attempts_without_progress})"
        )
    return None


_PARSABLE = re.compile(r"^(\d+)(?:;\S*)?$")


def submit_successor(job_id: str, run_dir: Path) -> str | None:
    """`sbatch --dependency=afterany:<job_id> <run>/logs/successor.sh`, then this job's pickle
    copied for the new job id; the new job id, or None (logged) when that failed."""
    logs = run_dir / "logs"
    script, pickle = logs / SUCCESSOR_SCRIPT, logs / f"{job_id}_submitted.pkl"
    for needed in (script, pickle):
        if not needed.is_file():
            logger.error("no successor for job %s: %s is missing", job_id, needed)
            return None
    args = ["sbatch", "--parsable", f"--dependency=afterany:{job_id}", str(script)]
    try:
        res = subprocess.run(
            args, capture_output=True, text=True, timeout=120, check=False, env=successor_env(os.environ)
        )
    except (OSError, subprocess.SubprocessError) as exc:
        logger.error("no successor for job %s: sbatch failed: %s", job_id, exc)
        return None
    found = _PARSABLE.match(res.stdout.strip())
    if res.returncode != 0 or found is None:
        logger.error("no successor for job %s: sbatch said %s", job_id, (res.stderr or res.stdout).strip())
        return None
    new_id = found.group(1)
    try:
        tmp = logs / f".{new_id}-{uuid.uuid4().hex}.pkl"
        shutil.copyfile(pickle, tmp)
        tmp.rename(logs / f"{new_id}_submitted.pkl")
    except OSError as exc:
        logger.error("successor %s has no job pickle (%s); cancelling it", new_id, exc)
        subprocess.run(["scancel", new_id], capture_output=True, timeout=60, check=False)
        return None
    logger.info("submitted successor job %s (after job %s ends)", new_id, job_id)
    return new_id
