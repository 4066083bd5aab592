"""`moe-orch`: thin Typer commands over the library; each parses options and calls one function.

The commands by group: `config_commands.py` (validate, render, schema, configs), `run_commands.py`
(submit, status, logs, cancel, plot, watch, resume, export, reshard), `sweep_commands.py` (sweep,
and a sweep where a run command takes one); `shared.py` holds what they share (the common options,
`run_cli`'s mapping of a `MoeOrchError` to one line and an exit code, redacted plain lines). This
module makes the app (the commands in the order `--help` lists them) and `main`, the script.

Nothing heavy is imported here: no torch, deepspeed or transformers, and submitit, matplotlib,
the schema (pydantic) and rich only inside the commands that use them, so `moe-orch --help` starts
fast.
"""

from __future__ import annotations

import logging
import os
import sys

import typer

from orchestrator.cli import config_commands, run_commands, sweep_commands
from orchestrator.redact import RedactingFilter

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


@app.callback()
def _root() -> None:
    """Train Mixture-of-Experts models on SLURM: validate, render, submit, watch, resume."""


for _command in (
    config_commands.validate,
    config_commands.render,
    config_commands.schema,
    config_commands.configs,
    run_commands.submit,
    sweep_commands.sweep,
    run_commands.status,
    run_commands.logs,
    run_commands.cancel,
    run_commands.plot,
    run_commands.watch,
    run_commands.resume,
    run_commands.export,
    run_commands.reshard,
):
    app.command()(_command)


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


__all__ = ["app", "main"]
