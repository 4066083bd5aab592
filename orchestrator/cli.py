"""`moe-orch`: thin Typer commands over the library; each parses options and calls one function.

Shared pieces for every command (add new commands below, in the same shape):
- `ConfigArg`, `SetOption`, `HomeOption`: the common arguments and options;
- `_run_cli(fn)`: runs the library call and maps a `MoeOrchError` to one red line per issue on
  stderr and the error's exit code (ConfigError: 2), never a traceback for a user's error;
- `_echo`, `_warn`, `_print_error`: plain lines through click (colour only on a terminal); `out`,
  `Console`, `Table`, `Text`: rich, imported at first use (`orchestrator/console.py`), only for
  the few tables and `--watch`;
- secrets never reach the terminal: error, warning and `_echo` lines and log records go through
  `orchestrator.redact` (status and logs redact in their library code too).

Nothing heavy is imported here: no torch, deepspeed or transformers, and submitit, matplotlib,
the schema (pydantic) and rich only inside the commands that use them, so `moe-orch --help` starts
fast.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from orchestrator.console import Console, Table, Text, out
from orchestrator.errors import ConfigError, MoeOrchError
from orchestrator.redact import RedactingFilter, redact

logger = logging.getLogger(__name__)

T = TypeVar("T")

app = typer.Typer(
    name="moe-orch",
    help="Train Mixture-of-Experts models on SLURM: validate, render, submit, watch, resume.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    # NOTE: click's plain help and usage errors: typer's rich help imports rich, markdown-it and
    # pygments, which tripled the time of `moe-orch --help` (issue 14, bench/cli_latency.py).
    rich_markup_mode=None,
)

DEFAULT_HOME = Path("runs")

# --- shared arguments and options -----------------------------------------------------------------

ConfigArg = Annotated[
    str,
    typer.Argument(
        metavar="CONFIG",
        help="A config file, or the name of a shipped config (`moe-orch configs` lists them).",
        show_default=False,
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        help="Override a config field, e.g. --set training.max_steps=20 (repeatable; the value is YAML).",
        show_default=False,
    ),
]
HomeOption = Annotated[
    Path | None,
    typer.Option(
        "--home",
        envvar="MOE_ORCH_HOME",
        help=f"Folder that holds the runs (default: ./{DEFAULT_HOME}).",
        show_default=False,
    ),
]


def home_dir(home: Path | None) -> Path:
    """The runs folder from `--home` / MOE_ORCH_HOME, else ./runs (absolute)."""
    return (home if home is not None else DEFAULT_HOME).expanduser().absolute()


# NOTE: plain lines go through click (typer.secho: colour only on a terminal), not rich: importing
# and starting rich's console cost ~30 ms of every `validate` (issue 14: validate <= 200 ms).
def _print_error(exc: MoeOrchError) -> None:
    lines = [str(issue) for issue in exc.issues] if isinstance(exc, ConfigError) else str(exc).splitlines()
    for line in lines or [type(exc).__name__]:
        typer.secho(f"error: {redact(line)}", fg="red", bold=True, err=True)


def _warn(lines: list[str]) -> None:
    for line in lines:
        typer.secho(f"warning: {redact(line)}", fg="yellow", err=True)


def _run_cli(fn: Callable[[], T]) -> T:
    """Run a library call; a MoeOrchError becomes one line per issue and its exit code."""
    try:
        return fn()
    except MoeOrchError as exc:
        logger.debug("command failed", exc_info=True)
        _print_error(exc)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.secho("interrupted", fg="red", err=True)
        raise typer.Exit(130) from None


@app.callback()
def _root() -> None:
    """Train Mixture-of-Experts models on SLURM: validate, render, submit, watch, resume."""


# --- commands -------------------------------------------------------------------------------------


@app.command()
def validate(
    config: ConfigArg,
    set_: SetOption = None,
    home: Annotated[
        Path | None,
        typer.Option(
            "--home",
            help="Check cluster.signal_delay_s against the checkpoint saves measured by the runs under "
            "this folder that have the same model and MoE layout.",
            show_default=False,
        ),
    ] = None,
    run: Annotated[
        str | None,
        typer.Option(
            "--run",
            help="Check cluster.signal_delay_s against this run's measured checkpoint saves "
            "(a run id under --home / $MOE_ORCH_HOME / ./runs, or its folder).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Check a config (schema, cross-field rules, data files) and print the run's numbers."""
    from orchestrator.lifecycle.validate import summary_lines, validate_file

    run_dir = None
    if run is not None:
        from orchestrator.rundir.runs import find_run, runs_home

        run_dir = _run_cli(lambda: find_run(runs_home(home), run))
    summary = _run_cli(lambda: validate_file(config, set_ or [], home=home, run_dir=run_dir))
    for line in summary_lines(summary):
        typer.echo(line)
    _warn(summary.warnings)
    typer.secho(f"ok: {config} is valid", fg="green")


@app.command()
def render(
    config: ConfigArg,
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Folder to write into; it serves as the run directory (logs/, run.yaml).",
            show_default=False,
        ),
    ],
    nodelist: Annotated[
        str | None,
        typer.Option(
            help="Nodes for the hostfile, as SLURM writes them (n[1-4]); default: $SLURM_JOB_NODELIST.",
            show_default=False,
        ),
    ] = None,
    set_: SetOption = None,
) -> None:
    """Write sbatch.sh, hostfile, ds_config.json, accelerate_config.yaml and run.yaml."""
    from orchestrator.render.files import nodelist_from_env, render_to_dir
    from orchestrator.spec.loading import load_config

    def go() -> dict[str, Path]:
        cfg = load_config(config, set_ or [])
        python = cfg.cluster.python or sys.executable
        return render_to_dir(cfg, out_dir, python=python, nodelist=nodelist or nodelist_from_env())

    paths = _run_cli(go)
    for path in paths.values():
        _echo(str(path))
    typer.secho(f"submit by hand: sbatch {paths['sbatch.sh']}", fg="green")


@app.command()
def schema(
    markdown: Annotated[
        bool, typer.Option("--markdown", help="The config reference as Markdown instead of JSON Schema.")
    ] = False,
    out_file: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Write to this file instead of stdout.", show_default=False),
    ] = None,
) -> None:
    """Print the config's JSON Schema (for editors) or its Markdown reference."""
    from orchestrator.spec.schemadoc import config_reference_markdown, schema_json

    text = config_reference_markdown() if markdown else schema_json()
    if out_file is None:
        sys.stdout.write(text)
        return

    def write() -> None:
        try:
            out_file.write_text(text)
        except OSError as exc:
            raise MoeOrchError(f"cannot write {out_file}: {exc.strerror or exc}") from None

    _run_cli(write)
    _echo(f"wrote {out_file}")


@app.command()
def configs() -> None:
    """List the configs shipped with moe-orch (usable by name in place of a path)."""
    from orchestrator.spec.catalog import shipped_configs

    table = Table(show_header=True, box=None, pad_edge=False)
    table.add_column("name", style="bold")
    table.add_column("description")
    for shipped in shipped_configs():
        table.add_row(shipped.name, shipped.description)
    out.print(table)


# --- runs: submit, status, logs, cancel, plot, watch, resume (library: orchestrator/lifecycle/submit.py,
# status.py, logs.py, plot.py, watch.py) ---------------------------------------------------------

RunArg = Annotated[str, typer.Argument(metavar="RUN", help="A run id (or a unique prefix), or its folder.")]


def _echo(line: str) -> None:
    typer.echo(redact(line))


def _find(home: Path | None, run: str) -> Path:
    from orchestrator.rundir.runs import find_run

    return _run_cli(lambda: find_run(home_dir(home), run))


@app.command()
def submit(
    config: ConfigArg,
    set_: SetOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would be submitted; submit nothing.")
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the run to its end; exit 0 only if it completed.")
    ] = False,
    home: HomeOption = None,
) -> None:
    """Validate, create a run (printing its id), render and submit it through submitit."""
    from orchestrator.lifecycle import submit as submit_lib

    if dry_run:
        _run_cli(lambda: submit_lib.dry_run(config, set_ or [], home=str(home_dir(home)), echo=_echo))
        return
    run_dir = _run_cli(lambda: submit_lib.submit(config, set_ or [], home=str(home_dir(home)), echo=_echo))
    if wait:
        from orchestrator.lifecycle.watch import follow
        from orchestrator.rundir.runs import RunState

        rec = _run_cli(lambda: follow(run_dir, _echo))
        if rec.state != RunState.COMPLETED:
            raise typer.Exit(1)


def _kind(home: Path | None, spec: str) -> tuple[str, Path]:
    """("sweep", folder) or ("run", run directory) for a RUN|SWEEP argument."""
    from orchestrator.lifecycle.sweep import resolve

    return _run_cli(lambda: resolve(home_dir(home), spec))


def _element_or_run(home: Path | None, spec: str, element: int | None) -> Path:
    kind, path = _kind(home, spec)
    if kind == "run":
        if element is not None:
            _print_error(MoeOrchError(f"{spec} is a run, not a sweep; leave out --element"))
            raise typer.Exit(2)
        return path
    from orchestrator.lifecycle.sweep import element_dir

    if element is None:
        _print_error(MoeOrchError(f"{spec} is a sweep: name an element with --element K (`status {spec}`)"))
        raise typer.Exit(2)
    return _run_cli(lambda: element_dir(path, element))


def _sweep_status(sweep_dir: Path, *, as_json: bool) -> None:
    import json

    from orchestrator.lifecycle.sweep import status_rows, sweep_status

    data = _run_cli(lambda: sweep_status(sweep_dir))
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    header, rows = status_rows(data)
    table = Table(box=None, pad_edge=False, title=f"sweep {data['sweep_id']}", title_justify="left")
    for col in header:
        table.add_column(col, no_wrap=col == "run")
    for row in rows:
        table.add_row(*(Text(v) for v in row))
    wide = out if out.is_terminal else Console(highlight=False, soft_wrap=True, width=250)
    wide.print(table)
    best = data["best"]
    line = f"best (lowest eval loss): element {best}" if best is not None else "best: no eval loss yet"
    wide.print(Text(line))


@app.command()
def sweep(
    config: ConfigArg,
    grid: Annotated[
        list[str] | None,
        typer.Option(
            "--grid",
            "-g",
            metavar="KEY=V1,V2,...",
            help="A config field and its values (repeatable; each value is YAML). Every combination of "
            "all grids (and the config's sweep.grid) is one element.",
            show_default=False,
        ),
    ] = None,
    max_parallel: Annotated[
        int | None,
        typer.Option(
            "--max-parallel", min=1, help="Elements running at once (--array=...%P).", show_default=False
        ),
    ] = None,
    set_: SetOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the elements and the rendered files; submit nothing.")
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the elements to their end; exit 0 only if all completed.")
    ] = False,
    home: HomeOption = None,
) -> None:
    """Run a grid of configs as ONE job array: each element a run of its own, in a sweep folder."""
    from orchestrator.lifecycle import sweep as sweep_lib

    grids, sets, root = grid or [], set_ or [], str(home_dir(home))
    if dry_run:
        _run_cli(
            lambda: sweep_lib.dry_run(config, sets, grids, max_parallel=max_parallel, home=root, echo=_echo)
        )
        return
    sweep_dir = _run_cli(
        lambda: sweep_lib.submit_sweep(config, sets, grids, max_parallel=max_parallel, home=root, echo=_echo)
    )
    if wait:
        from orchestrator.lifecycle.watch import watch as watch_runs

        dirs = [str(d) for d in sweep_lib.element_dirs(sweep_dir)]
        views = _run_cli(lambda: watch_runs(home_dir(home), dirs, interval=5.0, once=False, echo=_echo))
        _sweep_status(sweep_dir, as_json=False)
        if any(v.record.state != "completed" for v in views):
            raise typer.Exit(1)


def _status_lines(root: Path, show_all: bool) -> list[str]:
    """The `status` table as plain lines (lifecycle/status.py `list_status`, `format_table`)."""
    from orchestrator.lifecycle.status import format_table, list_status

    listing = list_status(root, show_all=show_all)
    lines = format_table(listing.rows)
    if listing.hidden_finished:
        lines.append(f"({listing.hidden_finished} older finished runs not shown; --all shows every run)")
    return lines


@app.command()
def status(
    run: Annotated[str | None, typer.Argument(metavar="[RUN]", help="Show one run in detail.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run record(s) as JSON.")] = False,
    show_all: Annotated[
        bool,
        typer.Option(
            "--all", help="Every run in the table (default: active runs and the 10 most recently finished)."
        ),
    ] = False,
    watch_: Annotated[bool, typer.Option("--watch", help="Refresh live until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --watch.")] = 2.0,
    home: HomeOption = None,
) -> None:
    """Active and recently finished runs as a table (state, attempts, step, loss, tokens/s, ETA),
    or one run in detail."""
    import json
    import time

    from orchestrator.lifecycle.poll import poll
    from orchestrator.lifecycle.status import detail_lines, run_detail
    from orchestrator.rundir import runs as runs_lib

    root = home_dir(home)
    if run and _kind(home, run)[0] == "sweep":
        _sweep_status(_kind(home, run)[1], as_json=as_json)
        return
    if run is None and not as_json:
        lines = _run_cli(lambda: _status_lines(root, show_all))
        if not lines:
            _echo(f"no runs under {root} (submit one with `moe-orch submit CONFIG`)")
            return
        if not watch_:
            # NOTE: plain text, as wide as it needs (rich took a second for 1,000 rows).
            sys.stdout.write("\n".join(lines) + "\n")
            return
    dirs = [_find(home, run)] if run else runs_lib.list_runs(root)

    def render() -> str:
        if run is None:
            return "\n".join(_status_lines(root, show_all))
        return "\n".join(detail_lines(run_detail(poll(dirs)[0])))

    if as_json:
        views = _run_cli(lambda: poll(dirs))
        data = [run_detail(v) for v in views]
        sys.stdout.write(json.dumps(data[0] if run else data, indent=2) + "\n")
        return
    if not watch_:
        # NOTE: plain text as wide as it needs (rich would squeeze columns to 80 characters when piped).
        sys.stdout.write(_run_cli(render) + "\n")
        return
    from rich.live import Live

    try:
        with Live(Text(_run_cli(render)), console=out, refresh_per_second=4) as live:
            while True:
                time.sleep(interval)
                live.update(Text(_run_cli(render)))
    except KeyboardInterrupt:
        return


@app.command()
def logs(
    run: RunArg,
    rank: Annotated[int | None, typer.Option("--rank", help="Only this global rank.")] = None,
    attempt: Annotated[
        int | None, typer.Option("--attempt", help="Only this attempt (see `status RUN`).")
    ] = None,
    follow_: Annotated[
        bool, typer.Option("--follow", "-f", help="Stream new lines until the run ends.")
    ] = False,
    stderr: Annotated[
        bool, typer.Option("--stderr", help="Show stderr (tracebacks) instead of stdout.")
    ] = False,
    tail: Annotated[int | None, typer.Option("--tail", help="Last N lines of each rank and attempt.")] = None,
    element: Annotated[
        int | None, typer.Option("--element", help="For a sweep: this element (see `status SWEEP`).")
    ] = None,
    home: HomeOption = None,
) -> None:
    """Every rank's output across attempts, each line prefixed with its rank (and attempt)."""
    from orchestrator.lifecycle.logs import follow_logs, show_logs

    run_dir = _element_or_run(home, run, element)
    _run_cli(lambda: show_logs(run_dir, rank=rank, attempt=attempt, stderr=stderr, tail=tail, echo=_echo))
    if follow_:
        _run_cli(lambda: follow_logs(run_dir, rank=rank, stderr=stderr, echo=_echo, start_at_end=True))


@app.command()
def cancel(run: RunArg, home: HomeOption = None) -> None:
    """Cancel the run's job; the run ends `cancelled` and is never requeued or resubmitted."""
    from orchestrator.lifecycle.control import cancel as cancel_run

    kind, path = _kind(home, run)
    if kind == "sweep":
        from orchestrator.lifecycle.sweep import cancel_sweep

        for line in _run_cli(lambda: cancel_sweep(path)):
            _echo(line)
        return
    rec = _run_cli(lambda: cancel_run(path))
    job = rec.current.job_id if rec.current else None
    _echo(f"{rec.run_id}: cancelled" + (f" (job {job})" if job else ""))


@app.command()
def plot(
    run: RunArg,
    out_file: Annotated[Path, typer.Option("--out", "-o", help="PNG file to write.", show_default=False)],
    home: HomeOption = None,
) -> None:
    """Plot loss, eval loss, tokens/s, expert load per layer and the expert_label x expert heatmap."""
    from orchestrator.lifecycle.plot import plot_run

    kind, target = _kind(home, run)
    if kind == "sweep":
        from orchestrator.lifecycle.sweep import plot_sweep

        path = _run_cli(lambda: plot_sweep(target, out_file))
        _echo(f"wrote {path}")
        return
    path = _run_cli(lambda: plot_run(target, out_file))
    _echo(f"wrote {path}")


@app.command()
def watch(
    runs: Annotated[
        list[str] | None, typer.Argument(metavar="[RUN]...", help="Runs to watch (default: all unfinished).")
    ] = None,
    interval: Annotated[float, typer.Option(help="Seconds between polls.")] = 30.0,
    once: Annotated[bool, typer.Option("--once", help="Reconcile once and exit.")] = False,
    home: HomeOption = None,
) -> None:
    """Resubmit attempts that died without a requeue, within the budgets; exclude failed nodes."""
    from orchestrator.lifecycle.sweep import sweep_run_dirs
    from orchestrator.lifecycle.watch import watch as watch_runs

    specs = _run_cli(lambda: sweep_run_dirs(home_dir(home), runs or []))  # a sweep: its elements
    _run_cli(lambda: watch_runs(home_dir(home), specs, interval=interval, once=once, echo=_echo))


NodesOption = Annotated[
    int | None, typer.Option("--nodes", min=1, help="Continue on this many nodes.", show_default=False)
]
TasksOption = Annotated[
    int | None,
    typer.Option("--tasks-per-node", min=1, help="Ranks per node (default: the run's).", show_default=False),
]
EpOption = Annotated[
    int | None,
    typer.Option("--ep-size", min=1, help="Expert-parallel size (default: the run's).", show_default=False),
]
CheckpointOption = Annotated[
    str | None,
    typer.Option("--checkpoint", help="Checkpoint tag, e.g. step-000120 (default: newest valid one)."),
]


@app.command()
def resume(
    run: RunArg,
    nodes: NodesOption = None,
    tasks_per_node: TasksOption = None,
    ep_size: EpOption = None,
    home: HomeOption = None,
) -> None:
    """Resubmit a stopped or failed run once (new job, same run; resumes from its checkpoint).

    With --nodes (--tasks-per-node, --ep-size) it continues at that topology: same global batch,
    adapted accumulation; the worker reshards the checkpoint when it starts."""
    from orchestrator.lifecycle.watch import resume as resume_run

    run_dir = _find(home, run)
    if nodes is not None or tasks_per_node is not None or ep_size is not None:
        from orchestrator.lifecycle.reshard import retarget_run
        from orchestrator.spec.loading import load_resolved

        def go() -> list[str]:
            cluster = load_resolved(run_dir / "run.yaml").cluster
            return retarget_run(
                run_dir, nodes=nodes or cluster.nodes, tasks_per_node=tasks_per_node, ep_size=ep_size
            ).lines()

        for line in _run_cli(go):
            _echo(line)
    rec = _run_cli(lambda: resume_run(run_dir))
    cur = rec.current
    job, number = (cur.job_id, cur.number) if cur else ("?", "?")
    _echo(f"{rec.run_id}: resubmitted as job {job} (attempt {number})")


@app.command()
def export(
    run: Annotated[
        str,
        typer.Argument(
            metavar="RUN",
            help="A run id (or a unique prefix), or a run directory with checkpoints/, also one that "
            "`python -m worker --run-dir DIR` (torchrun, sbatch.sh) trained without moe-orch.",
        ),
    ],
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for the Hugging Face model.", show_default=False)
    ],
    checkpoint: CheckpointOption = None,
    home: HomeOption = None,
) -> None:
    """Write a Hugging Face folder (weights, config, modeling code, tokenizer) from a checkpoint."""
    from orchestrator.lifecycle.export import export_run
    from orchestrator.rundir.runs import find_run_with_checkpoints

    run_dir = _run_cli(lambda: find_run_with_checkpoints(home_dir(home), run))
    path = _run_cli(lambda: export_run(run_dir, out_dir, tag=checkpoint))
    _echo(f"wrote {path}")


@app.command()
def reshard(
    run: Annotated[
        str,
        typer.Argument(
            metavar="RUN", help="A run id (or a unique prefix), or a run directory with checkpoints/."
        ),
    ],
    nodes: Annotated[
        int, typer.Option("--nodes", min=1, help="Nodes of the new topology.", show_default=False)
    ],
    tasks_per_node: TasksOption = None,
    ep_size: Annotated[
        int | None,
        typer.Option(
            "--ep-size", min=1, help="Expert-parallel size (default: the checkpoint's).", show_default=False
        ),
    ] = None,
    checkpoint: CheckpointOption = None,
    home: HomeOption = None,
) -> None:
    """Write a checkpoint's copy for another topology (<tag>-w<W>e<E>; offline, no GPUs needed)."""
    from orchestrator.lifecycle.reshard import reshard_run
    from orchestrator.rundir.runs import find_run_with_checkpoints
    from orchestrator.spec.topology import change_lines

    run_dir = _run_cli(lambda: find_run_with_checkpoints(home_dir(home), run))
    result = _run_cli(
        lambda: reshard_run(
            run_dir, nodes=nodes, tasks_per_node=tasks_per_node, ep_size=ep_size, tag=checkpoint
        )
    )
    if result is None:
        _echo("the checkpoint already has this topology; nothing written")
        return
    for line in change_lines(result.old, result.new):
        _echo(line)
    _echo(
        f"wrote {result.path} ({result.bytes / 1e6:.1f} MB, {result.written_bytes / 1e6:.1f} MB new, "
        f"{result.seconds:.1f} s)"
    )


def _only_invoked_command(argv: list[str]) -> None:
    """Keep only the command `argv` names (`moe-orch validate ...` -> `validate`) in `app`.

    NOTE: typer builds every command's parameters (signatures, annotations, help) before it runs
    one: ~25 ms of each call for 14 commands (issue 14: `validate` <= 200 ms). With one command
    left, `moe-orch CMD --help` and CMD's own usage errors read the same. `moe-orch --help`, an
    unknown command and shell completion keep them all.
    """
    if len(argv) < 2 or any(key.endswith("_COMPLETE") for key in os.environ):
        return
    names = {
        (info.name or typer.main.get_command_name(info.callback.__name__)): info
        for info in app.registered_commands
        if info.callback is not None
    }
    if argv[1] in names:
        app.registered_commands = [names[argv[1]]]


def main() -> None:
    """Entry point of the `moe-orch` script."""
    _only_invoked_command(sys.argv)
    logging.basicConfig(
        level=os.environ.get("MOE_ORCH_LOG_LEVEL", "WARNING").upper(),
        format="%(levelname)s %(name)s: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
    app()


if __name__ == "__main__":
    main()
