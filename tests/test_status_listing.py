"""The `status` table: active runs and the newest finished ones, `--all`, the row cache of finished
runs (`<home>/.status-rows.json`), and run.json left alone when a poll changes only a liveness
stamp (orchestrator/lifecycle/status.py)."""

from __future__ import annotations

import time
from pathlib import Path

from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.lifecycle import status
from orchestrator.rundir import runs
from orchestrator.rundir.runs import Attempt, AttemptState, RunRecord, RunState, StopReason

NOW = time.time()


def add_run(home: Path, i: int, *, finished: bool) -> str:
    """A local run created `i` minutes after the first: completed (ended at created + 30 s), or
    pending (never submitted: nothing to ask a scheduler)."""
    created = NOW - 86400 + 60 * i
    run_id = runs.new_run_id(f"r{i:02d}", now=created)
    run_dir = home / run_id
    run_dir.mkdir(parents=True)
    attempts = []
    if finished:
        attempts.append(
            Attempt(number=1, job_id=str(10_000 + i), attempt_key=f"{10_000 + i}.0", submitted=created,
                    started=created + 1, ended=created + 30, state=AttemptState.ENDED,
                    stop_reason=StopReason.COMPLETED, last_step=6)
        )  # fmt: skip
    rec = RunRecord(
        run_id=run_id, name=f"r{i:02d}", config_hash="x", created=created, executor="local",
        run_dir=str(run_dir), home=str(home), attempts=attempts,
        state=RunState.COMPLETED if finished else RunState.PENDING,
    )  # fmt: skip
    runs.write_run(run_dir, rec)
    return run_id


def test_the_table_shows_active_runs_and_the_newest_finished_and_all_of_them_with_show_all(
    tmp_path: Path,
) -> None:
    finished = [add_run(tmp_path, i, finished=True) for i in range(13)]
    active = add_run(tmp_path, 20, finished=False)
    table = status.list_status(tmp_path, recent=10)
    shown = [row["run"] for row in table.rows]
    assert shown == [*finished[3:], active] and table.hidden_finished == 3
    every = status.list_status(tmp_path, show_all=True)
    assert [row["run"] for row in every.rows] == [*finished, active] and every.hidden_finished == 0


def test_finished_rows_come_from_the_cache_until_their_run_json_changes(tmp_path: Path) -> None:
    first = add_run(tmp_path, 0, finished=True)
    add_run(tmp_path, 1, finished=True)
    add_run(tmp_path, 2, finished=False)
    cold = status.list_status(tmp_path)
    assert (cold.polled, cold.cached) == (3, 0)
    assert (tmp_path / status.ROW_CACHE).is_file()
    warm = status.list_status(tmp_path)
    assert (warm.polled, warm.cached) == (1, 2)  # the pending run is polled every time
    assert [r["run"] for r in warm.rows] == [r["run"] for r in cold.rows]
    assert all(a == {**b, "age": a["age"]} for a, b in zip(warm.rows, cold.rows, strict=True))

    def noted(rec: RunRecord) -> None:  # any rewrite of run.json (e.g. `resume`) drops the row
        rec.state_reason = "looked at again"

    time.sleep(0.01)
    runs.update_run(tmp_path / first, noted)
    after = status.list_status(tmp_path)
    assert (after.polled, after.cached) == (2, 1)
    assert (status.list_status(tmp_path).polled, status.list_status(tmp_path).cached) == (1, 2)


def test_a_poll_that_only_sees_the_job_alive_again_leaves_run_json_alone_for_a_while() -> None:
    def record(seen: float | None) -> RunRecord:
        att = Attempt(number=1, job_id="7", state=AttemptState.RUNNING, last_seen_alive=seen)
        return RunRecord(run_id="r", name="r", config_hash="x", created=0.0, executor="slurm",
                         run_dir="/r", home="/", attempts=[att])  # fmt: skip

    assert status._same_record(record(100.0), record(100.0 + status.LIVENESS_WRITE_S - 1))
    assert not status._same_record(record(100.0), record(100.0 + status.LIVENESS_WRITE_S))
    assert not status._same_record(record(None), record(100.0))
    changed = record(100.0)
    changed.attempts[0].last_step = 5
    assert not status._same_record(record(100.0), changed)


def test_the_cli_table_is_plain_aligned_text_and_says_what_it_left_out(tmp_path: Path) -> None:
    for i in range(12):
        add_run(tmp_path, i, finished=True)
    result = CliRunner().invoke(app, ["status", "--home", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = ["run", "state", "attempts", "step", "progress", "loss", "tokens/s", "eta", "age"]
    assert lines[0].split() == header
    assert len(lines) == 1 + 10 + 1 and lines[-1].startswith("(2 older finished runs not shown; --all")
    assert len({line.index("completed") for line in lines[1:-1]}) == 1  # one column
    every = CliRunner().invoke(app, ["status", "--all", "--home", str(tmp_path)])
    assert len(every.stdout.splitlines()) == 1 + 12
