"""The run commands: `submit`, `status`, `logs`, `cancel`, `plot`, `watch`, `resume`, `export`,
`reshard` (library: `orchestrator/lifecycle/submit.py`, `status.py`, `logs.py`, `control.py`,
`plot.py`, `watch.py`, `export.py`, `reshard.py`). `status`, `logs`, `cancel`, `plot` and `watch`
also take a sweep (`cli/sweep_commands.py`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from orchestrator.cli.shared import (
    ConfigArg,
    HomeOption,
    RunArg,
    SetOption,
    echo,
    find_run_dir,
    home_dir,
    live,
    run_cli,
)
from orchestrator.cli.sweep_commands import element_or_run, kind, show_sweep_status


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
        run_cli(lambda: submit_lib.dry_run(config, set_ or [], home=str(home_dir(home)), echo=echo))
        return
    run_dir = run_cli(lambda: submit_lib.submit(config, set_ or [], home=str(home_dir(home)), echo=echo))
    if wait:
        from orchestrator.lifecycle.watch import follow
        from orchestrator.rundir.runs import RunState

        rec = run_cli(lambda: follow(run_dir, echo))
        if rec.state != RunState.COMPLETED:
            raise typer.Exit(1)


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
    """Active and recently finished runs and sweeps as a table (state, attempts, step, loss,
    tokens/s, ETA), or one run or sweep in detail."""
    import json

    from orchestrator.lifecycle import status as status_lib

    root = home_dir(home)
    found, run_dir = kind(home, run) if run else ("run", None)
    if found == "sweep" and run_dir is not None:
        show_sweep_status(run_dir, as_json=as_json)
        return
    if as_json:
        from orchestrator.rundir.runs import list_runs

        data = run_cli(lambda: status_lib.details([run_dir] if run_dir else list_runs(root)))
        sys.stdout.write(json.dumps(data[0] if run_dir else data, indent=2) + "\n")
        return

    def render() -> str:
        if run_dir is not None:
            return "\n".join(status_lib.run_lines(run_dir))
        return "\n".join(status_lib.table_lines(root, show_all=show_all))

    # NOTE: plain text as wide as it needs (rich would squeeze columns to 80 characters when piped,
    # and took a second for 1,000 rows).
    if run_dir is None:
        lines = run_cli(lambda: status_lib.table_lines(root, show_all=show_all))
        if not lines:
            echo(f"no runs under {root} (submit one with `moe-orch submit CONFIG`)")
            return
        if not watch_:
            sys.stdout.write("\n".join(lines) + "\n")
            return
    elif not watch_:
        sys.stdout.write(run_cli(render) + "\n")
        return
    live(render, interval)


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

    run_dir = element_or_run(home, run, element)
    run_cli(lambda: show_logs(run_dir, rank=rank, attempt=attempt, stderr=stderr, tail=tail, echo=echo))
    if follow_:
        run_cli(lambda: follow_logs(run_dir, rank=rank, stderr=stderr, echo=echo, start_at_end=True))


def cancel(run: RunArg, home: HomeOption = None) -> None:
    """Cancel the run's job; the run ends `cancelled` and is never requeued or resubmitted."""
    from orchestrator.lifecycle.control import cancel as cancel_run

    found, path = kind(home, run)
    if found == "sweep":
        from orchestrator.lifecycle.sweep_ops import cancel_sweep

        for line in run_cli(lambda: cancel_sweep(path)):
            echo(line)
        return
    rec = run_cli(lambda: cancel_run(path))
    job = rec.current.job_id if rec.current else None
    echo(f"{rec.run_id}: cancelled" + (f" (job {job})" if job else ""))


def plot(
    run: RunArg,
    out_file: Annotated[Path, typer.Option("--out", "-o", help="PNG file to write.", show_default=False)],
    home: HomeOption = None,
) -> None:
    """Plot loss, eval loss, tokens/s, expert load per layer and the expert_label x expert heatmap."""
    from orchestrator.lifecycle.plot import plot_run

    found, target = kind(home, run)
    if found == "sweep":
        from orchestrator.lifecycle.sweep_ops import plot_sweep

        path = run_cli(lambda: plot_sweep(target, out_file))
        echo(f"wrote {path}")
        return
    path = run_cli(lambda: plot_run(target, out_file))
    echo(f"wrote {path}")


def watch(
    runs: Annotated[
        list[str] | None, typer.Argument(metavar="[RUN]...", help="Runs to watch (default: all unfinished).")
    ] = None,
    interval: Annotated[float, typer.Option(help="Seconds between polls.")] = 30.0,
    once: Annotated[bool, typer.Option("--once", help="Reconcile once and exit.")] = False,
    home: HomeOption = None,
) -> None:
    """Resubmit attempts that died without a requeue, within the budgets; exclude failed nodes."""
    from orchestrator.lifecycle.sweep_ops import sweep_run_dirs
    from orchestrator.lifecycle.watch import watch as watch_runs

    specs = run_cli(lambda: sweep_run_dirs(home_dir(home), runs or []))  # a sweep: its elements
    run_cli(lambda: watch_runs(home_dir(home), specs, interval=interval, once=once, echo=echo))


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

    run_dir = find_run_dir(home, run)
    if nodes is not None or tasks_per_node is not None or ep_size is not None:
        from orchestrator.lifecycle.reshard import retarget_run
        from orchestrator.spec.loading import load_resolved

        def go() -> list[str]:
            cluster = load_resolved(run_dir / "run.yaml").cluster
            return retarget_run(
                run_dir, nodes=nodes or cluster.nodes, tasks_per_node=tasks_per_node, ep_size=ep_size
            ).lines()

        for line in run_cli(go):
            echo(line)
    rec = run_cli(lambda: resume_run(run_dir))
    cur = rec.current
    job, number = (cur.job_id, cur.number) if cur else ("?", "?")
    echo(f"{rec.run_id}: resubmitted as job {job} (attempt {number})")


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

    run_dir = run_cli(lambda: find_run_with_checkpoints(home_dir(home), run))
    path = run_cli(lambda: export_run(run_dir, out_dir, tag=checkpoint))
    echo(f"wrote {path}")


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

    run_dir = run_cli(lambda: find_run_with_checkpoints(home_dir(home), run))
    result = run_cli(
        lambda: reshard_run(
            run_dir, nodes=nodes, tasks_per_node=tasks_per_node, ep_size=ep_size, tag=checkpoint
        )
    )
    if result is None:
        echo("the checkpoint already has this topology; nothing written")
        return
    for line in change_lines(result.old, result.new):
        echo(line)
    echo(
        f"wrote {result.path} ({result.bytes / 1e6:.1f} MB, {result.written_bytes / 1e6:.1f} MB new, "
        f"{result.seconds:.1f} s)"
    )
