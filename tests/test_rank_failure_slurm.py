"""A rank that dies on the localhost SLURM cluster is named as the cause of the failed attempt.

`kill -9` of rank 1's python on n2 (the way the OOM killer or a crashed node agent ends a rank)
makes rank 0 fail in its next collective with gloo's "Connection reset by peer ... GLHF!", and
rank 0 is the one that writes the events. sacct only says job `FAILED 9:0` and step `FAILED 1:0`;
srun's report in `logs/<job>_sbatch.err` (`srun: error: n2: task 1: Killed`) says who died and
how. Skipped unless `scontrol ping` answers (`tools/slurm-local/start.sh`, then
`source /tmp/slurm-local/env.sh`).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import (
    events,
    moe_orch,
    queue_state,
    run_json,
    scontrol,
    status_json,
    submit,
    wait_for,
    wait_state,
    wait_step,
)

from orchestrator.rundir.reports import read_metrics

pytestmark = pytest.mark.slow  # the localhost SLURM: skipped when it is down (tests/conftest.py)


LONG = (
    "training.max_steps=300", "training.save_steps=100", "cluster.time_min=60", "training.logging_steps=1",
)  # fmt: skip
"""Long enough to be killed mid-way (tiny-slurm does 10-20 steps/s here)."""


def python_pids_on(job: str, node: str) -> dict[int, int]:
    """{global rank: pid} of the job's python processes on `node`, from `scontrol listpids JOB NODE`
    (without NODE it lists only the first node's); never srun."""
    pids: dict[int, int] = {}
    for line in scontrol("listpids", job, node).splitlines()[1:]:
        fields = line.split()  # PID JOBID STEPID LOCALID GLOBALID
        if len(fields) < 5 or not fields[4].isdigit():
            continue
        try:
            program = (Path("/proc") / fields[0] / "cmdline").read_bytes().split(b"\0")[0].decode()
        except (OSError, UnicodeDecodeError):
            continue
        if Path(program).name.startswith("python"):
            pids[int(fields[4])] = int(fields[0])
    return pids


def test_a_rank_killed_by_sigkill_is_the_cause_and_its_peers_error_the_consequence(tmp_path: Path) -> None:
    run_id, run_dir = submit(tmp_path, *LONG)
    job = str(wait_for("the job id", lambda: run_json(run_dir)["attempts"], 30)[0]["job_id"])
    wait_step(run_dir, 10)
    pid = wait_for("rank 1's python on n2", lambda: python_pids_on(job, "n2").get(1), 10, 0.2)
    os.kill(pid, signal.SIGKILL)

    # One failure is within the budget (max_failures 3): `watch` would resubmit the stopped run.
    stopped = wait_state(run_id, tmp_path, ("stopped",))
    assert stopped["state"] == "stopped", stopped
    (attempt,) = stopped["attempts"]
    (exited,) = events(run_dir, "exit")
    assert exited["reason"] == "failed" and exited["error"], "rank 0 failed in a collective"
    cause = "rank 1 on n2 was killed by signal 9 (SIGKILL)"
    assert attempt["stop_reason"] == "failed"
    assert attempt["error"] == f"{cause}; then rank 0: {exited['error']}"
    assert stopped["state_reason"] == f"attempt 1 failed: {attempt['error']}"
    shown = moe_orch("status", run_id, home=tmp_path).stdout
    assert f"error: {cause}; then rank 0: " in shown, shown

    def final_record() -> str | None:
        state: str | None = status_json(run_id, tmp_path)["attempts"][0]["slurm_state"]
        return state if state == "FAILED" else None

    wait_for("sacct's FAILED row", final_record, 60, 1)

    # Goodput over the failure, a resumption and a preemption (issue 11): resume by hand, preempt
    # the new job with USR2 past its step-100 checkpoint, let SLURM requeue it, and let it complete.
    killed_at = stopped["attempts"][0]["last_step"]
    assert moe_orch("resume", run_id, home=tmp_path).returncode == 0
    second = wait_for("the resumed job", lambda: (lambda a: a[1]["job_id"] if len(a) > 1 else None)(
        run_json(run_dir)["attempts"]), 30)  # fmt: skip
    wait_step(run_dir, 120, timeout=180)  # the killed attempt reached ~10: this is the resumed one
    subprocess.run(["scancel", "--signal=USR2", str(second)], check=True)
    wait_for("the requeue", lambda: queue_state(str(second)) in ("PENDING", "REQUEUED", "RUNNING"), 60, 0.5)
    done = wait_state(run_id, tmp_path, ("completed",), timeout=300)
    assert done["state"] == "completed", done
    reasons = [a["stop_reason"] for a in done["attempts"]]
    assert reasons == ["failed", "preempted", "completed"], reasons
    good = status_json(run_id, tmp_path)["goodput"]
    parts = sum(good[p] for p in ("startup_s", "productive_s", "redone_s", "checkpoint_s", "eval_s", "hang_s",
                                  "lost_s", "other_s"))  # fmt: skip
    assert abs(good["allocated_s"] - parts) <= 0.02 * good["allocated_s"], good
    assert good["steps_redone"] == killed_at, "the killed attempt saved nothing: all its steps were redone"
    # The redone time is the killed attempt's own step times (metrics.jsonl, first line of each step).
    first_times: dict[int, float] = {}
    for line in read_metrics(run_dir):
        if "step_time_s" in line:
            first_times.setdefault(int(line["step"]), float(line["step_time_s"]))
    measured = 2 * sum(first_times[s] for s in range(1, killed_at + 1))
    assert good["redone_s"] == pytest.approx(measured, rel=0.1, abs=0.5), (good, measured)
    assert 0 < good["goodput"] < 1 and good["productive_s"] > 0
    print("goodput:", good)
