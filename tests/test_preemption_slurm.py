"""Preemption, requeue and automatic resume on the localhost SLURM cluster (issue 5).

Real jobs of `configs/tiny-slurm.yaml` (2 fake nodes x 1 rank, fp32, 4 experts over 2 ranks). Each
test interrupts a run the way a cluster does (a USR2, `scontrol requeue`, a job of the `urgent`
partition, a time limit, `kill -9` during a save, a crashing worker, a dead node) and asserts on
`run.json`, `status --json`, events.jsonl and the checkpoints. Skipped unless `scontrol ping`
answers (`tools/slurm-local/start.sh`, then `source /tmp/slurm-local/env.sh`).

Times that shape the tests (tools/slurm-local/README.md): a requeued job waits cred_expire (10 s)
+ 1 s before it can start again; KillWait is 10 s; slurmctld checks time limits every ~30 s; a
killed slurmd is noticed only after SlurmdTimeout (60 s here, ~81 s to NODE_FAIL), so the
node-failure test marks the dead node DOWN itself, as a health check would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    checkpoint_tensors,
    events,
    job_field,
    moe_orch,
    node_sh,
    node_state,
    progress_step,
    queue_state,
    rank_pid,
    run_json,
    sacct_rows,
    scontrol,
    slurm_epoch,
    status_json,
    submit,
    train_losses,
    wait_final,
    wait_for,
    wait_state,
    wait_step,
    watch_until_final,
)

pytestmark = pytest.mark.slow  # the localhost SLURM: skipped when it is down (tests/conftest.py)

# A run long enough to be interrupted mid-way (tiny-slurm does ~10-20 steps/s on this machine).
LONG = (
    "training.max_steps=300", "training.save_steps=100", "training.logging_steps=1", "cluster.time_min=60",
)  # fmt: skip


def _job(run_dir: Path) -> str:
    att = wait_for("the first attempt's job id", lambda: run_json(run_dir)["attempts"], 30)
    return str(att[0]["job_id"])


def _assert_resumed_without_loss(record: dict[str, Any], first_reason: str) -> None:
    """Two attempts of one job: the first stopped on the signal with `first_reason` and requeued,
    the second resumed from the checkpoint saved at the stop, redid nothing and completed."""
    assert record["state"] == "completed", record
    first, second = record["attempts"]
    assert first["job_id"] == second["job_id"], "SLURM restarted the same job"
    assert (first["restart"], second["restart"]) == (0, 1)
    assert first["stop_reason"] == first_reason and first["requeued"], first
    assert second["stop_reason"] == "completed"
    assert second["resumed_from"] == f"step-{first['last_step']:06d}", "resumed from the save at the stop"
    assert second["steps_redone"] == 0
    assert second["first_step"] == first["last_step"] + 1


def test_usr2_mid_run_requeues_and_resumes_bitwise_equal_to_an_uninterrupted_run(tmp_path: Path) -> None:
    # The reference runs alongside (each job takes 1 CPU of each node): same config, no signal.
    ref_id, ref_dir = submit(tmp_path, *LONG)
    run_id, run_dir = submit(tmp_path, *LONG)
    job = _job(run_dir)
    wait_step(run_dir, 130)  # past the step-100 checkpoint: the stop must save a newer one
    signalled = time.time()
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    wait_for("the job to be pending again", lambda: queue_state(job) in ("PENDING", "REQUEUED"), 60, 0.1)
    job_left = time.time()  # every rank has exited (the job is pending again)

    record = wait_final(run_id, tmp_path, timeout=240)
    reference = wait_final(ref_id, tmp_path, timeout=120)
    _assert_resumed_without_loss(record, "preempted")
    assert reference["state"] == "completed" and len(reference["attempts"]) == 1

    # The whole loss trajectory and the final weights equal the uninterrupted run's, bit for bit.
    losses, ref_losses = train_losses(run_dir), train_losses(ref_dir)
    assert [s for s, _ in losses] == list(range(1, 301)), "every step logged once: none lost, none redone"
    assert losses == ref_losses
    final, ref_final = run_dir / "checkpoints" / "step-000300", ref_dir / "checkpoints" / "step-000300"
    mine, theirs = checkpoint_tensors(final), checkpoint_tensors(ref_final)
    assert mine.keys() == theirs.keys()
    assert all(mine[k].equal(theirs[k]) for k in mine), "final weights differ from the uninterrupted run"

    # The stop: one signal event, a checkpoint at the stop step, then exit(preempted, requeued).
    stop_step = record["attempts"][0]["last_step"]
    ev = events(run_dir)
    sig = next(e for e in ev if e["event"] == "signal")
    saved = next(e for e in ev if e["event"] == "checkpoint" and e["step"] == stop_step)
    exited = next(e for e in ev if e["event"] == "exit" and e["reason"] == "preempted")
    firsts = [e for e in ev if e["event"] == "first_step"]
    assert sig["signal"] == "USR2" and sig["step"] == stop_step and exited["requeued"] is True
    assert len(firsts) == 2 and firsts[1]["step"] == stop_step + 1
    (requeued_row, *_) = sacct_rows(job)
    assert requeued_row["State"] == "REQUEUED"
    timings = {
        "signal_to_checkpoint_durable_s": round(saved["time"] - signalled, 2),
        "signal_to_job_exited_s": round(job_left - signalled, 2),
        "signal_to_next_first_step_s": round(firsts[1]["time"] - signalled, 2),
        "save_s": saved["save_s"],
        "steps_lost": record["attempts"][1]["steps_redone"],
        "stop_step": stop_step,
    }
    print("preemption timings:", json.dumps(timings))
    out = os.environ.get("MOE_ORCH_PREEMPTION_TIMINGS")
    if out:
        Path(out).write_text(json.dumps(timings, indent=1) + "\n")
    assert timings["signal_to_checkpoint_durable_s"] < 10

    # What the user sees: both attempts with their reasons; attempt 1's last steps and its save.
    shown = moe_orch("status", run_id, home=tmp_path).stdout
    assert "attempt 1:" in shown and "stop preempted" in shown, shown
    assert "attempt 2:" in shown and "stop completed" in shown, shown
    assert f"resumed from step-{stop_step:06d}, redone 0" in shown, shown
    first_logs = moe_orch("logs", run_id, "--attempt", "1", "--rank", "0", home=tmp_path).stdout
    assert f"step {stop_step}/300" in first_logs, first_logs[-2000:]
    assert f"saved checkpoint step-{stop_step:06d}" in first_logs, first_logs[-2000:]
    assert f"step {stop_step + 1}/300" not in first_logs, "attempt 2's steps are not shown"
    first_err = moe_orch("logs", run_id, "--attempt", "1", "--stderr", home=tmp_path).stdout
    assert f"stop signal USR2: saving a checkpoint at step {stop_step}" in first_err, first_err[-2000:]


def test_stop_signals_while_a_completed_run_leaves_do_not_fail_the_job(tmp_path: Path) -> None:
    # A USR2 (time-limit warning, preemption) can land after the last step, while the ranks leave.
    # A storm of them from the `exit completed` event until both processes are gone: the job must
    # still end COMPLETED 0:0 in SLURM's records, not FAILED 12:0 (killed by signal 12 at exit).
    run_id, run_dir = submit(tmp_path, "training.max_steps=60", "training.save_steps=1000")
    job = _job(run_dir)
    wait_step(run_dir, 1)
    pids = [wait_for(f"rank {r}'s pid", lambda r=r: rank_pid(job, r), 30) for r in (0, 1)]  # type: ignore[misc]
    wait_for("the exit event", lambda: events(run_dir, "exit"), 120, 0.01)
    assert events(run_dir, "exit")[-1]["reason"] == "completed"
    sent, alive = 0, list(pids)
    while alive:
        for pid in list(alive):
            try:
                os.kill(pid, signal.SIGUSR2)
                sent += 1
            except ProcessLookupError:
                alive.remove(pid)
        time.sleep(0.01)
    assert sent > 0
    record = wait_final(run_id, tmp_path, timeout=120)
    assert record["state"] == "completed", record
    row = wait_for("sacct's final row", lambda: [r for r in sacct_rows(job) if r["State"] != "RUNNING"], 60)
    assert (row[-1]["State"], row[-1]["ExitCode"]) == ("COMPLETED", "0:0"), (row, sent)


def test_scontrol_requeue_mid_run_saves_on_sigterm_and_resumes(tmp_path: Path) -> None:
    run_id, run_dir = submit(tmp_path, *LONG)
    job = _job(run_dir)
    wait_step(run_dir, 120)
    scontrol("requeue", job)

    record = wait_final(run_id, tmp_path, timeout=240)
    _assert_resumed_without_loss(record, "preempted")
    sig = events(run_dir, "signal")
    assert [e["signal"] for e in sig] == ["TERM"], "SLURM's requeue sends SIGTERM; the worker saved on it"
    assert [s for s, _ in train_losses(run_dir)] == list(range(1, 301))


def test_a_job_of_the_urgent_partition_preempts_the_run_which_resumes_after_it(tmp_path: Path) -> None:
    run_id, run_dir = submit(tmp_path, *LONG)
    wait_step(run_dir, 120)
    # All CPUs of n2 at a higher PriorityTier: SLURM preempts the run (USR2 to every rank, as the job
    # was submitted with --signal), which saves and requeues; it can only restart once n2 is free.
    urgent = subprocess.run(
        ["sbatch", "--parsable", "-p", "urgent", "-w", "n2", "-N1", "--exclusive", "-J", "urgent-test",
         "-o", str(tmp_path / "urgent.out"), "--wrap", "sleep 15"],
        capture_output=True, text=True, check=True,
    ).stdout.strip().split(";")[0]  # fmt: skip

    record = wait_final(run_id, tmp_path, timeout=240)
    _assert_resumed_without_loss(record, "preempted")
    assert [e["signal"] for e in events(run_dir, "signal")] == ["USR2"]
    (urgent_row,) = sacct_rows(urgent)
    assert urgent_row["State"] == "COMPLETED"
    second_start = events(run_dir, "start")[1]["time"]
    stopped = events(run_dir, "exit")[0]["time"]
    assert slurm_epoch(urgent_row["Start"]) >= stopped - 2, "the urgent job ran once the run had saved"
    assert slurm_epoch(urgent_row["End"]) <= second_start + 1, "the run resumed after the urgent job"


TIME_LIMIT_STEPS = 1500


def test_the_time_limit_signal_saves_requeues_as_timeout_and_the_run_completes(tmp_path: Path) -> None:
    # --time=1 with USR2@20: slurmctld checks limits every ~30 s and signals once now + 30 + 20 >=
    # the end, so USR2 comes 10-40 s into the job, after the worker installed its handlers (a USR2
    # before the first step stops at step 1) and before 1,500 steps are done: ~15-20 steps/s after
    # ~8-14 s of start-up under the suite's load, and at most ~40 steps/s on an idle machine (700
    # steps, as before, once finished first there, at ~35 s).
    run_id, run_dir = submit(
        tmp_path, f"training.max_steps={TIME_LIMIT_STEPS}", "training.save_steps=1000",
        "training.eval_steps=1000", "cluster.time_min=1", "cluster.signal_delay_s=20",
    )  # fmt: skip
    job = _job(run_dir)
    stop = wait_for("the exit event of the first attempt", lambda: events(run_dir, "exit"), 90)[0]
    assert stop["reason"] == "timeout" and stop["requeued"] is True, stop
    # NOTE: the next attempt would get the same minute and be signalled again; the remaining steps
    # need one longer attempt to keep this test short.
    scontrol("update", f"JobId={job}", "TimeLimit=10")

    record = wait_final(run_id, tmp_path, timeout=300)
    _assert_resumed_without_loss(record, "timeout")
    assert [e["signal"] for e in events(run_dir, "signal")] == ["USR2"]
    assert [s for s, _ in train_losses(run_dir)] == list(range(1, TIME_LIMIT_STEPS + 1))


def test_kill_9_during_a_save_leaves_a_partial_checkpoint_that_the_next_attempt_skips(tmp_path: Path) -> None:
    from orchestrator.rundir.checkpoints import verify_checkpoint

    # Every save holds 6 s between DeepSpeed's files and the manifest (MOE_ORCH_FAULT=hold_save:6).
    run_id, run_dir = submit(
        tmp_path, "training.max_steps=90", "training.save_steps=30", "cluster.time_min=60",
        "cluster.env.MOE_ORCH_FAULT=hold_save:6",
    )  # fmt: skip
    job = _job(run_dir)
    ckpts = run_dir / "checkpoints"
    wait_for("the step-30 checkpoint", lambda: (ckpts / "step-000030" / "manifest.json").is_file(), 120)
    partial = ckpts / ".partial-step-000060"
    wait_for("the step-60 save to start", lambda: partial.is_dir() and progress_step(run_dir) == 60, 60, 0.1)
    pid = wait_for("rank 0's process", lambda: rank_pid(job, 0), 10, 0.1)
    os.kill(pid, signal.SIGKILL)  # rank 0 dies mid-save: no manifest, no exit event
    assert not (ckpts / "step-000060").exists()

    # SLURM does not requeue a failed job: the attempt ends `failed` (from sacct) and `watch`
    # resubmits it (1 failure <= max_failures 3).
    stopped = wait_state(run_id, tmp_path, ("stopped",))
    assert stopped["state"] == "stopped", stopped
    assert stopped["attempts"][0]["stop_reason"] == "failed"
    assert stopped["latest_checkpoint"]["tag"] == "step-000030", "the partial save is not a checkpoint"

    record, watched = watch_until_final(run_id, tmp_path, timeout=240)
    assert record["state"] == "completed", (record, watched)
    _, second = record["attempts"]
    assert second["job_id"] != job and "resubmitted by watch after attempt 1 failed" in second["note"]
    assert second["resumed_from"] == "step-000030", "the newest VALID checkpoint"
    assert second["steps_redone"] == 30, "steps 31-60 of the killed attempt are trained again"
    assert not partial.exists(), "the partial save was cleaned up"
    assert all(verify_checkpoint(ckpts / t) for t in ("step-000060", "step-000090"))
    losses = train_losses(run_dir)
    assert [s for s, _ in losses] == list(range(1, 61)) + list(range(31, 91))
    assert losses[30:60] == losses[60:90], "the redone steps repeat the killed attempt's losses"


def test_a_worker_failing_at_every_start_stops_failed_and_one_without_progress_stops_as_a_crash_loop(
    tmp_path: Path,
) -> None:
    crash_id, _ = submit(tmp_path, "cluster.env.MOE_ORCH_FAULT=crash_at_start", "cluster.max_failures=2")
    loop_id, _ = submit(
        tmp_path, "cluster.env.MOE_ORCH_FAULT=exit_without_progress", "cluster.max_failures=10",
        "cluster.max_attempts_without_progress=2",
    )  # fmt: skip
    res = moe_orch("watch", crash_id, loop_id, "--interval", "2", home=tmp_path, timeout=400)
    assert res.returncode == 0, res.stdout + res.stderr

    crash = status_json(crash_id, tmp_path)
    assert crash["state"] == "failed", crash
    assert len(crash["attempts"]) == 3, "the first attempt and max_failures=2 resubmissions"
    assert all(a["stop_reason"] == "failed" for a in crash["attempts"])
    assert "more than cluster.max_failures=2" in crash["state_reason"]
    assert len({a["job_id"] for a in crash["attempts"]}) == 3

    loop = status_json(loop_id, tmp_path)
    assert loop["state"] == "failed", loop
    assert len(loop["attempts"]) == 2
    assert loop["state_reason"].startswith("crash loop: 2 consecutive attempts without a new step")
    assert f"{loop_id}: failed (crash loop" in res.stdout


def test_a_node_failure_ends_the_attempt_node_fail_and_watch_resubmits_without_that_node(
    tmp_path: Path,
) -> None:
    # One node x 2 ranks, so the other node can take the resubmission; --no-requeue, so SLURM does
    # not restart the job itself and `watch` must.
    run_id, run_dir = submit(
        tmp_path, "cluster.nodes=1", "cluster.tasks_per_node=2", "cluster.requeue=false",
        "training.max_steps=200", "training.save_steps=50", "cluster.time_min=60",
    )  # fmt: skip
    job = _job(run_dir)
    wait_step(run_dir, 60)
    (node,) = events(run_dir, "start")[0]["nodes"]
    try:
        node_sh("stop", node)  # SIGKILL the node's slurmd and the job's processes on it
        # NOTE: slurmctld would mark the silent node DOWN only after SlurmdTimeout (60 s here, ~81 s
        # to NODE_FAIL, tools/slurm-local/README.md); a health check does it now.
        scontrol("update", f"NodeName={node}", "State=DOWN", "Reason=moe-orch-test-node-failure")
        stopped = wait_state(run_id, tmp_path, ("stopped",))
        assert stopped["state"] == "stopped", stopped
        assert stopped["attempts"][0]["stop_reason"] == "node_fail"
        assert stopped["attempts"][0]["slurm_state"].startswith("NODE_FAIL")

        record, watched = watch_until_final(run_id, tmp_path, timeout=240)
        assert record["state"] == "completed", (record, watched)
        _, second = record["attempts"]
        assert second["job_id"] != job
        assert record["excluded_nodes"] == [node] and second["exclude"] == [node]
        assert node not in second["nodes"]
        assert f"#SBATCH --exclude={node}" in (run_dir / "rendered" / "sbatch.sh").read_text()
        assert second["resumed_from"] == "step-000050"
        assert job_field(second["job_id"], "ExcNodeList") == node
    finally:
        node_sh("start", node)
        wait_for(f"{node} back in service", lambda: node_state(node) in ("idle", "mixed", "allocated"), 60)
