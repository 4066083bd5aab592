"""The run directory's worker files, byte for byte: orchestrator.rundir.reports (events, progress,
metrics), the attempt key, the exit codes and the cancel flag the worker reads from run.json."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from orchestrator.rundir import exitcodes, reports, runs
from orchestrator.rundir.atomic import atomic_write_text


def test_an_event_is_one_json_line_with_its_name_and_time_first(tmp_path: Path) -> None:
    reports.append_event(tmp_path, "checkpoint", tag="step-000004", step=4, save_s=0.5, bytes=10)
    line = (tmp_path / "events.jsonl").read_text()
    assert line.endswith("\n") and line.count("\n") == 1
    record = json.loads(line)
    assert list(record) == ["event", "time", "tag", "step", "save_s", "bytes"]
    assert line == json.dumps(record) + "\n"
    assert reports.read_events(tmp_path) == [record]


def test_readers_skip_a_torn_last_line_and_lines_that_are_not_objects(tmp_path: Path) -> None:
    text = '{"event": "start"}\n[1, 2]\n{"no_event": 1}\n\n{"event": "exi'
    (tmp_path / reports.EVENTS).write_text(text)
    assert reports.read_events(tmp_path) == [{"event": "start"}]
    assert reports.read_jsonl(tmp_path / reports.EVENTS) == [{"event": "start"}, {"no_event": 1}]


def test_a_missing_file_reads_as_nothing_unless_asked_to_exist(tmp_path: Path) -> None:
    assert reports.read_events(tmp_path) == []
    assert reports.read_progress(tmp_path) is None
    assert reports.read_metrics(tmp_path) == []
    with pytest.raises(FileNotFoundError):
        reports.read_metrics(tmp_path, missing_ok=False)


def test_progress_is_replaced_whole_with_the_documented_fields(tmp_path: Path) -> None:
    for step in (1, 2):
        reports.write_progress(
            tmp_path, step=step, total_steps=10, epoch=0, loss=1.5, tokens_per_s=100.0, step_time_s=0.1,
            attempt_key="5.0",
        )  # fmt: skip
    text = (tmp_path / "progress.json").read_text()
    progress = reports.read_progress(tmp_path)
    assert progress is not None and text == json.dumps(progress) + "\n"
    assert list(progress) == [
        "step", "total_steps", "epoch", "loss", "tokens_per_s", "step_time_s", "time", "attempt_key"
    ]  # fmt: skip
    assert progress["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["progress.json"]  # no temporary file left


def test_unreadable_progress_is_none(tmp_path: Path) -> None:
    (tmp_path / "progress.json").write_text('{"step": ')
    assert reports.read_progress(tmp_path) is None
    (tmp_path / "progress.json").write_text("[1]")
    assert reports.read_progress(tmp_path) is None


def test_metrics_hold_training_and_eval_lines_in_file_order(tmp_path: Path) -> None:
    reports.append_metrics(tmp_path, {"step": 1, "loss": 2.0})
    reports.append_eval(tmp_path, 1, 1.9)
    assert (tmp_path / "metrics.jsonl").read_text() == (
        '{"step": 1, "loss": 2.0}\n{"step": 1, "eval_loss": 1.9}\n'
    )
    assert reports.read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}, {"step": 1, "eval_loss": 1.9}]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "latest"
    atomic_write_text(path, "step-000004\n")

    with pytest.raises(TypeError):
        atomic_write_text(path, 42)  # type: ignore[arg-type]
    assert path.read_text() == "step-000004\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


@pytest.mark.parametrize(("job_id", "restart", "key"), [("4242", 2, "4242.2"), ("933", 0, "933.0")])
def test_the_attempt_key_is_job_id_dot_restart(job_id: str, restart: int, key: str) -> None:
    assert runs.attempt_key(job_id, restart) == key


def test_exit_codes() -> None:
    codes = (exitcodes.EXIT_COMPLETED, exitcodes.EXIT_FAILED, exitcodes.EXIT_USAGE, exitcodes.EXIT_STOPPED)
    assert codes == (0, 1, 2, 75)  # docs/design.md; submitit and SLURM see them


def test_the_cancel_flag_is_read_through_the_run_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert runs.read_cancel_requested(tmp_path) is False  # a worker started by hand: no run.json
    (tmp_path / "run.json").write_text(json.dumps({"schema_version": 1, "cancel_requested": True}))
    assert runs.read_cancel_requested(tmp_path) is True
    (tmp_path / "run.json").write_text(json.dumps({"schema_version": 99, "cancel_requested": True}))
    with caplog.at_level(logging.WARNING):
        assert runs.read_cancel_requested(tmp_path) is False
    assert "schema version 99" in caplog.text
    (tmp_path / "run.json").write_text("[]")
    assert runs.read_cancel_requested(tmp_path) is False
