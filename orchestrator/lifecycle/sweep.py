"""`sweep`: a grid of config values run as one job array, each element a run of its own.

- `plan_sweep` (no side effects but reading files): the cartesian product of `sweep.grid` (the
  config's) and `--grid KEY=V1,V2,...` (the command line's, replacing a key of the same name);
  each element is the config with `--set KEY=VALUE` for its values, validated like a `submit`
  (schema, data files, what SLURM can take). A job array shares one set of SLURM options, so an
  element whose rendered `#SBATCH` options differ from the first's is refused too. Every problem
  of every element is reported (`sweep element K (key=value, ...): field: message`), exit 2, and
  nothing is created or submitted.
- `submit_sweep`: the sweep folder (`rundir/sweeps.py`), one run directory per element (run.json,
  rendered files, bundle), then ONE submission through the run's backend (`Backend.submit_array`:
  SLURM `--array=0-(n-1)%P`, `backends/slurm/array.py`; the local executor submits one local job
  per element, all at once). From there each element is an ordinary run: requeue, resume, `watch`,
  `status RUN`, `logs RUN` work on it by its run id.
- The commands on an existing sweep (`status`, `cancel`, `logs --element`, `plot`, `watch` of a
  sweep) are `lifecycle/sweep_ops.py`'s.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.backends import backend_for
from orchestrator.backends.base import ArrayTask
from orchestrator.errors import ConfigError, ConfigIssue, MoeOrchError, SubmissionError
from orchestrator.rundir import access, runs, sweeps
from orchestrator.rundir.access import HomeMode
from orchestrator.rundir.sweeps import SweepElement, SweepRecord

if TYPE_CHECKING:
    from orchestrator.lifecycle.submit import SubmissionPlan
    from orchestrator.spec.schema import RunConfig

logger = logging.getLogger(__name__)

Echo = Callable[[str], None]
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


@dataclass
class SweepPlan:
    """Every element of a sweep, validated; nothing created yet."""

    config_file: Path
    grid: dict[str, list[Any]]
    max_parallel: int | None
    values: list[dict[str, Any]]  # per element: grid key -> value
    configs: list[RunConfig]

    @property
    def name(self) -> str:
        return self.configs[0].name

    def label(self, k: int) -> str:
        return SweepElement(k, "", self.values[k]).label()


def parse_grid(item: str) -> tuple[str, list[Any]]:
    """`--grid training.learning_rate=1e-3,3e-4` -> ("training.learning_rate", [0.001, 0.0003]);
    each value is YAML, as for `--set`."""
    import yaml

    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or not raw.strip():
        raise ConfigError(
            [
                ConfigIssue(
                    "", f"--grid {item!r}: expected KEY=V1,V2,..., e.g. training.learning_rate=1e-3,3e-4"
                )
            ]
        )
    values = []
    for part in raw.split(","):
        try:
            value = yaml.safe_load(part) if part.strip() else ""
        except yaml.YAMLError:
            value = part
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            value = float(value)  # NOTE: YAML 1.1 reads `1e-3` (no dot) as a string
        values.append(value)
    return key, values


def _check_grid(grid: dict[str, list[Any]]) -> None:
    issues = []
    if not grid:
        issues.append(
            ConfigIssue(
                "sweep.grid", "no grid to sweep: pass --grid KEY=V1,V2 or set sweep.grid in the config"
            )
        )
    for key, values in grid.items():
        if key == "sweep" or key.startswith("sweep.") or key == "name":
            issues.append(ConfigIssue(f"sweep.grid.{key}", f"{key} cannot be swept; sweep a config field"))
        elif not isinstance(values, list) or not values:
            issues.append(ConfigIssue(f"sweep.grid.{key}", "needs a non-empty list of values"))
    if issues:
        raise ConfigError(issues)


def _element_issues(k: int, label: str, exc: ConfigError) -> list[ConfigIssue]:
    out = []
    for issue in exc.issues:
        what = f"{issue.path}: {issue.message}" if issue.path else issue.message
        if issue.path and issue.message.startswith(issue.path + ":"):
            what = issue.message
        out.append(ConfigIssue("", f"sweep element {k} ({label}): {what}"))
    return out


def _options_key(cfg: RunConfig) -> list[tuple[str, str]]:
    """The element's SLURM options, apart from its own paths (equal across one array)."""
    from orchestrator.render.files import sbatch_options

    own = [(f"--{k}", v) for k, v in sbatch_options(cfg, Path("/run")) if k not in ("output", "error")]
    return [("cluster.executor", cfg.cluster.executor), *own]


def plan_sweep(
    config: str | Path, overrides: list[str], grid_items: list[str], *, max_parallel: int | None = None
) -> SweepPlan:
    """Validate every element of the sweep (see the module docstring); raises ConfigError with one
    issue per problem of every element."""
    from orchestrator.spec.loading import load_config, resolve_config_path
    from orchestrator.spec.qa_format import check_data_files

    base = load_config(config, overrides)  # the config itself must be valid first
    grid: dict[str, list[Any]] = dict(base.sweep.grid) if base.sweep else {}
    for item in grid_items:
        key, values = parse_grid(item)
        grid[key] = values
    _check_grid(grid)
    parallel = max_parallel if max_parallel is not None else (base.sweep.max_parallel if base.sweep else None)
    if parallel is not None and parallel < 1:
        raise ConfigError([ConfigIssue("sweep.max_parallel", f"must be at least 1, got {parallel}")])
    keys = list(grid)
    values = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]
    issues: list[ConfigIssue] = []
    configs: list[RunConfig] = []
    backend = backend_for(base.cluster.executor)
    first_options: list[tuple[str, str]] | None = None
    for k, element in enumerate(values):
        label = SweepElement(k, "", element).label()
        sets = [f"{key}={json.dumps(value)}" for key, value in element.items()]
        try:
            cfg = load_config(config, [*overrides, *sets])
            cfg.sweep = None
            data_issues = check_data_files(cfg)
            if data_issues:
                raise ConfigError(data_issues)
            backend.check_config(cfg)
            options = _options_key(cfg)
        except ConfigError as exc:
            issues += _element_issues(k, label, exc)
            continue
        if first_options is None:
            first_options = options
        elif options != first_options:
            diff = [f"{a[0]}={a[1]}" for a in options if a not in first_options] or ["(options removed)"]
            issues.append(
                ConfigIssue(
                    "",
                    f"sweep element {k} ({label}): its SLURM options differ from element 0's "
                    f"({', '.join(diff)}); one job array has one set of options: sweep such fields in "
                    "separate sweeps",
                )
            )
            continue
        configs.append(cfg)
    if issues:
        raise ConfigError(issues)
    return SweepPlan(resolve_config_path(config), grid, parallel, values, configs)


# --- dry run and submission ---------------------------------------------------------------------


def dry_run(
    config: str | Path,
    overrides: list[str],
    grid_items: list[str],
    *,
    max_parallel: int | None,
    home: str | None,
    echo: Echo,
) -> SweepPlan:
    """Print the elements and the rendered files; create and submit nothing."""
    from orchestrator.lifecycle.submit import plan_submission

    plan = plan_sweep(config, overrides, grid_items, max_parallel=max_parallel)
    sweep_dir = runs.runs_home(home) / runs.new_run_id(plan.name)
    n = len(plan.configs)
    parallel = min(n, plan.max_parallel or n)
    echo(f"# dry run: nothing was created or submitted (the sweep would be {sweep_dir})")
    echo(f"# {n} elements, one job array --array=0-{n - 1}%{parallel}")
    for k in range(n):
        echo(f"element {k}: {plan.label(k)}")
    first: SubmissionPlan | None = None
    for k, cfg in enumerate(plan.configs):
        sub = plan_submission(cfg, sweep_dir / f"{sweep_dir.name}-{k}")
        first = first or sub
        echo(f"# --- element {k}: rendered/sbatch.sh ---")
        echo(sub.rendered["sbatch.sh"].rstrip("\n"))
        echo(f"# --- element {k}: rendered/run.yaml ---")
        echo(sub.rendered["run.yaml"].rstrip("\n"))
    assert first is not None
    script = first.rendered["sbatch.sh"].replace(
        "#SBATCH --job-name", f"#SBATCH --array=0-{n - 1}%{parallel}\n#SBATCH --job-name", 1
    )
    estimate = backend_for(first.executor).start_estimate(script)
    if estimate is not None:
        echo(f"# queue estimate (sbatch --test-only): {estimate}")
    return plan


def submit_sweep(
    config: str | Path,
    overrides: list[str],
    grid_items: list[str],
    *,
    max_parallel: int | None,
    home: str | None,
    echo: Echo,
) -> Path:
    """Validate every element, create the sweep folder and the element runs, submit one array;
    returns the sweep folder. Prints the sweep id, then one line per element."""
    from orchestrator.lifecycle.bundle import pip_freeze
    from orchestrator.lifecycle.job import run_worker
    from orchestrator.lifecycle.submit import (
        check_passthrough,
        create_run,
        job_arguments,
        prepare_attempt,
        record_refused,
        record_submitted,
    )

    plan = plan_sweep(config, overrides, grid_items, max_parallel=max_parallel)
    base = plan.configs[0]
    check_passthrough(base)
    root = runs.runs_home(home)
    mode = HomeMode.configured()
    access.check_home(root, mode)
    access.make_home(root, mode)
    with access.umask(access.files_umask(mode.dir_mode)):
        while True:
            sweep_id = runs.new_run_id(plan.name)
            sweep_dir = root / sweep_id
            try:
                access.make_run_dir(sweep_dir, mode)
                break
            except FileExistsError:
                continue
        (sweep_dir / sweeps.ELEMENTS_DIR).mkdir()
    record = SweepRecord(
        sweep_id=sweep_id, name=plan.name, created=time.time(), executor=base.cluster.executor,
        sweep_dir=str(sweep_dir), config_source=str(plan.config_file), grid=plan.grid,
        max_parallel=plan.max_parallel,
    )  # fmt: skip
    run_dirs: list[Path] = []
    for k, cfg in enumerate(plan.configs):
        run_dir, _ = create_run(cfg, sweep_dir, plan.config_file, mode=mode, run_id=f"{sweep_id}-{k}")
        (sweep_dir / sweeps.ELEMENTS_DIR / str(k)).symlink_to(Path("..") / run_dir.name)
        record.elements.append(SweepElement(k, run_dir.name, plan.values[k]))
        run_dirs.append(run_dir)
    sweeps.write_sweep(sweep_dir, record)
    echo(sweep_id)
    for element in record.elements:
        echo(f"  element {element.index}: {element.run_id} ({element.label()})")
    freeze = pip_freeze(base.cluster.python)
    with access.umask(access.run_dir_umask(sweep_dir)):
        prepared = [
            prepare_attempt(run_dir, cfg, freeze=freeze)
            for run_dir, cfg in zip(run_dirs, plan.configs, strict=True)
        ]
        first = prepared[0][0]
        note = "first submission (sweep element {k})"
        submitted = time.time()
        try:
            job_ids = backend_for(first.executor).submit_array(
                run_worker,
                [
                    ArrayTask(run_dir / "logs", job_arguments(run_dir, p))
                    for run_dir, (p, _) in zip(run_dirs, prepared, strict=True)
                ],
                array_folder=sweep_dir / sweeps.ELEMENTS_DIR / "%a" / "logs",
                script_path=sweep_dir / sweeps.ARRAY_SCRIPT,
                parameters=first.parameters,
                python=first.python,
                sbatch_lines=first.sbatch_lines,
                max_parallel=plan.max_parallel,
            )
        except Exception as exc:
            message = str(exc).strip() or type(exc).__name__
            for k, (run_dir, (p, number)) in enumerate(zip(run_dirs, prepared, strict=True)):
                record_refused(
                    run_dir, p, number, submitted=submitted, message=message, note=note.format(k=k)
                )
            if isinstance(exc, MoeOrchError):
                raise
            raise SubmissionError(f"submission failed: {message}") from None
    for k, (run_dir, (p, number)) in enumerate(zip(run_dirs, prepared, strict=True)):
        record_submitted(run_dir, p, number, job_ids[k], submitted=submitted, note=note.format(k=k))
    array_ids = {j.split("_")[0] for j in job_ids if "_" in j}
    record.array_job_id = array_ids.pop() if len(array_ids) == 1 else None
    sweeps.write_sweep(sweep_dir, record)
    logger.info("sweep %s: %d elements, jobs %s", sweep_id, len(job_ids), ", ".join(job_ids))
    return sweep_dir
