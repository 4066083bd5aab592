"""What every `moe-orch` command shares (add new commands in the same shape):

- `ConfigArg`, `SetOption`, `HomeOption`, `RunArg`: the common arguments and options; `home_dir`;
- `run_cli(fn)`: runs the library call and maps a `MoeOrchError` to one red line per issue on
  stderr and the error's exit code (ConfigError: 2), never a traceback for a user's error;
- `echo`, `warn`, `print_error`: plain lines through click (colour only on a terminal); `out`,
  `Console`, `Table`, `Text` (`orchestrator/console.py`): rich, imported at first use, only for
  the few tables and `--watch` (`live`);
- secrets never reach the terminal: error, warning and `echo` lines and log records go through
  `orchestrator.redact` (status and logs redact in their library code too).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from orchestrator.console import Text, out
from orchestrator.errors import ConfigError, MoeOrchError
from orchestrator.redact import redact

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_HOME = Path("runs")

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
RunArg = Annotated[str, typer.Argument(metavar="RUN", help="A run id (or a unique prefix), or its folder.")]


def home_dir(home: Path | None) -> Path:
    """The runs folder from `--home` / MOE_ORCH_HOME, else ./runs (absolute)."""
    return (home if home is not None else DEFAULT_HOME).expanduser().absolute()


# NOTE: plain lines go through click (typer.secho: colour only on a terminal), not rich: importing
# and starting rich's console cost ~30 ms of every `validate` (issue 14: validate <= 200 ms).
def print_error(exc: MoeOrchError) -> None:
    lines = [str(issue) for issue in exc.issues] if isinstance(exc, ConfigError) else str(exc).splitlines()
    for line in lines or [type(exc).__name__]:
        typer.secho(f"error: {redact(line)}", fg="red", bold=True, err=True)


def warn(lines: list[str]) -> None:
    for line in lines:
        typer.secho(f"warning: {redact(line)}", fg="yellow", err=True)


def echo(line: str) -> None:
    typer.echo(redact(line))


def run_cli(fn: Callable[[], T]) -> T:
    """Run a library call; a MoeOrchError becomes one line per issue and its exit code."""
    try:
        return fn()
    except MoeOrchError as exc:
        logger.debug("command failed", exc_info=True)
        print_error(exc)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.secho("interrupted", fg="red", err=True)
        raise typer.Exit(130) from None


def find_run_dir(home: Path | None, run: str) -> Path:
    """The run directory a RUN argument names (`rundir/runs.py` `find_run`)."""
    from orchestrator.rundir.runs import find_run

    return run_cli(lambda: find_run(home_dir(home), run))


def live(render: Callable[[], str], interval: float) -> None:
    """`--watch`: `render()`'s text, redrawn every `interval` seconds until Ctrl-C."""
    from rich.live import Live

    try:
        with Live(Text(run_cli(render)), console=out, refresh_per_second=4) as shown:
            while True:
                time.sleep(interval)
                shown.update(Text(run_cli(render)))
    except KeyboardInterrupt:
        return
