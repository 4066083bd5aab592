"""`submit` and resubmission: the side effects (run directory, bundle, submitit executors).

The request is built apart from running it (`plan_submission` is pure apart from reading data
files): `--dry-run` prints the plan, `submit` creates the run and hands the plan to submitit.

Scheduler options come from one place, `render.sbatch_options`: the run's backend
(`backends.backend_for(cluster.executor)`) maps them onto its submitit executor's parameters and
builds that executor (under SLURM with the rendered `#SBATCH` block, so the options sbatch
receives are byte for byte those `render` and `--dry-run` show).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.backends import backend_for
from orchestrator.errors import (
    DataFileError,
    MoeOrchError,
    PassthroughMissingError,
    RunHomeError,
    SubmissionError,
)
from orchestrator.rundir import access, runs
from orchestrator.rundir.access import HomeMode
from orchestrator.rundir.runs import Attempt, AttemptState, RunRecord, RunState, StopReason

if TYPE_CHECKING:  # the schema (pydantic models) is not needed by status/cancel
    from orchestrator.spec.schema import RunConfig

logger = logging.getLogger(__name__)

Echo = Callable[[str], None]


@dataclass
class SubmissionPlan:
    """Everything `submit` would send, for one attempt."""

    cfg: RunConfig
    run_dir: Path
    python: str
    rendered: dict[str, str]
    executor: str
    parameters: dict[str, Any]
    env: dict[str, str]
    sbatch_lines: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"executor: {self.executor}", f"run directory: {self.run_dir}", f"python: {self.python}"]
        lines.append("submitit parameters:")
        lines += [f"  {k}: {v!r}" for k, v in sorted(self.parameters.items())]
        lines.append("environment set by the job function:")
        lines += [f"  {k}={v}" for k, v in sorted(self.env.items())]
        passthrough = self.cfg.cluster.env_passthrough
        if passthrough:
            lines.append("environment passed from the submitting shell (names only):")
            lines += [f"  {name}" for name in passthrough]
        return "\n".join(lines)


def job_env(cfg: RunConfig) -> dict[str, str]:
    """Environment the job function sets before starting the worker (same as sbatch.sh exports).

    It is pickled with the job (`logs/<job>_submitted.pkl`), so it holds `cluster.env` only, never
    `cluster.env_passthrough`: those reach the ranks through the process environment.
    """
    from orchestrator.spec.launch import job_env_defaults

    env = job_env_defaults(cfg)  # as sbatch.sh exports them
    env.update(cfg.cluster.env)
    return env


def check_passthrough(cfg: RunConfig, environ: Mapping[str, str] | None = None) -> None:
    """Raise PassthroughMissingError when a `cluster.env_passthrough` name would not reach the job
    submitted from `environ` (default: this process's environment); values are never read out."""
    from orchestrator.spec.secrets import missing_names

    env = os.environ if environ is None else environ
    names = cfg.cluster.env_passthrough
    missing = missing_names(names, env)
    if missing:
        listed = ", ".join(missing)
        raise PassthroughMissingError(
            f"cluster.env_passthrough names {listed}, which this shell does not set: "
            f"`export {missing[0]}=...` before submitting, or remove it from cluster.env_passthrough"
        )
    withheld = backend_for(cfg.cluster.executor).env_withheld(names, env)
    if withheld:
        listed = ", ".join(withheld)
        raise PassthroughMissingError(
            f"SBATCH_EXPORT in this shell keeps {listed} (cluster.env_passthrough) from the job: "
            f"unset SBATCH_EXPORT, or add {listed} to it"
        )


def python_command(cfg: RunConfig) -> str:
    return cfg.cluster.python or sys.executable


def plan_submission(cfg: RunConfig, run_dir: Path, *, exclude: list[str] | None = None) -> SubmissionPlan:
    """The submission for `cfg` into `run_dir` (nothing is written or submitted)."""
    from orchestrator.render.files import render, sbatch_options

    if exclude:
        cfg = cfg.model_copy(deep=True)
        cfg.cluster.exclude = sorted(set(cfg.cluster.exclude) | set(exclude))
    python = python_command(cfg)
    rendered = render(cfg, run_dir=run_dir, python=python)
    options = sbatch_options(cfg, run_dir)
    sbatch_lines = [ln for ln in rendered["sbatch.sh"].splitlines() if ln.startswith("#SBATCH")]
    return SubmissionPlan(
        cfg=cfg,
        run_dir=run_dir,
        python=python,
        rendered=rendered,
        executor=cfg.cluster.executor,
        parameters=backend_for(cfg.cluster.executor).submitit_parameters(cfg, options),
        env=job_env(cfg),
        sbatch_lines=sbatch_lines,
    )


# --- submit ---------------------------------------------------------------------------------------


def _load_and_check(config: str | Path, overrides: list[str]) -> tuple[RunConfig, Path]:
    from orchestrator.spec.loading import load_config, resolve_config_path
    from orchestrator.spec.qa_format import check_data_files

    cfg = load_config(config, overrides)
    issues = check_data_files(cfg)
    if issues:
        raise DataFileError(issues)
    return cfg, resolve_config_path(config)


def dry_run(config: str | Path, overrides: list[str], *, home: str | None, echo: Echo) -> SubmissionPlan:
    """Print what `submit` would send; create and submit nothing."""
    cfg, _ = _load_and_check(config, overrides)
    run_dir = runs.runs_home(home) / runs.new_run_id(cfg.name)
    plan = plan_submission(cfg, run_dir)
    echo(f"# dry run: nothing was created or submitted (the run would be {run_dir})")
    echo(f"# --- {run_dir}/rendered/sbatch.sh ---")
    echo(plan.rendered["sbatch.sh"].rstrip("\n"))
    echo("# --- submitit ---")
    echo(plan.describe())
    estimate = backend_for(plan.executor).start_estimate(plan.rendered["sbatch.sh"])
    if estimate is not None:
        echo(f"# queue estimate (sbatch --test-only): {estimate}")
    try:
        check_passthrough(cfg)
    except PassthroughMissingError as exc:
        echo(f"# submit would refuse: {exc}")
    try:
        access.check_home(runs.runs_home(home), HomeMode.configured())
    except RunHomeError as exc:
        echo(f"# submit would refuse: {exc}")
    return plan


def create_run(
    cfg: RunConfig,
    home: Path,
    config_file: Path | None,
    *,
    mode: HomeMode | None = None,
    run_id: str | None = None,
) -> tuple[Path, RunRecord]:
    """Create a new run directory (run.yaml, logs/, run.json) under `home`, and `home` if it does
    not exist, readable as `mode` says (default: `MOE_ORCH_HOME_MODE`; rundir/access.py). `run_id`:
    this id (a sweep's element), else a new one."""
    from orchestrator.spec.loading import dump_config

    mode = mode or HomeMode.configured()
    access.make_home(home, mode)
    with access.umask(access.files_umask(mode.dir_mode)):
        fixed = run_id
        while True:
            run_id = fixed or runs.new_run_id(cfg.name)
            run_dir = home / run_id
            try:
                access.make_run_dir(run_dir, mode)
                break
            except FileExistsError:
                if fixed:
                    raise
        (run_dir / "logs").mkdir()
        text = dump_config(cfg)
        (run_dir / "run.yaml").write_text(text)
    c = cfg.cluster
    record = RunRecord(
        run_id=run_id,
        name=cfg.name,
        config_hash=runs.config_hash(text),
        created=time.time(),
        executor=c.executor,
        run_dir=str(run_dir),
        home=str(home),
        config_source=str(config_file.resolve()) if config_file else None,
        budgets={
            "max_failures": c.max_failures,
            "max_preemptions": c.max_preemptions,
            "max_attempts_without_progress": c.max_attempts_without_progress,
            "max_hangs": c.max_hangs,
            "exclude_stragglers": c.exclude_stragglers,
            "straggler_factor": c.straggler_factor,
            "total_time_min": c.total_time_min,
        },
    )
    runs.write_run(run_dir, record)
    return run_dir, record


def prepare_attempt(run_dir: Path, cfg: RunConfig, *, freeze: str | None) -> tuple[SubmissionPlan, int]:
    """Render and bundle the next attempt of the run (nothing submitted): its plan and number."""
    from orchestrator.lifecycle.bundle import write_bundle
    from orchestrator.render.files import write_rendered

    rec = runs.read_run(run_dir)
    number = len(rec.attempts) + 1
    exclude = sorted(set(rec.excluded_nodes))
    plan = plan_submission(cfg, run_dir, exclude=exclude)
    write_rendered(plan.rendered, run_dir / "rendered")
    config_file = Path(rec.config_source) if rec.config_source else None
    write_bundle(
        run_dir,
        number,
        rendered=plan.rendered,
        config_file=config_file,
        freeze=freeze,
        passthrough=plan.cfg.cluster.env_passthrough,
    )
    write_successor_script(plan)
    return plan, number


def write_successor_script(plan: SubmissionPlan) -> None:
    """`cluster.continue_with: chain`: `<run>/logs/successor.sh`, the script a job of the run submits
    to continue it (backends/slurm/chain.py): what a single submission sends."""
    if plan.cfg.cluster.continue_with != "chain":
        return
    from orchestrator.backends.slurm.chain import SUCCESSOR_SCRIPT

    logs = plan.run_dir / "logs"
    text = backend_for(plan.executor).successor_script(
        logs, plan.parameters, python=plan.python, sbatch_lines=plan.sbatch_lines
    )
    if text is not None:
        (logs / SUCCESSOR_SCRIPT).write_text(text)


def record_refused(
    run_dir: Path, plan: SubmissionPlan, number: int, *, submitted: float, message: str, note: str | None
) -> None:
    """A submission the scheduler refused: recorded (run `failed`, its message), so the record never
    shows a job that does not exist."""

    def _failed(r: RunRecord) -> None:
        r.attempts.append(
            Attempt(
                number=number,
                job_id=None,
                submitted=submitted,
                ended=time.time(),
                state=AttemptState.ENDED,
                stop_reason=StopReason.FAILED,
                error=f"submission failed: {message}",
                exclude=plan.cfg.cluster.exclude,
                note=note,
            )
        )
        r.state, r.state_reason = RunState.FAILED, f"submission failed: {message}"

    runs.update_run(run_dir, _failed)


def record_submitted(
    run_dir: Path, plan: SubmissionPlan, number: int, job_id: str, *, submitted: float, note: str | None
) -> Attempt:
    """The submitted job as the run's next attempt (run `pending`)."""

    def _record(r: RunRecord) -> None:
        for att in r.attempts:
            if att.job_id == job_id:  # a poll saw the worker start before this update
                att.submitted = min(att.submitted or submitted, submitted)
                att.exclude, att.note = plan.cfg.cluster.exclude, note
                return
        r.attempts.append(
            Attempt(
                number=number, job_id=job_id, submitted=submitted, exclude=plan.cfg.cluster.exclude, note=note
            )
        )
        if not r.final:
            r.state, r.state_reason = RunState.PENDING, None

    rec = runs.update_run(run_dir, _record)
    return [a for a in rec.attempts if a.job_id == job_id][-1]


def job_arguments(run_dir: Path, plan: SubmissionPlan) -> tuple[str, str, dict[str, str]]:
    """What the job function (`lifecycle.job.run_worker`) is called with."""
    return str(run_dir / "run.yaml"), str(run_dir), plan.env


def submit_attempt(run_dir: Path, cfg: RunConfig, *, note: str | None, freeze: str | None) -> Attempt:
    """Render, bundle and submit one attempt of the run; record it in run.json.

    A refused submission is recorded (run state `failed`, the scheduler's message) and raised as
    SubmissionError: the record never shows a job that does not exist.
    """
    plan, number = prepare_attempt(run_dir, cfg, freeze=freeze)
    submitted = time.time()
    try:
        check_passthrough(plan.cfg)  # a resubmission from another shell: recorded as refused
        executor = backend_for(plan.executor).make_executor(
            plan.run_dir / "logs", plan.parameters, python=plan.python, sbatch_lines=plan.sbatch_lines
        )
        from orchestrator.lifecycle.job import run_worker

        job = executor.submit(run_worker, *job_arguments(run_dir, plan))
        job_id = str(job.job_id)
    except Exception as exc:  # submitit raises FailedJobError/FailedSubmissionError/OSError
        message = str(exc).strip() or type(exc).__name__
        record_refused(run_dir, plan, number, submitted=submitted, message=message, note=note)
        if isinstance(exc, MoeOrchError):
            raise
        raise SubmissionError(f"submission failed: {message}") from None
    logger.info("submitted %s as job %s", run_dir.name, job_id)
    return record_submitted(run_dir, plan, number, job_id, submitted=submitted, note=note)


def submit(
    config: str | Path,
    overrides: list[str],
    *,
    home: str | None,
    echo: Echo,
) -> Path:
    """Validate, create the run, submit attempt 1; returns the run directory."""
    from orchestrator.lifecycle.bundle import pip_freeze

    cfg, config_file = _load_and_check(config, overrides)
    check_passthrough(cfg)  # before anything exists, like a config error
    root = runs.runs_home(home)
    mode = HomeMode.configured()
    access.check_home(root, mode)  # others could swap the run directory, and what its job runs
    # Render once before anything exists: a value SLURM cannot take (ConfigError) creates nothing.
    plan_submission(cfg, root / runs.new_run_id(cfg.name))
    run_dir, _ = create_run(cfg, root, config_file, mode=mode)
    echo(run_dir.name)
    freeze = pip_freeze(cfg.cluster.python)
    with access.umask(access.run_dir_umask(run_dir)):  # the job's files, and the job's own umask
        attempt = submit_attempt(run_dir, cfg, note="first submission", freeze=freeze)
    logger.info("run %s: job %s", run_dir.name, attempt.job_id)
    return run_dir


# --- resume -------------------------------------------------------------------------------------


def resubmit(run_dir: Path, *, note: str) -> Attempt:
    """Submit a new attempt of an existing run (new job id, same run directory)."""
    from orchestrator.spec.loading import load_resolved

    rec = runs.read_run(run_dir)
    if rec.state == RunState.CANCELLED or rec.cancel_requested:
        raise SubmissionError(f"run {rec.run_id} was cancelled; a cancelled run never comes back")
    cfg = load_resolved(run_dir / "run.yaml")
    with access.umask(access.run_dir_umask(run_dir)):
        return submit_attempt(run_dir, cfg, note=note, freeze=None)
