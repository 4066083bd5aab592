"""`moe-orch`: thin Typer commands over the library; each parses options and calls one function.

Shared pieces for every command (add new commands below, in the same shape):
- `ConfigArg`, `SetOption`, `HomeOption`: the common arguments and options;
- `_run_cli(fn)`: runs the library call and maps a `MoeOrchError` to one red line per issue on
  stderr and the error's exit code (ConfigError: 2), never a traceback for a user's error;
- `out` / `err`: the rich consoles (stdout for results, stderr for errors and warnings).

Nothing heavy is imported here: no torch, deepspeed or transformers, and submitit or matplotlib
only inside the commands that use them, so `moe-orch --help` starts fast.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from orchestrator.errors import ConfigError, MoeOrchError

logger = logging.getLogger(__name__)

T = TypeVar("T")

app = typer.Typer(
    name="moe-orch",
    help="Train Mixture-of-Experts models on SLURM: validate, render, submit, watch, resume.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

# soft_wrap: an error stays one line however narrow the terminal; highlight off: no guessing colours.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

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


def _print_error(exc: MoeOrchError) -> None:
    lines = [str(issue) for issue in exc.issues] if isinstance(exc, ConfigError) else str(exc).splitlines()
    for line in lines or [type(exc).__name__]:
        # Text, not markup: a message such as `n[1-4]` must print as written.
        err.print(Text(f"error: {line}", style="bold red"))


def _warn(lines: list[str]) -> None:
    for line in lines:
        err.print(Text(f"warning: {line}", style="yellow"))


def _run_cli(fn: Callable[[], T]) -> T:
    """Run a library call; a MoeOrchError becomes one line per issue and its exit code."""
    try:
        return fn()
    except MoeOrchError as exc:
        logger.debug("command failed", exc_info=True)
        _print_error(exc)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print(Text("interrupted", style="red"))
        raise typer.Exit(130) from None


@app.callback()
def _root() -> None:
    """Train Mixture-of-Experts models on SLURM: validate, render, submit, watch, resume."""


# --- commands -------------------------------------------------------------------------------------


@app.command()
def validate(config: ConfigArg, set_: SetOption = None) -> None:
    """Check a config (schema, cross-field rules, data files) and print the run's numbers."""
    from orchestrator.validate import summary_rows, validate_file

    summary = _run_cli(lambda: validate_file(config, set_ or []))
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for label, value in summary_rows(summary):
        table.add_row(label, value)
    out.print(table)
    _warn(summary.warnings)
    out.print(Text(f"ok: {config} is valid", style="green"))


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
    from orchestrator.configfile import load_config
    from orchestrator.render import nodelist_from_env, render_to_dir

    def go() -> dict[str, Path]:
        cfg = load_config(config, set_ or [])
        python = cfg.cluster.python or sys.executable
        return render_to_dir(cfg, out_dir, python=python, nodelist=nodelist or nodelist_from_env())

    paths = _run_cli(go)
    for path in paths.values():
        out.print(Text(str(path)))
    out.print(Text(f"submit by hand: sbatch {paths['sbatch.sh']}", style="green"))


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
    from orchestrator.schemadoc import config_reference_markdown, schema_json

    text = config_reference_markdown() if markdown else schema_json()
    if out_file is None:
        sys.stdout.write(text)
        return
    out_file.write_text(text)
    out.print(Text(f"wrote {out_file}"))


@app.command()
def configs() -> None:
    """List the configs shipped with moe-orch (usable by name in place of a path)."""
    from orchestrator.catalog import shipped_configs

    table = Table(show_header=True, box=None, pad_edge=False)
    table.add_column("name", style="bold")
    table.add_column("description")
    for shipped in shipped_configs():
        table.add_row(shipped.name, shipped.description)
    out.print(table)


def main() -> None:
    """Entry point of the `moe-orch` script."""
    logging.basicConfig(
        level=os.environ.get("MOE_ORCH_LOG_LEVEL", "WARNING").upper(),
        format="%(levelname)s %(name)s: %(message)s",
    )
    app()


if __name__ == "__main__":
    main()
