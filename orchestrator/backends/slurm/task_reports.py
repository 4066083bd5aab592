"""srun's reports of the tasks that ended badly, and what they say about a failed attempt.

Which rank died, on which node and how is not in sacct: a step's ExitCode is the highest of its
tasks' codes (`kill -9` of rank 1 gave step `FAILED 1:0`, from rank 0's exit 1, and job `FAILED 9:0`,
srun's own exit code). srun reports each task that ended badly on the batch script's stderr
(`srun: error: n2: task 1: Killed`), which the render sends to `logs/<job>_sbatch.err`
(`task_exits`); reading it is a file read, not a scheduler call. `apply_task_exits` names the rank
that ended first in each failed attempt's error, then what its peers said.
"""

from __future__ import annotations

import functools
import re
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.rundir.runs import AttemptState, StopReason

if TYPE_CHECKING:
    from orchestrator.rundir.runs import RunRecord

BATCH_STDERR = "{job_id}_sbatch.err"
"""The batch script's stderr under the run's `logs/` (render.py's `#SBATCH --error`), where srun
reports the tasks that ended badly. Every run of a requeued job appends to it (`--open-mode=append`)."""
TASK_REPORT_TAIL_BYTES = 64 * 1024
"""Only the end of the file is read: the last run's reports are there."""

# srun's `_task_finish`: "%s: %s %s: Exited with exit code %d", "%s: %s %s: %s%s" (strsignal, then
# " (core dumped)") and "%s: %s %s: Out Of Memory": hosts, "task"/"tasks", a range list of task ids.
_TASK_REPORT = re.compile(r"^srun: error: (?P<hosts>\S+): tasks? (?P<tasks>[0-9][0-9,-]*): (?P<how>.+?)\s*$")
_EXIT_CODE = re.compile(r"^Exited with exit code (\d+)$")
_CORE_DUMPED = " (core dumped)"
# A run that ends like this is followed by another run of the same job, whose reports come after:
# `slurmstepd-n1: error: *** JOB 2 ON n1 CANCELLED AT <time> DUE TO JOB REQUEUE ***`.
_RUN_ENDED = re.compile(
    r"\*\*\* (?:JOB|STEP) \S+ ON \S+ CANCELLED AT \S+ DUE TO |^srun: error: Node failure on "
)


@functools.cache
def _signals_by_text() -> dict[str, signal.Signals]:
    """`Killed` -> SIGKILL: srun prints `strsignal()`, which Python gives from the same C library."""
    return {text: sig for sig in signal.Signals if (text := signal.strsignal(sig))}


def _ranks(tasks: str) -> list[int]:
    """`0-2,7` -> [0, 1, 2, 7]."""
    out: list[int] = []
    for part in tasks.split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            out.extend(range(int(lo), int(hi or lo) + 1))
    return out


@dataclass(frozen=True)
class TaskExit:
    """One srun report of tasks (global ranks) that ended badly: `srun: error: n2: task 1: Killed`."""

    hosts: str  # the node, or a node list when srun groups tasks
    tasks: str  # srun's range list of task ids (= global ranks), e.g. "1" or "0-2,7"
    how: str  # srun's words: "Killed", "Exited with exit code 1", "Out Of Memory"

    @property
    def ranks(self) -> list[int]:
        return _ranks(self.tasks)

    @property
    def exit_code(self) -> int | None:
        match = _EXIT_CODE.match(self.how)
        return int(match.group(1)) if match else None

    @property
    def core_dumped(self) -> bool:
        return self.how.endswith(_CORE_DUMPED)

    @property
    def signal(self) -> int | None:
        sig = _signals_by_text().get(self.how.removesuffix(_CORE_DUMPED))
        return int(sig) if sig is not None else None

    @property
    def out_of_memory(self) -> bool:
        return self.how == "Out Of Memory"

    @property
    def died(self) -> bool:
        """Killed by a signal or the OOM killer: the process could not say why it stopped."""
        return self.signal is not None or self.out_of_memory

    def describe(self) -> str:
        """`rank 1 on n2 was killed by signal 9 (SIGKILL)`, `rank 0 on n1 exited with code 1`."""
        many = len(self.ranks) != 1
        who = f"{'ranks' if many else 'rank'} {self.tasks} on {self.hosts}"
        sig = self.signal
        if sig is not None:
            was = "were" if many else "was"
            core = ", core dumped" if self.core_dumped else ""
            return f"{who} {was} killed by signal {sig} ({signal.Signals(sig).name}){core}"
        if self.out_of_memory:
            return f"{who} ran out of memory"
        if self.exit_code is not None:
            return f"{who} exited with code {self.exit_code}"
        return f"{who}: {self.how}"


def parse_task_exits(text: str) -> list[TaskExit]:
    """srun's reports of the job's last run in the batch script's stderr, in the order the tasks
    ended (the first is the cause, the others usually its consequences)."""
    reports: list[TaskExit] = []
    for line in text.splitlines():
        line = line.strip()
        if _RUN_ENDED.search(line):
            reports = []  # an earlier run of a requeued job (or a node failure) ended here
            continue
        match = _TASK_REPORT.match(line)
        if match:
            reports.append(TaskExit(match.group("hosts"), match.group("tasks"), match.group("how")))
    return reports


def task_exits(run_dir: Path, job_id: str) -> list[TaskExit]:
    """srun's task reports for `job_id` from `<run_dir>/logs/<job>_sbatch.err` ([] when the file
    is missing or empty: no task ended badly)."""
    path = run_dir / "logs" / BATCH_STDERR.format(job_id=job_id)
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            if size == 0:
                return []
            f.seek(max(0, size - TASK_REPORT_TAIL_BYTES))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return parse_task_exits(text)


# --- a failed attempt's error ---------------------------------------------------------------------


def explain_failure(reports: Sequence[TaskExit], worker_error: str | None) -> str | None:
    """A failed attempt's error from srun's task reports (in the order the tasks ended) and rank 0's
    own error (its `exit` event): the rank that ended first is the cause, the rest what followed.
    None when the error already in the record says more."""
    if not reports:
        return None
    cause, *rest = reports
    if worker_error is not None:
        if 0 in cause.ranks:
            return None  # rank 0 ended first and said why (even if it then died at exit)
        # NOTE: rank 0 writes the events, so its error is a symptom when another rank ended first
        # (a dead peer shows as gloo's "Connection reset by peer ... GLHF!").
        return f"{cause.describe()}; then rank 0: {worker_error}"
    if not cause.died:
        return None  # it exited with a code: its pickled traceback says why (status.result_error)
    then = "; ".join(r.describe() for r in rest)
    return cause.describe() + (f"; then {then}" if then else "")


def apply_task_exits(
    rec: RunRecord, task_exits: Mapping[str, Sequence[TaskExit]], worker_errors: Mapping[str, str]
) -> None:
    """Name the rank that ended first in each failed attempt (srun's reports, by job id)."""
    for att in rec.attempts:
        if att.state != AttemptState.ENDED or att.stop_reason != StopReason.FAILED or not att.job_id:
            continue
        if att is not [a for a in rec.attempts if a.job_id == att.job_id][-1]:
            continue  # srun's reports are those of the job's last run
        explained = explain_failure(task_exits.get(att.job_id, ()), worker_errors.get(att.attempt_key or ""))
        if explained:
            att.error = explained


def worker_errors(events: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The error of each attempt's `exit` event, by attempt key (rank 0's words)."""
    key: str | None = None
    out: dict[str, str] = {}
    for ev in events:
        if ev.get("event") == "start":
            key = str(ev.get("attempt_key"))
        elif ev.get("event") == "exit" and key is not None and ev.get("error"):
            out[key] = str(ev["error"])
    return out


def run_task_exits(rec: RunRecord, run_dir: Path) -> dict[str, list[TaskExit]]:
    """srun's task reports of each job of `rec` that is running or failed (a file read per job,
    usually of an empty file)."""
    jobs = {
        a.job_id
        for a in rec.attempts
        if a.job_id and (a.state != AttemptState.ENDED or a.stop_reason == StopReason.FAILED)
    }
    return {job: reports for job in jobs if (reports := task_exits(run_dir, job))}
