"""squeue/sacct parsers on literal scheduler output, and one batched call per poll."""

from __future__ import annotations

import time

import pytest
from fakes import FakeSlurm

from orchestrator.backends.slurm import scheduler
from orchestrator.backends.slurm.scheduler import (
    expand_nodelist,
    parse_sacct,
    parse_squeue,
    rows_since,
    split_state,
    stop_reason_for,
)
from orchestrator.backends.slurm.task_reports import parse_task_exits

T0 = "2026-11-28T15:20:00"
T1 = "2026-11-28T15:25:00"


@pytest.mark.parametrize(
    ("raw", "state", "by"),
    [
        ("RUNNING", "RUNNING", None),
        ("CANCELLED by 0", "CANCELLED", "0"),
        ("CANCELLED by 1000", "CANCELLED", "1000"),
        ("NODE_FAIL", "NODE_FAIL", None),
        ("OUT_OF_MEMORY", "OUT_OF_MEMORY", None),
        ("COMPLETED+", "COMPLETED", None),
    ],
)
def test_split_state_separates_who_cancelled(raw: str, state: str, by: str | None) -> None:
    assert split_state(raw) == (state, by)


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        ("COMPLETED", "completed"),
        ("PREEMPTED", "preempted"),
        ("REQUEUED", "preempted"),
        ("NODE_FAIL", "node_fail"),
        ("TIMEOUT", "timeout"),
        ("CANCELLED", "cancelled"),
        ("OUT_OF_MEMORY", "failed"),
        ("FAILED", "failed"),
        ("RUNNING", None),
    ],
)
def test_slurm_states_map_to_stop_reasons(state: str, reason: str | None) -> None:
    assert stop_reason_for(state) == reason


def test_sacct_keeps_one_row_per_run_of_a_requeued_job_oldest_first() -> None:
    text = (
        f"12|REQUEUED|0:0|{T0}|{T0}|{T0}|n[1-2]\n"
        f"12|NODE_FAIL|0:0|{T0}|{T0}|{T0}|n[1-2]\n"
        f"12|COMPLETED|0:0|{T1}|{T1}|{T1}|n[1-2]\n"
    )
    rows = parse_sacct(text)["12"]
    assert [r.state for r in rows] == ["REQUEUED", "NODE_FAIL", "COMPLETED"]
    assert all(r.final for r in rows)
    assert rows[2].exit_code == "0:0"
    assert rows[0].nodelist == "n[1-2]"


@pytest.mark.parametrize(
    ("line", "state", "by", "exit_code"),
    [
        (f"7|PREEMPTED|0:15|{T0}|{T0}|{T1}|n1", "PREEMPTED", None, "0:15"),
        (f"7|NODE_FAIL|1:0|{T0}|{T0}|{T1}|n2", "NODE_FAIL", None, "1:0"),
        (f"7|TIMEOUT|0:0|{T0}|{T0}|{T1}|n1", "TIMEOUT", None, "0:0"),
        (f"7|CANCELLED by 0|0:0|{T0}|{T0}|{T1}|n[1-2]", "CANCELLED", "0", "0:0"),
        (f"7|OUT_OF_MEMORY|0:125|{T0}|{T0}|{T1}|n1", "OUT_OF_MEMORY", None, "0:125"),
        (f"7|RUNNING|0:0|{T0}|{T0}|Unknown|n1", "RUNNING", None, "0:0"),
        (f"7|PENDING|0:0|{T0}|Unknown|Unknown|None assigned", "PENDING", None, "0:0"),
    ],
)
def test_sacct_rows_carry_state_canceller_and_exit_code(
    line: str, state: str, by: str | None, exit_code: str
) -> None:
    (row,) = parse_sacct(line + "\n")["7"]
    assert (row.state, row.cancelled_by, row.exit_code) == (state, by, exit_code)
    assert row.submit is not None


def test_sacct_running_row_has_no_end_and_pending_no_start() -> None:
    rows = parse_sacct(f"7|PENDING|0:0|{T0}|Unknown|Unknown|None assigned\n")["7"]
    assert rows[0].start is None and rows[0].end is None
    assert expand_nodelist(rows[0].nodelist) == []


def test_sacct_ignores_steps_and_blank_lines() -> None:
    text = f"\n8|COMPLETED|0:0|{T0}|{T0}|{T1}|n1\n8.batch|COMPLETED|0:0|{T0}|{T0}|{T1}|n1\n"
    assert list(parse_sacct(text)) == ["8"]


def test_squeue_with_states_all_shows_finished_and_requeued_jobs() -> None:
    text = f"5|RUNNING|None|n[1-2]|{T0}|{T0}\n6|PENDING|BeginTime||{T0}|N/A\n9|COMPLETED|None|n1|{T0}|{T0}\n"
    rows = parse_squeue(text)
    assert rows["5"].alive and rows["6"].alive and not rows["9"].alive
    assert rows["6"].reason == "BeginTime"
    assert rows["6"].start is None


def test_a_reused_job_id_never_matches_an_older_job() -> None:
    older = time.mktime(time.strptime(T0, "%Y-%m-%dT%H:%M:%S"))
    newer = older + 3600
    rows = parse_sacct(f"3|FAILED|1:0|{T0}|{T0}|{T1}|n1\n")["3"]
    assert rows_since(rows, older) == rows
    assert rows_since(rows, newer) == []  # the job submitted an hour later has no row yet (lag)


@pytest.mark.parametrize(
    ("nodelist", "names"),
    [
        ("n[1-2]", ["n1", "n2"]),
        ("n1", ["n1"]),
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("a,b[1-2]", ["a", "b1", "b2"]),
        ("None assigned", []),
    ],
)
def test_expand_nodelist(nodelist: str, names: list[str]) -> None:
    assert expand_nodelist(nodelist) == names


def test_query_makes_one_squeue_and_one_sacct_call_for_many_jobs() -> None:
    fake = FakeSlurm()
    with fake.context():
        for _ in range(5):
            fake._sbatch(["x"])
        snap = scheduler.query(list(fake.jobs))
    assert fake.count("squeue") == 1
    assert fake.count("sacct") == 1
    assert set(snap.queue) == set(fake.jobs)
    squeue_call = next(c for c in fake.calls if c[0] == "squeue")
    assert "--states=all" in squeue_call and "-h" in squeue_call


def test_query_survives_missing_accounting() -> None:
    fake = FakeSlurm()

    def broken_sacct(args: object) -> str:
        raise FileNotFoundError("sacct")

    with fake.context():
        fake._sbatch(["x"])
        fake._sacct = broken_sacct  # type: ignore[method-assign]
        snap = scheduler.query(["100"])
    assert snap.queue["100"].state == "PENDING"
    assert snap.errors and "sacct" in snap.errors[0]


def test_status_poll_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, orchestrator.cli, orchestrator.lifecycle.status, orchestrator.backends.slurm.backend, "
        "orchestrator.backends.local, "
        "orchestrator.lifecycle.watch, orchestrator.lifecycle.logs, orchestrator.lifecycle.submit; "
        "assert 'torch' not in sys.modules and 'deepspeed' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- srun's report of the tasks that ended badly (the batch script's stderr) ---------------------

# `logs/<job>_sbatch.err` after `kill -9` of rank 1's python on n2 (localhost SLURM 22.05); sacct
# had only `2|FAILED|9:0` (job), `2.batch|FAILED|9:0` and `2.0|FAILED|1:0` (the step keeps the
# highest task exit code: the signal is lost), so the rank, its node and the signal come from here.
KILLED_RANK_1_AFTER_A_REQUEUE = """\
slurmstepd-n1: error: *** JOB 2 ON n1 CANCELLED AT 2026-11-29T12:05:55 DUE TO JOB REQUEUE ***
srun: Job step aborted: Waiting up to 12 seconds for job step to finish.
srun: got SIGCONT
srun: forcing job termination
srun: error: n2: task 1: Killed
srun: error: n1: task 0: Exited with exit code 1
srun: Force Terminated StepId=2.0
"""


@pytest.mark.parametrize(
    ("line", "ranks", "signal", "exit_code", "described"),
    [
        ("srun: error: n2: task 1: Killed", [1], 9, None, "rank 1 on n2 was killed by signal 9 (SIGKILL)"),
        ("srun: error: n1: task 0: Exited with exit code 1", [0], None, 1, "rank 0 on n1 exited with code 1"),
        (
            "srun: error: gpu[01-02]: tasks 0-2,7: Segmentation fault (core dumped)",
            [0, 1, 2, 7],
            11,
            None,
            "ranks 0-2,7 on gpu[01-02] were killed by signal 11 (SIGSEGV), core dumped",
        ),
        ("srun: error: n2: task 3: Aborted", [3], 6, None, "rank 3 on n2 was killed by signal 6 (SIGABRT)"),
        ("srun: error: n2: task 1: Out Of Memory", [1], None, None, "rank 1 on n2 ran out of memory"),
    ],
)
def test_srun_says_which_rank_on_which_node_ended_and_how(
    line: str, ranks: list[int], signal: int | None, exit_code: int | None, described: str
) -> None:
    (report,) = parse_task_exits(line + "\n")
    assert (report.ranks, report.signal, report.exit_code) == (ranks, signal, exit_code)
    assert report.describe() == described


def test_srun_reports_come_in_the_order_the_tasks_ended() -> None:
    reports = parse_task_exits(KILLED_RANK_1_AFTER_A_REQUEUE)
    assert [r.describe() for r in reports] == [
        "rank 1 on n2 was killed by signal 9 (SIGKILL)",
        "rank 0 on n1 exited with code 1",
    ]


def test_srun_reports_of_an_earlier_run_of_a_requeued_job_are_left_out() -> None:
    # `--open-mode=append`: every run of a requeued job writes to the same file.
    text = (
        "srun: error: n2: task 1: Killed\n"
        "slurmstepd-n1: error: *** JOB 2 ON n1 CANCELLED AT 2026-11-29T12:05:55 DUE TO PREEMPTION ***\n"
        "srun: error: n1: task 0: Exited with exit code 3\n"
    )
    assert [r.describe() for r in parse_task_exits(text)] == ["rank 0 on n1 exited with code 3"]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "slurmstepd-n1: error: *** JOB 2 ON n1 CANCELLED AT 2026-11-29T12:05:55 DUE TO JOB REQUEUE ***\n"
        "srun: Job step aborted: Waiting up to 12 seconds for job step to finish.\n",
        "srun: error: n2: task 1: Killed\nsrun: error: Node failure on n2\n",
    ],
)
def test_a_run_that_no_task_ended_badly_has_no_reports(text: str) -> None:
    assert parse_task_exits(text) == []
