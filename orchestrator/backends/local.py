"""submitit's local executor (processes on this machine), both sides.

Login node (`LocalBackend`): a local job's id is the pid of submitit's controller process
(`python -m submitit.local._local`); it is alive while that process exists and is not a zombie.
A poll looks at those pids (no scheduler to ask); cancel sends the controller SIGINT, which it
turns into killing its tasks. There is no requeue and no node to exclude.

Inside the job (`LocalRunningJob`, every rank; standard library only): the time limit is submitit's
`SUBMITIT_LOCAL_TIMEOUT_S`, counted from this process's start; nothing requeues the job.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.rundir.runs import AttemptState, StopReason

if TYPE_CHECKING:  # type-only: the worker imports this module
    from orchestrator.backends.base import ArrayTask, Observation
    from orchestrator.rundir.runs import RunRecord
    from orchestrator.spec.schema import RunConfig

logger = logging.getLogger(__name__)

_PROCESS_START = time.time()
"""When this process started (about when submitit's controller started the task and its timer)."""

TIMEOUT_ENV = "SUBMITIT_LOCAL_TIMEOUT_S"
"""submitit's local controller tells each task its time limit (seconds) in this variable."""


# --- login node --------------------------------------------------------------------------------


@contextlib.contextmanager
def children_take_sigint() -> Iterator[None]:
    """Processes started inside this block get SIGINT's default handling, even where this process
    ignores it.

    NOTE: a process started with SIGINT ignored (`nohup moe-orch submit ... &`, a background job of a
    script: bash ignores SIGINT in those) hands the ignore down to submitit's local controller, and
    Python keeps an inherited ignore: `cancel`'s SIGINT would never reach the controller. The
    disposition is process-wide, so it changes only in the main thread and only for the block.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) != signal.SIG_IGN
    ):
        yield
        return
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def controller_alive(jid: str) -> bool:
    """Whether pid `jid` is alive and is submitit's local controller (not a zombie, not a reused pid
    of another program)."""
    if not jid.isdigit():
        return False
    proc = Path("/proc") / jid
    try:
        stat = (proc / "stat").read_text()
        cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0] if ")" in stat else "?"
    return state not in ("Z", "X") and "submitit" in cmdline


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children first found, by walking /proc's parent pids)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def local_alive(job_ids: Iterable[str]) -> dict[str, bool]:
    """Whether each local job's controller (pid = job id) is alive and is submitit's."""
    return {jid: controller_alive(jid) for jid in job_ids}


def apply_local(rec: RunRecord, alive: Mapping[str, bool], now: float) -> None:
    """Close attempts of local jobs whose controller process is gone without an `exit` event."""
    for att in rec.attempts:
        if not att.job_id:
            continue
        if att.state == AttemptState.ENDED:
            if att.slurm_state == "RUNNING":  # the worker wrote its exit event
                att.slurm_state = "EXITED"
            continue
        if alive.get(att.job_id, False):
            att.last_seen_alive = now
            att.slurm_state = "RUNNING"
            continue
        att.state = AttemptState.ENDED
        att.ended = now
        att.slurm_state = "EXITED"
        if rec.cancel_requested:
            att.stop_reason = StopReason.CANCELLED
        else:
            att.stop_reason = StopReason.FAILED
            att.error = att.error or "the local job ended without an exit event from the worker"


@dataclass
class LocalObservation:
    """Which local controllers were alive at one poll (`Observation`), by job id (= pid)."""

    alive_jobs: Mapping[str, bool] = field(default_factory=dict)

    def apply(self, rec: RunRecord, events: Sequence[Mapping[str, Any]], now: float) -> None:
        apply_local(rec, self.alive_jobs, now)

    def alive(self, job_id: str) -> bool:
        return bool(self.alive_jobs.get(job_id))


class LocalBackend:
    """submitit's LocalExecutor (`Backend`): every task a process on this machine."""

    name = "local"

    def check_config(self, cfg: RunConfig) -> None:
        return None  # the schema's rules (one node) are all a local run needs

    def config_warnings(self, cfg: RunConfig) -> list[str]:
        return []

    def submitit_parameters(self, cfg: RunConfig, options: Sequence[tuple[str, str]]) -> dict[str, Any]:
        c = cfg.cluster
        params: dict[str, Any] = {
            "tasks_per_node": c.tasks_per_node,
            "nodes": 1,
            "timeout_min": c.time_min,
            "signal_delay_s": c.signal_delay_s,
        }
        if c.setup:
            params["setup"] = list(c.setup)
        return params

    def make_executor(
        self, folder: Path, parameters: Mapping[str, Any], *, python: str, sbatch_lines: Sequence[str]
    ) -> Any:
        import submitit

        class _InterruptibleLocalExecutor(submitit.LocalExecutor):
            """submitit's LocalExecutor whose controllers take `cancel`'s SIGINT."""

            def _internal_process_submissions(self, submissions: Any) -> Any:
                with children_take_sigint():
                    return super()._internal_process_submissions(submissions)

        local = _InterruptibleLocalExecutor(folder=folder)
        local.update_parameters(**parameters)
        return local

    def submit_array(
        self,
        fn: Callable[..., Any],
        tasks: Sequence[ArrayTask],
        *,
        array_folder: Path,
        script_path: Path,
        parameters: Mapping[str, Any],
        python: str,
        sbatch_lines: Sequence[str],
        max_parallel: int | None,
    ) -> list[str]:
        # NOTE: no arrays here: every element is a local job of its own, submitted one after
        # another and all running at once (`max_parallel` is not enforced on one machine).
        return [
            str(
                self.make_executor(t.folder, parameters, python=python, sbatch_lines=())
                .submit(fn, *t.args)
                .job_id
            )
            for t in tasks
        ]

    def successor_script(
        self, folder: Path, parameters: Mapping[str, Any], *, python: str, sbatch_lines: Sequence[str]
    ) -> str | None:
        return None  # the schema allows chain with SLURM only

    def start_estimate(self, script: str) -> str | None:
        return None  # no queue

    def needs_scheduler(self, rec: RunRecord) -> bool:
        return False  # a pid check needs no final state from anyone

    def observe(self, records: Sequence[tuple[Path, RunRecord]]) -> dict[Path, Observation]:
        seen = LocalObservation(local_alive({a.job_id for _, r in records for a in r.attempts if a.job_id}))
        return {run_dir: seen for run_dir, _ in records}

    def cancel(self, job_id: str) -> None:
        if controller_alive(job_id):
            # NOTE: submitit's local controller turns SIGINT into killing its tasks (SIGINT, then
            # SIGKILL after 1 s), like LocalJob.cancel().
            os.kill(int(job_id), signal.SIGINT)

    def cancel_again(self, job_id: str, seen: Observation) -> bool:
        # NOTE: never: the controller's cleanup after the first SIGINT (`Controller.kill_tasks`:
        # SIGINT, wait 1 s, SIGKILL) would be cut short by a second KeyboardInterrupt.
        return False

    def unhealthy_nodes(self, nodes: Sequence[str]) -> list[str]:
        return []  # this machine is the only node

    def node_pool(self, partition: str | None) -> dict[str, str]:
        return {}

    def kill(self, job_id: str) -> None:
        if not controller_alive(job_id):
            return
        for pid in [*descendants(int(job_id)), int(job_id)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def env_withheld(self, names: Sequence[str], environ: Mapping[str, str]) -> list[str]:
        return []  # submitit's local controller and its tasks inherit the submitting environment


# --- inside the job ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalRunningJob:
    """A rank outside SLURM (`RunningJob`): under submitit's local executor, or started by hand
    (torchrun, `python -m worker`), where there is no time limit (`timeout_s` None)."""

    timeout_s: float | None = None
    process_start: float = _PROCESS_START

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> LocalRunningJob:
        value = env.get(TIMEOUT_ENV)
        return cls(timeout_s=float(value) if value else None)

    def time_limit_end(self) -> float | None:
        return None if self.timeout_s is None else self.process_start + self.timeout_s

    def requeue(self) -> bool:
        return False  # nothing requeues a local job: `moe-orch resume` (or running it again) does

    def term_is_cancellation(self) -> bool:
        return False  # `moe-orch cancel` says so in run.json; a bare SIGTERM is a stop to save at

    def exclude_next(self, hosts: Sequence[str], nodes_needed: int) -> str:
        return "one machine (local executor): the next attempt runs on the same node"

    def submit_successor(self, run_dir: Path) -> str | None:
        logger.warning("no successor: the local executor has no scheduler to chain jobs with")
        return None
