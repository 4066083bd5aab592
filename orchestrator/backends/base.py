"""The scheduler backend interface: what lifecycle code and the worker ask of a scheduler.

A backend holds both sides of one scheduler, like submitit's `slurm/` and `local/`:
- `Backend`, the login node's side: the submitit executor for a submission, one batched look at
  the jobs of many runs (`observe`), cancelling a job, the nodes to keep out of the next attempt,
  and the config checks that only this scheduler needs;
- `RunningJob`, the side inside the job (every rank may import it; nothing heavier than the
  standard library): when the job's time limit ends, requeueing it, and whether a SIGTERM was a
  cancellation.

`orchestrator.backends.backend_for(executor)` gives the `Backend` for `cluster.executor` (and for
a run's `run.json`). Lifecycle code never asks which scheduler it talks to: a branch on the executor
there is a missing method here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # type-only: the worker imports this module
    from orchestrator.rundir.runs import RunRecord
    from orchestrator.spec.schema import RunConfig


class Observation(Protocol):
    """What one poll of the scheduler saw of one run's jobs (gathered BEFORE the run's events are
    read, so an `exit` event written just before the process ended is never missed).
    `lifecycle.reconcile` applies it to the run record; it never calls the scheduler itself."""

    def apply(self, rec: RunRecord, events: Sequence[Mapping[str, Any]], now: float) -> None:
        """Close or update the attempts the worker's events leave open or unexplained (a job that
        died without an `exit` event, a requeue the scheduler did by itself, the rank that died)."""

    def alive(self, job_id: str) -> bool:
        """Whether the scheduler still has `job_id` (pending, running or requeued)."""


@dataclass(frozen=True)
class ArrayTask:
    """One element of a job array: its submitit folder (`<run>/logs`) and the job function's
    arguments."""

    folder: Path
    args: tuple[Any, ...]


class Backend(Protocol):
    """The login node's side of one scheduler."""

    name: str
    """The `cluster.executor` value (`slurm`, `local`)."""

    def check_config(self, cfg: RunConfig) -> None:
        """Raise ConfigError for values this scheduler cannot take (before anything is created)."""

    def config_warnings(self, cfg: RunConfig) -> list[str]:
        """Advice for `validate` that only this scheduler needs (nothing stops the run)."""

    def submitit_parameters(self, cfg: RunConfig, options: Sequence[tuple[str, str]]) -> dict[str, Any]:
        """`render.sbatch_options` (the rendered scheduler options) as the keywords of this
        backend's submitit executor `update_parameters`."""

    def make_executor(
        self, folder: Path, parameters: Mapping[str, Any], *, python: str, sbatch_lines: Sequence[str]
    ) -> Any:
        """A configured submitit executor writing into `folder` (`<run>/logs`). Raises
        SubmissionError when this scheduler cannot be reached from here."""

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
        """Submit `fn(*task.args)` for every task as one job array (SLURM: one `sbatch
        --array=0-(n-1)%P`, task k's submitit files in `tasks[k].folder`, which `array_folder`
        names with `%a`; the script is kept at `script_path`); the job ids, in task order.
        Raises SubmissionError when the scheduler refuses it (nothing was submitted)."""

    def successor_script(
        self, folder: Path, parameters: Mapping[str, Any], *, python: str, sbatch_lines: Sequence[str]
    ) -> str | None:
        """The batch script a job of this run submits as its successor (`cluster.continue_with:
        chain`): what a single submission of the run sends; None where jobs cannot chain."""

    def start_estimate(self, script: str) -> str | None:
        """The scheduler's own estimate of when a job of this batch script would start (SLURM:
        `sbatch --test-only`); None where there is no scheduler to ask."""

    def needs_scheduler(self, rec: RunRecord) -> bool:
        """Whether a poll must ask the scheduler about `rec` even though its record says final
        (a cancelled job that may still run, a final state or exit code not in yet)."""

    def observe(self, records: Sequence[tuple[Path, RunRecord]]) -> dict[Path, Observation]:
        """One look at the jobs of all `records` (one batched scheduler call, whatever their
        number), before their events are read; an observation for each run directory."""

    def cancel(self, job_id: str) -> None:
        """Cancel `job_id`; a job that already ended is not an error. Raises SchedulerError."""

    def cancel_again(self, job_id: str, seen: Observation) -> bool:
        """For a run already recorded `cancelled` whose job `seen` still shows alive: cancel it
        again when this scheduler needs that. Returns whether a cancel was sent."""

    def unhealthy_nodes(self, nodes: Sequence[str]) -> list[str]:
        """Those of `nodes` the scheduler reports down or failing (excluded from the next attempt)."""

    def node_pool(self, partition: str | None) -> dict[str, str]:
        """The partition's nodes and their states ({} where there is no pool to choose from)."""

    def kill(self, job_id: str) -> None:
        """End a frozen job now: SIGKILL to every process (a stopped process cannot save, and a
        SIGTERM it only sees once thawed would read as a cancellation)."""

    def env_withheld(self, names: Sequence[str], environ: Mapping[str, str]) -> list[str]:
        """Those of `names` (`cluster.env_passthrough`, all set in `environ`) that a job submitted
        from `environ` would still not receive (SLURM: an `SBATCH_EXPORT` list without them)."""


class RunningJob(Protocol):
    """The side inside the job: what rank 0 asks about the job it runs in when it stops."""

    def time_limit_end(self) -> float | None:
        """When the job's time limit ends (Unix seconds); None when there is none or nobody can tell."""

    def requeue(self) -> bool:
        """Put the job back in the queue to run again; whether it will (False where no scheduler
        requeues: the run is resumed by `moe-orch resume`, or by running the worker again)."""

    def term_is_cancellation(self) -> bool:
        """Whether the SIGTERM this job got cancels it (so it must not be requeued)."""

    def exclude_next(self, hosts: Sequence[str], nodes_needed: int) -> str:
        """Keep `hosts` out of the job's next run (after a requeue) when enough other nodes remain
        for `nodes_needed`; returns a sentence saying what was done, or why not."""

    def submit_successor(self, run_dir: Path) -> str | None:
        """Submit the job that continues this run once this one ends (`cluster.continue_with:
        chain`); its job id, or None where it could not (the reason is logged)."""
