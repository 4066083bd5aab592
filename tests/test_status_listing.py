"""The `status` table: active runs and the newest finished ones, `--all`, the row cache of finished
runs (`<home>/.status-rows.json`) (orchestrator/lifecycle/status.py), and run.json left alone when
a poll only sees a job alive again: the stamp goes to `<home>/.liveness.json`
(orchestrator/lifecycle/poll.py, orchestrator/rundir/liveness.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.lifecycle import status
from orchestrator.lifecycle.poll import _same_record, poll
from orchestrator.rundir import liveness, runs
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


def test_a_job_seen_alive_again_goes_to_the_homes_sightings_file_not_to_run_json(tmp_path: Path) -> None:
    # A process whose command line names submitit stands for a local job's controller.
    controller = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "submitit"])
    try:
        run_id = add_run(tmp_path, 0, finished=False)
        run_dir = tmp_path / run_id
        job = str(controller.pid)

        def running(rec: RunRecord) -> None:
            rec.state = RunState.RUNNING
            rec.attempts.append(Attempt(number=1, job_id=job, attempt_key=f"{job}.0", submitted=NOW,
                                        state=AttemptState.RUNNING, last_seen_alive=NOW - 30))  # fmt: skip

        runs.update_run(run_dir, running)
        # The first poll records RUNNING (a real change) and the sighting.
        poll([run_dir], now=NOW)
        before = (run_dir / runs.RUN_FILE).stat().st_mtime_ns
        assert liveness.read(tmp_path) == {run_id: {job: NOW}}
        # Later polls only see the job alive again: run.json stays as it is, the sightings move on
        # and every view carries the newest stamp.
        for later in (NOW + 15, NOW + 45):
            (view,) = poll([run_dir], now=later)
            assert view.record.attempts[0].last_seen_alive == later
            assert liveness.read(tmp_path) == {run_id: {job: later}}
        assert (run_dir / runs.RUN_FILE).stat().st_mtime_ns == before
        assert runs.read_run(run_dir).attempts[0].last_seen_alive == NOW
        # A poll that reads the stamp back never goes behind the file (another poll wrote later).
        liveness.record(tmp_path, {run_id: {job: NOW + 100}})
        (view,) = poll([run_dir], now=NOW + 50)
        assert liveness.read(tmp_path)[run_id][job] == NOW + 100
    finally:
        controller.kill()
        controller.wait()
    # The job is gone: the attempt ends (a real change, written) and the run leaves the file.
    (view,) = poll([run_dir], now=NOW + 200)
    assert view.record.attempts[0].state == AttemptState.ENDED
    assert runs.read_run(run_dir).attempts[0].state == AttemptState.ENDED
    assert liveness.read(tmp_path) == {}


def test_only_the_liveness_stamp_is_left_out_of_the_comparison_that_decides_a_write() -> None:
    def record(seen: float | None) -> RunRecord:
        att = Attempt(number=1, job_id="7", state=AttemptState.RUNNING, last_seen_alive=seen)
        return RunRecord(run_id="r", name="r", config_hash="x", created=0.0, executor="slurm",
                         run_dir="/r", home="/", attempts=[att])  # fmt: skip

    assert _same_record(record(100.0), record(5000.0))
    assert _same_record(record(None), record(100.0))
    changed = record(100.0)
    changed.attempts[0].last_step = 5
    assert not _same_record(record(100.0), changed)


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
