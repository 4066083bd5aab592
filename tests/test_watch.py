"""`watch`/`resume`: attempts that died without a requeue come back within the budgets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes import FakeSlurm
from helpers import REPO, write_event, write_start

from orchestrator.lifecycle import control, submit
from orchestrator.lifecycle.watch import resume, watch, watch_once
from orchestrator.rundir import runs
from orchestrator.rundir.runs import RunState

TINY_SLURM = str(REPO / "configs" / "tiny-slurm.yaml")


@pytest.fixture
def fake() -> Iterator[FakeSlurm]:
    with FakeSlurm().context() as f:
        yield f


def _submit(home: Path, *overrides: str) -> Path:
    return submit.submit(TINY_SLURM, list(overrides), home=str(home), echo=lambda _: None)


def test_node_fail_is_resubmitted_with_the_failed_node_excluded(fake: FakeSlurm, tmp_path: Path) -> None:
    run_dir = _submit(tmp_path)
    write_start(run_dir, "100")
    write_event(run_dir, event="first_step", step=1)
    fake.set_state("100", None)  # gone from squeue
    fake.add_acct("100", "NODE_FAIL")
    fake.node_states = {"n1": "idle", "n2": "down*"}
    lines: list[str] = []
    watch_once([run_dir], lines.append)
    rec = runs.read_run(run_dir)
    assert [a.job_id for a in rec.attempts] == ["100", "101"]
    assert rec.attempts[0].stop_reason == "node_fail"
    assert rec.excluded_nodes == ["n2"]
    assert "#SBATCH --exclude=n2" in fake.jobs["101"].script
    assert "node_fail" in (rec.attempts[1].note or "") and "n2" in (rec.attempts[1].note or "")
    assert (run_dir / "attempts" / "2" / "rendered" / "sbatch.sh").is_file()
    assert (run_dir / "attempts" / "2" / "pip-freeze.txt").is_file()
    assert any("resubmitted as job 101" in ln for ln in lines)


def test_one_batched_scheduler_query_per_poll_for_many_runs(fake: FakeSlurm, tmp_path: Path) -> None:
    dirs = [_submit(tmp_path) for _ in range(3)]
    before = (fake.count("squeue"), fake.count("sacct"))
    watch_once(dirs, lambda _: None)
    assert (fake.count("squeue"), fake.count("sacct")) == (before[0] + 1, before[1] + 1)


def test_crash_loop_stops_the_run_as_failed(fake: FakeSlurm, tmp_path: Path) -> None:
    run_dir = _submit(tmp_path, "cluster.max_attempts_without_progress=2", "cluster.max_failures=10")
    for job in ("100", "101"):
        write_start(run_dir, job)
        write_event(run_dir, event="exit", reason="failed", step=0, requeued=False, error="boom")
        fake.set_state(job, "FAILED")
        fake.add_acct(job, "FAILED", "1:0")
        watch_once([run_dir], lambda _: None)
    rec = runs.read_run(run_dir)
    assert rec.state == RunState.FAILED and "crash loop" in (rec.state_reason or "")
    assert len(rec.attempts) == 2, "no third submission"


def test_max_failures_zero_fails_at_the_first_crash(fake: FakeSlurm, tmp_path: Path) -> None:
    run_dir = _submit(tmp_path, "cluster.max_failures=0")
    write_start(run_dir, "100")
    write_event(run_dir, event="exit", reason="failed", step=0, requeued=False, error="boom")
    fake.set_state("100", "FAILED")
    watch_once([run_dir], lambda _: None)
    assert runs.read_run(run_dir).state == RunState.FAILED
    assert fake.count("sbatch") == 1


def test_exhausted_preemption_budget_cancels_the_requeued_job(fake: FakeSlurm, tmp_path: Path) -> None:
    run_dir = _submit(tmp_path, "cluster.max_preemptions=0")
    write_start(run_dir, "100")
    write_event(run_dir, event="first_step", step=1)
    write_event(run_dir, event="exit", reason="preempted", step=5, requeued=True, error=None)
    fake.set_state("100", "PENDING")
    lines: list[str] = []
    watch_once([run_dir], lines.append)
    rec = runs.read_run(run_dir)
    assert rec.state == RunState.FAILED and "max_preemptions=0" in (rec.state_reason or "")
    assert ["scancel", "100"] in fake.calls


def test_preemptions_are_requeued_without_limit_by_default(fake: FakeSlurm, tmp_path: Path) -> None:
    run_dir = _submit(tmp_path)
    for restart in range(5):
        write_start(run_dir, "100", restart=restart, step=restart * 10)
        write_event(run_dir, event="exit", reason="preempted", step=restart * 10 + 10, requeued=True,
                    error=None)  # fmt: skip
    fake.set_state("100", "PENDING")
    watch_once([run_dir], lambda _: None)
    rec = runs.read_run(run_dir)
    assert rec.state == RunState.REQUEUED
    assert len(rec.attempts) == 5 and fake.count("scancel") == 0


def test_a_cancelled_run_never_comes_back(fake: FakeSlurm, tmp_path: Path) -> None:
    run_dir = _submit(tmp_path)
    write_start(run_dir, "100")
    control.cancel(run_dir)
    watch_once([run_dir], lambda _: None)
    rec = runs.read_run(run_dir)
    assert rec.state == RunState.CANCELLED
    assert fake.count("sbatch") == 1


def test_resume_by_hand_resubmits_a_stopped_run_once(fake: FakeSlurm, tmp_path: Path) -> None:
    run_dir = _submit(tmp_path)
    write_start(run_dir, "100")
    write_event(run_dir, event="first_step", step=1)
    fake.set_state("100", "PREEMPTED")
    fake.add_acct("100", "PREEMPTED", "0:15")
    rec = resume(run_dir)
    assert [a.job_id for a in rec.attempts] == ["100", "101"]
    assert "resumed by hand after attempt 1 preempted" in (rec.attempts[1].note or "")


def test_resume_refuses_a_running_run(fake: FakeSlurm, tmp_path: Path) -> None:
    from orchestrator.errors import SubmissionError

    run_dir = _submit(tmp_path)
    write_start(run_dir, "100")
    fake.set_state("100", "RUNNING")
    with pytest.raises(SubmissionError, match="cancel"):
        resume(run_dir)


def test_watch_once_covers_every_unfinished_run_under_home(fake: FakeSlurm, tmp_path: Path) -> None:
    a, b = _submit(tmp_path), _submit(tmp_path)
    write_start(a, "100")
    write_event(a, event="exit", reason="completed", step=10, requeued=False, error=None)
    fake.set_state("100", "COMPLETED")
    lines: list[str] = []
    views = watch(tmp_path, [], interval=0, once=True, echo=lines.append)
    states = {v.record.run_id: v.record.state for v in views}
    assert states == {a.name: RunState.COMPLETED, b.name: RunState.PENDING}
