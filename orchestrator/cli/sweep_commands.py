"""`sweep`, and what the run commands do with a sweep: a RUN|SWEEP argument (`kind`), `--element`
(`element_or_run`), the `status SWEEP` table (`show_sweep_status`). Library:
`lifecycle/sweep.py` (planning, submission), `lifecycle/sweep_ops.py` (an existing sweep)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from orchestrator.cli.shared import ConfigArg, HomeOption, SetOption, echo, home_dir, print_error, run_cli
from orchestrator.console import Console, Table, Text, out
from orchestrator.errors import MoeOrchError


def kind(home: Path | None, spec: str) -> tuple[str, Path]:
    """("sweep", folder) or ("run", run directory) for a RUN|SWEEP argument."""
    from orchestrator.lifecycle.sweep_ops import resolve

    return run_cli(lambda: resolve(home_dir(home), spec))


def element_or_run(home: Path | None, spec: str, element: int | None) -> Path:
    """The run directory of RUN, or of SWEEP's `--element K`."""
    found, path = kind(home, spec)
    if found == "run":
        if element is not None:
            print_error(MoeOrchError(f"{spec} is a run, not a sweep; leave out --element"))
            raise typer.Exit(2)
        return path
    from orchestrator.lifecycle.sweep_ops import element_dir

    if element is None:
        print_error(MoeOrchError(f"{spec} is a sweep: name an element with --element K (`status {spec}`)"))
        raise typer.Exit(2)
    return run_cli(lambda: element_dir(path, element))


def show_sweep_status(sweep_dir: Path, *, as_json: bool) -> None:
    """`status SWEEP`: a table of its elements and the best one (rich), or `--json`."""
    import json

    from orchestrator.lifecycle.sweep_ops import status_rows, sweep_status

    data = run_cli(lambda: sweep_status(sweep_dir))
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
        run_cli(
            lambda: sweep_lib.dry_run(config, sets, grids, max_parallel=max_parallel, home=root, echo=echo)
        )
        return
    sweep_dir = run_cli(
        lambda: sweep_lib.submit_sweep(config, sets, grids, max_parallel=max_parallel, home=root, echo=echo)
    )
    if wait:
        from orchestrator.lifecycle.sweep_ops import element_dirs
        from orchestrator.lifecycle.watch import watch as watch_runs

        dirs = [str(d) for d in element_dirs(sweep_dir)]
        views = run_cli(lambda: watch_runs(home_dir(home), dirs, interval=5.0, once=False, echo=echo))
        show_sweep_status(sweep_dir, as_json=False)
        if any(v.record.state != "completed" for v in views):
            raise typer.Exit(1)
