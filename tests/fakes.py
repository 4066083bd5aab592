"""A fake SLURM at the subprocess boundary, like submitit's `MockedSubprocess`.

`FakeSlurm.context()` patches `subprocess.run`, `subprocess.check_output`, `subprocess.check_call`,
submitit's `CommandFunction` (how it runs sbatch) and `shutil.which`. It answers `sbatch` (also a
job array's `#SBATCH --array=0-N%P`: tasks `<id>_0..<id>_N`; `--test-only`; `--parsable`,
`--dependency`),
`squeue`, `sacct`, `sinfo`, `scancel`, `git` and `pip freeze` from its own state and RAISES on any
other command, so a test can never pass by running something real by accident.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest.mock import patch


class UnknownCommandError(AssertionError):
    """The code under test ran a command the fake does not know."""


def slurm_time(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))


@dataclass
class FakeJob:
    job_id: str
    script: str
    submit: float
    queue_state: str | None = "PENDING"  # None: gone from squeue
    nodelist: str = ""
    reason: str = "None"
    # sacct -D rows: (state, exit_code, nodelist)
    acct: list[tuple[str, str, str]] = field(default_factory=list)
    dependency: str | None = None  # sbatch --dependency=...


class FakeSlurm:
    def __init__(self, first_job_id: int = 100) -> None:
        self.next_id = first_job_id
        self.jobs: dict[str, FakeJob] = {}
        self.calls: list[list[str]] = []
        self.sbatch_error: str | None = None
        self.node_states: dict[str, str] = {}
        self.on_scancel: Callable[[str], None] | None = None
        self.pip_freeze = "fakepkg==1.0\n"
        self.array_scripts: dict[str, str] = {}  # job id -> the array's script ("" for a single job)

    # --- state helpers for tests ---
    def set_state(self, job_id: str, queue_state: str | None, nodelist: str = "n[1-2]") -> None:
        job = self.jobs[job_id]
        job.queue_state = queue_state
        job.nodelist = nodelist

    def add_acct(self, job_id: str, state: str, exit_code: str = "0:0", nodelist: str = "n[1-2]") -> None:
        self.jobs[job_id].acct.append((state, exit_code, nodelist))

    def count(self, program: str) -> int:
        return sum(1 for c in self.calls if c and c[0] == program)

    # --- command handlers ---
    def _sbatch(self, args: Sequence[str]) -> str:
        if self.sbatch_error is not None:
            from submitit.core.utils import FailedJobError

            raise FailedJobError(self.sbatch_error)
        job_id = str(self.next_id)
        self.next_id += 1
        script = Path(args[-1]).read_text() if Path(args[-1]).exists() else ""
        dependency = next((a.split("=", 1)[1] for a in args if a.startswith("--dependency=")), None)
        array = re.search(r"^#SBATCH --array=0-(\d+)(?:%\d+)?$", script, re.M)
        self.array_scripts[job_id] = script if array else ""
        for jid in [f"{job_id}_{k}" for k in range(int(array.group(1)) + 1)] if array else [job_id]:
            self.jobs[jid] = FakeJob(jid, script, time.time(), dependency=dependency)
        return f"{job_id}\n" if "--parsable" in args else f"Submitted batch job {job_id}"

    def _squeue(self, args: Sequence[str]) -> str:
        ids = args[args.index("-j") + 1].split(",")
        lines = []
        for jid in ids:
            job = self.jobs.get(jid)
            if job is None or job.queue_state is None:
                continue
            lines.append(
                f"{jid}|{job.queue_state}|{job.reason}|{job.nodelist}|{slurm_time(job.submit)}|{slurm_time(job.submit)}"
            )
        return "\n".join(lines) + ("\n" if lines else "")

    def _sacct(self, args: Sequence[str]) -> str:
        ids = args[args.index("-j") + 1].split(",")
        lines = []
        for jid in ids:
            job = self.jobs.get(jid)
            if job is None:
                continue
            for state, code, nodes in job.acct:
                t = slurm_time(job.submit)
                lines.append(f"{jid}|{state}|{code}|{t}|{t}|{t}|{nodes}")
        return "\n".join(lines) + ("\n" if lines else "")

    def _sinfo(self, args: Sequence[str]) -> str:
        return "".join(f"{n}|{s}\n" for n, s in self.node_states.items())

    def _scancel(self, args: Sequence[str]) -> str:
        jid = args[-1]
        if self.on_scancel is not None:
            self.on_scancel(jid)
        job = self.jobs.get(jid)
        if job is not None and "--signal=KILL" in args:
            # `scancel --signal=KILL --full`: every process killed, the job ends FAILED (not cancelled).
            job.queue_state = "FAILED"
            job.acct.append(("FAILED", "0:9", job.nodelist or "n1"))
        elif job is not None:
            job.queue_state = "CANCELLED"
            job.acct.append(("CANCELLED by 0", "0:0", job.nodelist or "n1"))
        return ""

    def handle(self, command: Sequence[str]) -> tuple[int, str, str]:
        cmd = [str(c) for c in command]
        self.calls.append(cmd)
        program = Path(cmd[0]).name
        if program == "sbatch" and "--test-only" in cmd:
            at = "to start at 2031-01-01T00:00:00 using 2 processors on nodes n[1-2] in partition debug"
            return 0, "", f"sbatch: Job 4242 {at}\n"
        if program in ("sbatch", "squeue", "sacct", "sinfo", "scancel"):
            return 0, getattr(self, f"_{program}")(cmd[1:]), ""
        if program == "git":
            return 128, "", "fatal: not a git repository"
        if len(cmd) >= 4 and cmd[1:4] == ["-m", "pip", "freeze"]:
            return 0, self.pip_freeze, ""
        raise UnknownCommandError(f"FakeSlurm does not know the command {cmd!r}")

    # --- the patched functions ---
    def run(self, command: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        code, out, err = self.handle(command)
        return subprocess.CompletedProcess(list(command), code, out, err)

    def check_output(self, command: Sequence[str], **kwargs: Any) -> bytes:
        code, out, err = self.handle(command)
        if code:
            raise subprocess.CalledProcessError(code, list(command), out, err)
        return out.encode()

    def check_call(self, command: Sequence[str], **kwargs: Any) -> int:
        self.check_output(command)
        return 0

    def command_function(self, command: list[str], *args: Any, **kwargs: Any) -> Callable[[], str]:
        return lambda: self.handle(command)[1]

    @staticmethod
    def which(name: str) -> str | None:
        return f"/fake/bin/{name}" if name in ("srun", "sbatch", "squeue", "sacct", "scancel") else None

    @contextlib.contextmanager
    def context(self) -> Iterator[FakeSlurm]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(patch("submitit.core.utils.CommandFunction", new=self.command_function))
            stack.enter_context(patch("subprocess.run", new=self.run))
            stack.enter_context(patch("subprocess.check_output", new=self.check_output))
            stack.enter_context(patch("subprocess.check_call", new=self.check_call))
            stack.enter_context(patch("shutil.which", new=self.which))
            yield self
