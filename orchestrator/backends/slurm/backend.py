"""`SlurmBackend`: SLURM from the login node (the `Backend` interface), and its submitit executor.

SLURM options come from one place, `render.sbatch_options`: they are mapped onto submitit's
parameters (so submitit counts tasks and sets its timeout right), and the `#SBATCH` block of the
script submitit writes is replaced by the rendered one (`_RenderedSlurmExecutor`), so the options
sbatch receives are byte for byte those `render` and `--dry-run` show.

A poll (`observe`) asks squeue and sacct once for the jobs of every run that needs it, and reads
srun's task reports of each run's running or failed jobs; `SlurmObservation` applies both to a run.
"""

from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from orchestrator.backends.slurm import scheduler
from orchestrator.backends.slurm.attempts import apply_scheduler
from orchestrator.backends.slurm.injob import partition_nodes
from orchestrator.backends.slurm.task_reports import TaskExit, apply_task_exits, run_task_exits, worker_errors
from orchestrator.errors import SchedulerError, SubmissionError
from orchestrator.rundir.runs import AttemptState, RunState
from orchestrator.spec.secrets import not_exported

if TYPE_CHECKING:
    from orchestrator.backends.base import ArrayTask, Observation
    from orchestrator.rundir.runs import RunRecord
    from orchestrator.spec.schema import RunConfig

logger = logging.getLogger(__name__)

# NOTE: the worker requeues itself (scontrol requeue) on USR2/SIGTERM; submitit must never refuse
# a restart because it counted too many "timeouts" (budgets are ours: reconcile.check_budgets).
MAX_NUM_TIMEOUT = 1_000_000

# submitit parameter names for our sbatch keys (the rest go to `additional_parameters`).
_SUBMITIT_NAMES = {
    "job-name": "job_name",
    "nodes": "nodes",
    "ntasks-per-node": "ntasks_per_node",
    "gpus-per-node": "gpus_per_node",
    "cpus-per-task": "cpus_per_task",
    "time": "time",
    "partition": "partition",
    "account": "account",
    "qos": "qos",
    "constraint": "constraint",
    "exclude": "exclude",
}
_INT_PARAMS = {"nodes", "ntasks_per_node", "gpus_per_node", "cpus_per_task", "time"}

SETTLE_S = 600.0
"""After a run ends, keep asking the scheduler this long for its final state and exit code
(`finishing` -> COMPLETED; sacct rows arrive about a second after the state change)."""


def _settling(rec: RunRecord) -> bool:
    cur = rec.current
    if cur is None or not cur.job_id or cur.ended is None:
        return False
    # NOTE: squeue shows a finished job's final state before sacct has its row, and only sacct
    # gives the exit code.
    final = cur.slurm_state is not None and cur.slurm_state.split()[0] in scheduler.FINAL_STATES
    settled = final and cur.exit_code is not None
    return not settled and time.time() - cur.ended < SETTLE_S


def _slurm_executor_class() -> Any:
    import submitit

    class _RenderedSlurmExecutor(submitit.SlurmExecutor):
        """submitit's SlurmExecutor whose `#SBATCH` block is the rendered sbatch.sh's."""

        sbatch_lines: ClassVar[list[str]] = []

        def _make_submission_file_text(self, command: str, uid: str) -> str:
            text: str = super()._make_submission_file_text(command, uid)
            lines = text.splitlines()
            idx = [i for i, ln in enumerate(lines) if ln.startswith("#SBATCH")]
            if not idx or not self.sbatch_lines:
                return text
            out = (
                lines[: idx[0]]
                + list(self.sbatch_lines)
                + [ln for ln in lines[idx[0] :] if not ln.startswith("#SBATCH")]
            )
            return "\n".join(out) + "\n"

    return _RenderedSlurmExecutor


@dataclass
class SlurmObservation:
    """What one poll saw of one run's SLURM jobs (`Observation`): the squeue/sacct snapshot shared
    by every run of the poll (None when none of them needed the scheduler), and srun's task
    reports of this run's running or failed jobs, by job id."""

    snapshot: scheduler.Snapshot | None
    task_exits: Mapping[str, Sequence[TaskExit]] = field(default_factory=dict)

    def apply(self, rec: RunRecord, events: Sequence[Mapping[str, Any]], now: float) -> None:
        if self.snapshot is not None:
            apply_scheduler(rec, self.snapshot, now)
        if self.task_exits:
            apply_task_exits(rec, self.task_exits, worker_errors(events))

    def alive(self, job_id: str) -> bool:
        if self.snapshot is None:
            return False
        row = self.snapshot.queue.get(job_id)
        return row is not None and row.alive


class SlurmBackend:
    """SLURM through submitit's SlurmExecutor, squeue, sacct, sinfo and scancel (`Backend`)."""

    name = "slurm"

    def check_config(self, cfg: RunConfig) -> None:
        from orchestrator.render.files import sbatch_options

        # Values SLURM cannot take (a newline in a partition name) fail here, not at submit.
        sbatch_options(cfg, Path("/run-dir"))

    def config_warnings(self, cfg: RunConfig) -> list[str]:
        c = cfg.cluster
        out: list[str] = []
        if c.signal_delay_s * 2 > c.time_min * 60:
            out.append(
                f"cluster.signal_delay_s {c.signal_delay_s} is more than half of time_min {c.time_min} min: "
                "every attempt is told to save and stop before half of its time has run"
            )
        if c.partition is None:
            out.append("cluster.partition is unset: the cluster's default partition applies")
        return out

    def submitit_parameters(self, cfg: RunConfig, options: Sequence[tuple[str, str]]) -> dict[str, Any]:
        c = cfg.cluster
        params: dict[str, Any] = {"wckey": None, "signal_delay_s": c.signal_delay_s}
        extra: dict[str, Any] = {}
        for key, value in options:
            if key == "signal":
                continue  # submitit writes USR2@signal_delay_s itself
            name = _SUBMITIT_NAMES.get(key)
            if name is None:
                extra[key if key == "open-mode" else key.replace("-", "_")] = True if value == "" else value
            else:
                params[name] = int(value) if name in _INT_PARAMS else value
        if c.setup:
            params["setup"] = list(c.setup)
        from orchestrator.render.files import srun_args

        if srun_args(cfg):
            params["srun_args"] = srun_args(cfg)  # as sbatch.sh's srun: one rank per GPU
        params["additional_parameters"] = extra
        return params

    def make_executor(
        self, folder: Path, parameters: Mapping[str, Any], *, python: str, sbatch_lines: Sequence[str]
    ) -> Any:
        cls = _slurm_executor_class()
        try:
            ex = cls(folder=folder, max_num_timeout=MAX_NUM_TIMEOUT, python=shlex.quote(python))
        except RuntimeError as exc:
            raise SubmissionError(
                f"{exc}: `srun` is not on PATH. "
                "Submit from a SLURM login node, or set cluster.executor: local"
            ) from None
        ex.sbatch_lines = list(sbatch_lines)
        ex.update_parameters(**parameters)
        return ex

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
        from orchestrator.backends.slurm import array

        lines = array.array_sbatch_lines(
            sbatch_lines, count=len(tasks), max_parallel=max_parallel, array_folder=array_folder
        )
        try:
            script = array.array_script(
                _slurm_executor_class(), count=len(tasks), array_folder=array_folder, parameters=parameters,
                python=python, sbatch_lines=lines, max_num_timeout=MAX_NUM_TIMEOUT,
            )  # fmt: skip
        except RuntimeError as exc:
            raise SubmissionError(
                f"{exc}: `srun` is not on PATH. "
                "Submit from a SLURM login node, or set cluster.executor: local"
            ) from None
        return array.submit_array(
            fn, tasks, script=script, script_path=script_path, timeout_min=int(parameters.get("time", 5)),
            max_num_timeout=MAX_NUM_TIMEOUT,
        )  # fmt: skip

    def successor_script(
        self, folder: Path, parameters: Mapping[str, Any], *, python: str, sbatch_lines: Sequence[str]
    ) -> str | None:
        ex = self.make_executor(folder, parameters, python=python, sbatch_lines=sbatch_lines)
        text: str = ex._make_submission_file_text(ex._submitit_command_str, "successor")
        return text

    def start_estimate(self, script: str) -> str | None:
        return scheduler.start_estimate(script)

    def needs_scheduler(self, rec: RunRecord) -> bool:
        return not rec.final or rec.state == RunState.CANCELLED or _settling(rec)

    def observe(self, records: Sequence[tuple[Path, RunRecord]]) -> dict[Path, Observation]:
        asking = [rec for _, rec in records if self.needs_scheduler(rec)]
        job_ids = [
            a.job_id for rec in asking for a in rec.attempts if a.job_id and a.state != AttemptState.ENDED
        ]
        # Also the latest job of each run: its scheduler row says whether SLURM requeued it.
        job_ids += [rec.current.job_id for rec in asking if rec.current and rec.current.job_id]
        snap = scheduler.query(job_ids) if job_ids else None
        return {run_dir: SlurmObservation(snap, run_task_exits(rec, run_dir)) for run_dir, rec in records}

    def cancel(self, job_id: str) -> None:
        try:
            scheduler.scancel(job_id)
        except SchedulerError as exc:
            # A job that already ended cannot be cancelled; the record says cancelled either way.
            if "completed" not in str(exc) and "Invalid job id" not in str(exc):
                raise
            logger.info("%s", exc)

    def cancel_again(self, job_id: str, seen: Observation) -> bool:
        # NOTE: a requeue that raced the first scancel brings the job back; scancel it again.
        if not seen.alive(job_id):
            return False
        scheduler.scancel(job_id)
        return True

    def unhealthy_nodes(self, nodes: Sequence[str]) -> list[str]:
        return scheduler.unhealthy_nodes(nodes)

    def node_pool(self, partition: str | None) -> dict[str, str]:
        return partition_nodes(partition)

    def kill(self, job_id: str) -> None:
        # NOTE: `--full` reaches the batch script too, so the job ends (FAILED) instead of waiting
        # for its stopped tasks; a plain scancel would first SIGCONT and SIGTERM them.
        scheduler.scancel(job_id, "--signal=KILL", "--full")

    def env_withheld(self, names: Sequence[str], environ: Mapping[str, str]) -> list[str]:
        # NOTE: sbatch exports the submitting environment (`--export=ALL`) unless told otherwise;
        # SBATCH_EXPORT in that environment overrides the script's `#SBATCH --export` (which the
        # schema checks against the names).
        export = environ.get("SBATCH_EXPORT")
        return not_exported(export, names) if export is not None else []
