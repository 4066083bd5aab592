"""The config commands: `validate`, `render`, `schema`, `configs` (library: `lifecycle/validate.py`,
`render/files.py`, `spec/schemadoc.py`, `spec/catalog.py`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from orchestrator.cli.shared import ConfigArg, SetOption, echo, run_cli, warn
from orchestrator.console import Table, out
from orchestrator.errors import MoeOrchError


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

        run_dir = run_cli(lambda: find_run(runs_home(home), run))
    summary = run_cli(lambda: validate_file(config, set_ or [], home=home, run_dir=run_dir))
    for line in summary_lines(summary):
        typer.echo(line)
    warn(summary.warnings)
    typer.secho(f"ok: {config} is valid", fg="green")


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

    paths = run_cli(go)
    for path in paths.values():
        echo(str(path))
    typer.secho(f"submit by hand: sbatch {paths['sbatch.sh']}", fg="green")


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

    run_cli(write)
    echo(f"wrote {out_file}")


def configs() -> None:
    """List the configs shipped with moe-orch (usable by name in place of a path)."""
    from orchestrator.spec.catalog import shipped_configs

    table = Table(show_header=True, box=None, pad_edge=False)
    table.add_column("name", style="bold")
    table.add_column("description")
    for shipped in shipped_configs():
        table.add_row(shipped.name, shipped.description)
    out.print(table)
