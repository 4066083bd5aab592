"""The run record (run.json) and how attempts are reconciled from events and the scheduler."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator.backends import Observation
from orchestrator.backends.local import LocalObservation
from orchestrator.backends.slurm.backend import SlurmObservation
from orchestrator.backends.slurm.scheduler import Snapshot, parse_sacct, parse_squeue
from orchestrator.backends.slurm.task_reports import parse_task_exits
from orchestrator.errors import RunNotFoundError
from orchestrator.lifecycle.reconcile import Budgets, check_budgets, reconcile
from orchestrator.rundir import reports, runs
from orchestrator.rundir.runs import Attempt, AttemptState, RunRecord, RunState, StopReason

NOW = time.time()


def slurm_time(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))


def make_record(tmp_path: Path, executor: str = "slurm", **budgets: Any) -> RunRecord:
    return RunRecord(
        run_id="r-20261128-152000-abcd",
        name="r",
        config_hash="x",
        created=NOW - 100,
        executor=executor,
        run_dir=str(tmp_path),
        home=str(tmp_path.parent),
        budgets=budgets,
    )


def start(
    job: str, restart: int = 0, t: float = NOW - 50, nodes: tuple[str, ...] = ("n1", "n2"), **kw: Any
) -> dict[str, Any]:
    return {
        "event": "start",
        "time": t,
        "job_id": job,
        "restart": restart,
        "attempt_key": f"{job}.{restart}",
        "nodes": list(nodes),
        "world_size": 2,
        "resumed_from": kw.get("resumed_from"),
        "resumed_step": kw.get("resumed_step", 0),
        "steps_redone": kw.get("steps_redone", 0),
    }


def exit_(reason: str, step: int, requeued: bool = False, t: float = NOW - 10) -> dict[str, Any]:
    return {"event": "exit", "time": t, "reason": reason, "step": step, "requeued": requeued, "error": None}


def snapshot(squeue: str = "", sacct: str = "") -> Snapshot:
    return Snapshot(queue=parse_squeue(squeue), acct=parse_sacct(sacct), time=NOW)


def refresh(rec: RunRecord, events: list[dict[str, Any]], snap: Snapshot | None, **kw: Any) -> RunRecord:
    """Reconcile with what a poll would have seen: local controllers alive (`local_alive=`), or a
    squeue/sacct snapshot and srun's task reports (`task_exits=`)."""
    seen: Observation
    if "local_alive" in kw:
        seen = LocalObservation(kw["local_alive"])
    else:
        seen = SlurmObservation(snap, kw.get("task_exits") or {})
    return reconcile(
        rec,
        events,
        progress=kw.get("progress"),
        observed=seen,
        budgets=Budgets.from_dict(rec.budgets),
        now=kw.get("now", NOW),
    )


SUB = slurm_time(NOW - 60)


# --- the record on disk ------------------------------------------------------------------------


def test_run_id_is_name_timestamp_and_four_hex() -> None:
    rid = runs.new_run_id("tiny-cpu", now=0)
    assert re.fullmatch(r"tiny-cpu-\d{8}-\d{6}-[0-9a-f]{4}", rid)


def test_run_json_round_trips_with_schema_version(tmp_path: Path) -> None:
    rec = make_record(tmp_path)
    rec.attempts.append(Attempt(number=1, job_id="12", submitted=NOW))
    runs.write_run(tmp_path, rec)
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["schema_version"] == runs.SCHEMA_VERSION
    assert data["attempts"][0]["job_id"] == "12"
    assert runs.read_run(tmp_path).attempts[0].job_id == "12"
    assert not list(tmp_path.glob(".run.json.*.tmp")), "the temp file is renamed into place"


def test_a_newer_schema_is_refused_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(RunNotFoundError, match="upgrade moe-orch"):
        runs.read_run(tmp_path)


def test_concurrent_updates_are_never_lost(tmp_path: Path) -> None:
    runs.write_run(tmp_path, make_record(tmp_path))

    def bump() -> None:
        for _ in range(20):
            runs.update_run(tmp_path, lambda r: r.excluded_nodes.append("x"))

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(runs.read_run(tmp_path).excluded_nodes) == 80


def test_find_run_by_id_prefix_or_path(tmp_path: Path) -> None:
    for rid in ("a-20261128-100000-0001", "a-20261128-110000-0002", "b-20261128-100000-0003"):
        (tmp_path / rid).mkdir()
        runs.write_run(tmp_path / rid, make_record(tmp_path / rid))
    assert runs.find_run(tmp_path, "b").name == "b-20261128-100000-0003"
    assert runs.find_run(tmp_path, str(tmp_path / "a-20261128-100000-0001")).name == "a-20261128-100000-0001"
    with pytest.raises(RunNotFoundError, match="several runs"):
        runs.find_run(tmp_path, "a-")
    with pytest.raises(RunNotFoundError, match="moe-orch status"):
        runs.find_run(tmp_path, "zzz")


def test_home_is_flag_then_env_then_cwd_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_ORCH_HOME", str(tmp_path / "env"))
    assert runs.runs_home(tmp_path / "flag") == tmp_path / "flag"
    assert runs.runs_home(None) == tmp_path / "env"
    monkeypatch.delenv("MOE_ORCH_HOME")
    monkeypatch.chdir(tmp_path)
    assert runs.runs_home(None) == tmp_path / "runs"


def test_torn_event_line_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "events.jsonl").write_text(json.dumps(start("5")) + '\n{"event": "exi')
    assert [e["event"] for e in reports.read_events(tmp_path)] == ["start"]


# --- reconciling attempts ----------------------------------------------------------------------


def test_a_completed_attempt_comes_from_the_exit_event(tmp_path: Path) -> None:
    rec = make_record(tmp_path)
    rec.attempts.append(Attempt(number=1, job_id="5", submitted=NOW - 60))
    events = [start("5"), {"event": "first_step", "time": NOW - 40, "step": 1}, exit_("completed", 20)]
    refresh(rec, events, snapshot(f"5|COMPLETED|None|n[1-2]|{SUB}|{SUB}\n"))
    att = rec.attempts[0]
    assert (att.attempt_key, att.stop_reason, att.first_step, att.last_step) == ("5.0", "completed", 1, 20)
    assert att.nodes == ["n1", "n2"]
    assert rec.state == RunState.COMPLETED


def test_worker_requeue_makes_a_new_attempt_with_the_same_job_id(tmp_path: Path) -> None:
    rec = make_record(tmp_path)
    rec.attempts.append(Attempt(number=1, job_id="5", submitted=NOW - 60))
    events = [start("5"), exit_("preempted", 30, requeued=True)]
    refresh(
        rec,
        events,
        snapshot(f"5|PENDING|BeginTime||{SUB}|N/A\n", f"5|REQUEUED|0:0|{SUB}|{SUB}|{SUB}|n[1-2]\n"),
    )
    assert rec.state == RunState.REQUEUED
    events += [start("5", restart=1, t=NOW - 5, resumed_from="step-000030", resumed_step=30, steps_redone=2)]
    rec = refresh(rec, events, snapshot(f"5|RUNNING|None|n[1-2]|{SUB}|{SUB}\n"))
    assert [a.attempt_key for a in rec.attempts] == ["5.0", "5.1"]
    assert rec.attempts[1].resumed_from == "step-000030" and rec.attempts[1].steps_redone == 2
    assert rec.attempts[0].stop_reason == "preempted" and rec.attempts[0].requeued
    assert rec.state == RunState.RUNNING


def test_node_fail_without_exit_event_then_slurm_requeue(tmp_path: Path) -> None:
    rec = make_record(tmp_path)
    rec.attempts.append(Attempt(number=1, job_id="5", submitted=NOW - 60))
    events = [start("5")]
    sacct = f"5|NODE_FAIL|0:0|{SUB}|{SUB}|{SUB}|n[1-2]\n"
    refresh(rec, events, snapshot(f"5|PENDING|BeginTime||{SUB}|N/A\n", sacct))
    att = rec.attempts[0]
    assert att.state == "ended" and att.stop_reason == "node_fail" and att.requeued
    assert rec.state == RunState.REQUEUED


def test_preempted_without_signal_and_not_requeued_is_stopped(tmp_path: Path) -> None:
    rec = make_record(tmp_path)
    rec.attempts.append(Attempt(number=1, job_id="5", submitted=NOW - 60))
    refresh(
        rec,
        [start("5")],
        snapshot(f"5|PREEMPTED|None|n1|{SUB}|{SUB}\n", f"5|PREEMPTED|0:15|{SUB}|{SUB}|{SUB}|n1\n"),
    )
    assert rec.attempts[0].stop_reason == "preempted"
    assert rec.state == RunState.STOPPED  # watch/resume brings it back


def test_out_of_memory_is_a_failure(tmp_path: Path) -> None:
    rec = make_record(tmp_path, max_failures=0)
    rec.attempts.append(Attempt(number=1, job_id="5", submitted=NOW - 60))
    refresh(rec, [start("5")], snapshot("", f"5|OUT_OF_MEMORY|0:125|{SUB}|{SUB}|{SUB}|n1\n"))
    att = rec.attempts[0]
    assert (att.stop_reason, att.slurm_state) == ("failed", "OUT_OF_MEMORY")
    assert rec.state == RunState.FAILED and "max_failures=0" in (rec.state_reason or "")


def test_cancelled_by_someone_else_ends_the_run_cancelled(tmp_path: Path) -> None:
    rec = make_record(tmp_path)
    rec.attempts.append(Attempt(number=1, job_id="5", submitted=NOW - 60))
    refresh(rec, [start("5")], snapshot("", f"5|CANCELLED by 0|0:0|{SUB}|{SUB}|{SUB}|n1\n"))
    assert rec.attempts[0].slurm_state == "CANCELLED by 0"
    assert rec.state == RunState.CANCELLED


def test_sacct_lag_is_not_taken_for_a_lost_job(tmp_path: Path) -> None:
    rec = make_record(tmp_path)
    rec.attempts.append(Attempt(number=1, job_id="5", submitted=NOW - 10))
    refresh(rec, [], snapshot("", ""))  # just submitted: in neither squeue nor sacct yet
    assert rec.attempts[0].state == AttemptState.PENDING and rec.state == RunState.PENDING
    # ... but gone from both for longer than LOST_AFTER_S, without an exit event: lost.
    refresh(rec, [start("5")], snapshot("", ""), now=NOW + 600)
    assert rec.attempts[0].stop_reason == "failed" and "vanished" in (rec.attempts[0].error or "")


def test_a_reused_job_id_row_from_an_older_job_is_ignored(tmp_path: Path) -> None:
    rec = make_record(tmp_path)
    rec.attempts.append(Attempt(number=1, job_id="3", submitted=NOW - 60))
    old = slurm_time(NOW - 86400)
    refresh(
        rec,
        [start("3")],
        snapshot(f"3|RUNNING|None|n1|{SUB}|{SUB}\n", f"3|FAILED|1:0|{old}|{old}|{old}|n1\n"),
    )
    assert rec.attempts[0].state == AttemptState.RUNNING
    assert rec.state == RunState.RUNNING


def test_local_job_gone_without_exit_event_is_failed(tmp_path: Path) -> None:
    rec = make_record(tmp_path, executor="local", max_failures=0)
    rec.attempts.append(Attempt(number=1, job_id="4242", submitted=NOW - 60))
    refresh(rec, [start("4242", nodes=("vm",))], None, local_alive={"4242": True})
    assert rec.state == RunState.RUNNING
    rec = refresh(rec, [start("4242", nodes=("vm",))], None, local_alive={"4242": False})
    assert rec.attempts[0].stop_reason == "failed"
    assert rec.state == RunState.FAILED


def test_budgets_count_failures_preemptions_and_crash_loops() -> None:
    def ended(reason: str, step: int | None) -> Attempt:
        return Attempt(
            number=0, job_id="1", state=AttemptState.ENDED, stop_reason=StopReason(reason), last_step=step
        )

    progress = [ended("failed", 10), ended("failed", 20), ended("failed", 30)]
    assert not check_budgets(progress, Budgets(max_failures=3)).exhausted
    assert check_budgets([*progress, ended("failed", 40)], Budgets(max_failures=3)).exhausted
    preempts = [ended("preempted", i) for i in range(1, 50)]
    assert not check_budgets(preempts, Budgets()).exhausted, "preemptions are unlimited by default"
    assert check_budgets(preempts, Budgets(max_preemptions=5)).exhausted
    loop = [ended("preempted", 10), ended("preempted", 10), ended("preempted", 10), ended("preempted", 10)]
    verdict = check_budgets(loop, Budgets(max_attempts_without_progress=3))
    assert verdict.exhausted and "crash loop" in verdict.reason


# --- logs: per-rank files split into attempts at the job function's marker lines ---------------


def test_logs_split_requeued_attempts_and_prefix_rank_and_attempt(tmp_path: Path) -> None:
    from orchestrator.lifecycle.job import marker_line
    from orchestrator.lifecycle.logs import format_lines, read_logs

    rec = make_record(tmp_path)
    rec.attempts = [
        Attempt(number=1, job_id="5", attempt_key="5.0"),
        Attempt(number=2, job_id="5", attempt_key="5.1", restart=1),
        Attempt(number=3, job_id="9", attempt_key="9.0"),
    ]
    logs = tmp_path / "logs"
    logs.mkdir()
    for rank in (0, 1):
        (logs / f"5_{rank}_log.out").write_text(
            f"preamble\n{marker_line('5.0', str(rank))}\nfirst {rank}\n"
            f"{marker_line('5.1', str(rank))}\nsecond {rank}\n"
        )
        (logs / f"9_{rank}_log.out").write_text(f"{marker_line('9.0', str(rank))}\nthird {rank}\n")
    (logs / "5_0_log.err").write_text(f"{marker_line('5.0', '0')}\nTraceback (most recent call last):\n")
    lines = format_lines(read_logs(tmp_path, rec))
    assert "[attempt 1] [rank 0] first 0" in lines
    assert "[attempt 2] [rank 1] second 1" in lines
    assert "[attempt 3] [rank 0] third 0" in lines
    assert lines.index("[attempt 1] [rank 1] first 1") < lines.index("[attempt 2] [rank 0] second 0")
    only = format_lines(read_logs(tmp_path, rec, rank=1, attempt=2))
    assert only == ["[rank 1] second 1"], "one attempt shown: no attempt prefix"
    assert format_lines(read_logs(tmp_path, rec, attempt=1), tail=1) == [
        "[rank 0] first 0",
        "[rank 1] first 1",
    ]
    err = format_lines(read_logs(tmp_path, rec, stderr=True))
    assert err == ["[rank 0] Traceback (most recent call last):"]


def test_follow_logs_carries_on_into_the_next_attempt_and_stops_at_a_final_state(tmp_path: Path) -> None:
    from orchestrator.lifecycle.job import marker_line
    from orchestrator.lifecycle.logs import follow_logs

    rec = make_record(tmp_path, executor="local")
    rec.attempts = [
        Attempt(
            number=1,
            job_id="5",
            attempt_key="5.0",
            state=AttemptState.ENDED,
            stop_reason=StopReason.COMPLETED,
        )
    ]
    rec.state = RunState.COMPLETED
    (tmp_path / "logs").mkdir()
    runs.write_run(tmp_path, rec)
    (tmp_path / "logs" / "5_0_log.out").write_text(f"{marker_line('5.0', '0')}\nhello\npartial")
    seen: list[str] = []
    follow_logs(tmp_path, rank=None, stderr=False, echo=seen.append, interval=0.01, max_s=5)
    assert seen == ["[attempt 1] [rank 0] hello"], "a line still being written is held back"


def test_submitits_start_line_belongs_to_the_attempt_it_starts(tmp_path: Path) -> None:
    from orchestrator.lifecycle.job import marker_line
    from orchestrator.lifecycle.logs import split_attempts

    text = (
        "submitit INFO - Starting with JobEnvironment(job_id=5, global_rank=0)\n"
        f"{marker_line('5.0', '0')}\nstep 1\n"
        "submitit INFO - Starting with JobEnvironment(job_id=5, global_rank=0)\nLoading pickle\n"
        f"{marker_line('5.1', '0')}\nstep 2\n"
    )
    got = list(split_attempts(text, "5", {"5.0": 1, "5.1": 2}, {"5": 1}))
    assert [n for n, line in got if "Starting with" in line] == [1, 2]
    assert (2, "Loading pickle") in got and (2, "step 2") in got and (1, "step 1") in got


def test_a_cancelled_local_job_ends_its_attempt_cancelled(tmp_path: Path) -> None:
    rec = make_record(tmp_path, executor="local")
    rec.attempts.append(Attempt(number=1, job_id="4242", submitted=NOW - 60))
    rec.cancel_requested, rec.state = True, RunState.CANCELLED
    refresh(rec, [start("4242", nodes=("vm",))], None, local_alive={"4242": False})
    assert rec.attempts[0].stop_reason == "cancelled" and rec.attempts[0].error is None
    assert rec.state == RunState.CANCELLED


def test_a_rank_that_died_before_the_worker_started_shows_its_error(tmp_path: Path) -> None:
    import pickle

    from orchestrator.lifecycle.poll import poll

    rec = make_record(tmp_path, executor="local", max_failures=0)
    rec.attempts.append(Attempt(number=1, job_id="999999999", submitted=NOW - 60))
    runs.write_run(tmp_path, rec)
    (tmp_path / "logs").mkdir()
    trace = "Traceback (most recent call last):\n  ...\nModuleNotFoundError: No module named 'worker'\n"
    (tmp_path / "logs" / "999999999_1_result.pkl").write_bytes(pickle.dumps(("error", trace)))
    (view,) = poll([tmp_path])
    assert view.record.state == RunState.FAILED
    assert view.record.attempts[0].error == "ModuleNotFoundError: No module named 'worker' (rank 1)"


# --- a rank that died: the cause, then its peers' symptoms -------------------------------------

GLOO_RESET = (
    "RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
    "[127.0.0.1]:43416: Connection reset by peer. This is typically caused by a remote worker hanging "
    "or bugs in the application. Check the logs of the remote worker before reporting an error. GLHF!"
)
# What `kill -9` of rank 1's python on n2 left (localhost SLURM 22.05): sacct's job row, and srun's
# report in the batch script's stderr (`logs/<job>_sbatch.err`).
KILLED_SACCT = f"5|FAILED|9:0|{SUB}|{SUB}|{SUB}|n[1-2]\n"
KILLED_SRUN = (
    "srun: error: n2: task 1: Killed\n"
    "srun: error: n1: task 0: Exited with exit code 1\n"
    "srun: Force Terminated StepId=5.0\n"
)


def failed_exit(error: str | None, step: int = 88) -> dict[str, Any]:
    return {**exit_("failed", step), "error": error}


def test_a_killed_rank_is_the_cause_and_its_peers_error_the_consequence(tmp_path: Path) -> None:
    rec = make_record(tmp_path)
    rec.attempts.append(Attempt(number=1, job_id="5", submitted=NOW - 60))
    events = [start("5"), failed_exit(GLOO_RESET)]
    task_exits = {"5": parse_task_exits(KILLED_SRUN)}
    for _ in range(2):  # each poll reconciles again: the same words, not a growing prefix
        refresh(rec, events, snapshot("", KILLED_SACCT), task_exits=task_exits)
    att = rec.attempts[0]
    assert att.error == f"rank 1 on n2 was killed by signal 9 (SIGKILL); then rank 0: {GLOO_RESET}"
    assert (att.stop_reason, att.slurm_state, att.exit_code) == ("failed", "FAILED", "9:0")
    assert rec.state == RunState.STOPPED
    assert rec.state_reason == f"attempt 1 failed: {att.error}"


def test_a_killed_rank_0_is_named_with_what_its_peers_did_next(tmp_path: Path) -> None:
    rec = make_record(tmp_path)
    rec.attempts.append(Attempt(number=1, job_id="5", submitted=NOW - 60))
    srun = "srun: error: n1: task 0: Killed\nsrun: error: n2: task 1: Exited with exit code 1\n"
    # Rank 0 writes the events: a SIGKILL leaves no exit event, only sacct's FAILED row.
    for _ in range(2):
        refresh(rec, [start("5")], snapshot("", KILLED_SACCT), task_exits={"5": parse_task_exits(srun)})
    assert rec.attempts[0].error == (
        "rank 0 on n1 was killed by signal 9 (SIGKILL); then rank 1 on n2 exited with code 1"
    )


def test_a_rank_that_raised_while_its_peers_waited_is_named_before_their_error(tmp_path: Path) -> None:
    rec = make_record(tmp_path)
    rec.attempts.append(Attempt(number=1, job_id="5", submitted=NOW - 60))
    srun = (
        "srun: error: n2: task 1: Exited with exit code 1\nsrun: error: n1: task 0: Exited with exit code 1\n"
    )
    task_exits = {"5": parse_task_exits(srun)}
    refresh(rec, [start("5"), failed_exit(GLOO_RESET)], snapshot("", KILLED_SACCT), task_exits=task_exits)
    assert rec.attempts[0].error == f"rank 1 on n2 exited with code 1; then rank 0: {GLOO_RESET}"


@pytest.mark.parametrize(
    "srun",
    [
        "srun: error: n[1-2]: tasks 0-1: Exited with exit code 1\n",
        # it wrote its exit event, then aborted while exiting (seen after signalled stops)
        "srun: error: n1: task 0: Aborted\nsrun: error: n2: task 1: Exited with exit code 1\n",
    ],
)
def test_rank_0_failing_by_itself_keeps_its_own_error(tmp_path: Path, srun: str) -> None:
    rec = make_record(tmp_path)
    rec.attempts.append(Attempt(number=1, job_id="5", submitted=NOW - 60))
    error = "ValueError: bad batch"
    task_exits = {"5": parse_task_exits(srun)}
    refresh(rec, [start("5"), failed_exit(error)], snapshot("", KILLED_SACCT), task_exits=task_exits)
    assert rec.attempts[0].error == error


def test_status_names_the_killed_rank_from_the_batch_stderr_with_one_squeue_and_one_sacct(
    tmp_path: Path,
) -> None:
    from fakes import FakeSlurm

    from orchestrator.lifecycle.poll import poll
    from orchestrator.lifecycle.status import detail_lines, run_detail

    fake = FakeSlurm(first_job_id=5)
    with fake.context():
        fake._sbatch(["x"])
    fake.set_state("5", None)  # gone from squeue
    fake.add_acct("5", "FAILED", "9:0")
    rec = make_record(tmp_path)
    rec.attempts.append(Attempt(number=1, job_id="5", submitted=NOW - 60))
    runs.write_run(tmp_path, rec)
    events = [start("5"), failed_exit(GLOO_RESET)]
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "5_sbatch.err").write_text(KILLED_SRUN)
    with fake.context():
        (view,) = poll([tmp_path])
    assert (fake.count("squeue"), fake.count("sacct")) == (1, 1)
    cause = "rank 1 on n2 was killed by signal 9 (SIGKILL); then rank 0: RuntimeError:"
    assert runs.read_run(tmp_path).attempts[0].error.startswith(cause)  # type: ignore[union-attr]
    assert run_detail(view)["attempts"][0]["error"].startswith(cause)
    assert f"      error: {cause}" in "\n".join(detail_lines(run_detail(view)))


# --- an ended attempt while the scheduler catches up (sacct lag) -------------------------------


RUNNING_ROW = f"5|RUNNING|0:0|{SUB}|{SUB}|Unknown|n[1-2]\n"  # sacct, while the job runs


def test_an_attempt_whose_worker_exited_is_finishing_until_the_scheduler_records_its_end(
    tmp_path: Path,
) -> None:
    rec = make_record(tmp_path)
    rec.attempts.append(Attempt(number=1, job_id="5", submitted=NOW - 60))
    running = snapshot(f"5|RUNNING|None|n[1-2]|{SUB}|{SUB}\n", RUNNING_ROW)
    refresh(rec, [start("5")], running)
    assert rec.attempts[0].slurm_state == "RUNNING"
    # The worker wrote its exit event; the ranks are still leaving, and sacct still says RUNNING.
    events = [start("5"), exit_("completed", 8)]
    refresh(rec, events, running)
    att = rec.attempts[0]
    assert (att.state, att.slurm_state, att.exit_code) == ("ended", runs.SLURM_FINISHING, None)
    assert rec.state == RunState.COMPLETED
    refresh(rec, events, snapshot(f"5|COMPLETING|None|n[1-2]|{SUB}|{SUB}\n", RUNNING_ROW))
    assert att.slurm_state == runs.SLURM_FINISHING
    # The scheduler's final record arrives: its state and exit code replace the label.
    completed = f"5|COMPLETED|0:0|{SUB}|{SUB}|{SUB}|n[1-2]\n"
    refresh(rec, events, snapshot(f"5|COMPLETED|None|n[1-2]|{SUB}|{SUB}\n", completed))
    assert (att.slurm_state, att.exit_code) == ("COMPLETED", "0:0")


def test_a_requeued_attempt_is_not_shown_running_while_the_next_run_of_its_job_is(tmp_path: Path) -> None:
    rec = make_record(tmp_path)
    rec.attempts.append(Attempt(number=1, job_id="5", submitted=NOW - 60))
    running = snapshot(f"5|RUNNING|None|n[1-2]|{SUB}|{SUB}\n")
    refresh(rec, [start("5")], running)
    events = [start("5"), exit_("preempted", 30, requeued=True), start("5", restart=1, t=NOW - 5)]
    refresh(rec, events, running)  # sacct has no row for either run yet
    first, second = rec.attempts
    assert (first.slurm_state, second.slurm_state) == (runs.SLURM_FINISHING, "RUNNING")


def test_status_json_and_text_agree_on_a_finishing_attempt_and_keep_asking_for_its_exit_code(
    tmp_path: Path,
) -> None:
    from fakes import FakeSlurm

    from orchestrator.lifecycle.poll import poll
    from orchestrator.lifecycle.status import detail_lines, run_detail

    fake = FakeSlurm(first_job_id=5)
    with fake.context():
        fake._sbatch(["x"])
    fake.set_state("5", "RUNNING")
    fake.add_acct("5", "RUNNING")
    rec = make_record(tmp_path)
    rec.attempts.append(Attempt(number=1, job_id="5", submitted=NOW - 60))
    runs.write_run(tmp_path, rec)
    events = tmp_path / "events.jsonl"
    # NOTE: times from now, not from NOW (this module's import): the scheduler is asked for the
    # exit code only within SETTLE_S (600 s) of the exit, and a full suite reaches this test later.
    now = time.time()
    events.write_text(json.dumps(start("5", t=now - 50)) + "\n")
    with fake.context():
        poll([tmp_path])
        with events.open("a") as f:
            f.write(json.dumps(exit_("completed", 8, t=now - 10)) + "\n")
        (view,) = poll([tmp_path])
        detail = run_detail(view)
        (shown,) = detail["attempts"]
        assert detail["state"] == RunState.COMPLETED
        assert (shown["slurm_state"], shown["exit_code"]) == ("finishing", None)
        assert "scheduler finishing" in "\n".join(detail_lines(detail))
        # squeue says COMPLETED before sacct has the row: keep asking until the exit code is in.
        fake.set_state("5", "COMPLETED")
        fake.jobs["5"].acct.clear()
        (view,) = poll([tmp_path])
        assert view.record.attempts[0].slurm_state == "COMPLETED"
        fake.add_acct("5", "COMPLETED", "0:0")
        (view,) = poll([tmp_path])
    final = run_detail(view)["attempts"][0]
    assert (final["slurm_state"], final["exit_code"]) == ("COMPLETED", "0:0")


def test_states_and_reasons_are_enums_that_run_json_spells_as_the_plain_strings_of_before(
    tmp_path: Path,
) -> None:
    rec = make_record(tmp_path)
    rec.state = RunState.STOPPED
    rec.attempts = [
        Attempt(number=1, job_id="5", state=AttemptState.ENDED, stop_reason=StopReason.NODE_FAIL),
        Attempt(number=2, job_id="6"),
    ]
    runs.write_run(tmp_path, rec)
    raw = (tmp_path / "run.json").read_text()
    assert '"state": "stopped"' in raw and '"stop_reason": "node_fail"' in raw and '"state": "ended"' in raw
    assert '"state": "pending"' in raw  # the second attempt's default
    back = runs.read_run(tmp_path)
    assert back.state is RunState.STOPPED and f"{back.state}" == "stopped"
    ended, pending = back.attempts
    assert ended.state is AttemptState.ENDED and ended.stop_reason is StopReason.NODE_FAIL
    assert pending.state is AttemptState.PENDING and pending.stop_reason is None
    # Read and written again, the file is the same but for the `updated` stamp.
    runs.write_run(tmp_path, back)
    again = json.loads((tmp_path / "run.json").read_text())
    first = json.loads(raw)
    again.pop("updated"), first.pop("updated")
    assert again == first


def test_an_unknown_exit_reason_from_a_worker_counts_as_a_failure() -> None:
    assert StopReason.parse("preempted") is StopReason.PREEMPTED
    assert StopReason.parse("exploded") is StopReason.FAILED
