"""Hangs on the localhost SLURM cluster (issue 11): failures that send no signal and end no process.

Real jobs of `configs/tiny-slurm.yaml` (2 fake nodes x 1 rank, 4 experts over 2 ranks) with a short
stall limit. One rank stuck (MOE_ORCH_FAULT `hang_at_step`) is found by the ranks' own watchdogs;
a whole job frozen with SIGSTOP is found by `watch` from the silent heartbeats. Both runs end
bitwise equal to an uninterrupted run of the same config, which runs alongside.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    checkpoint_tensors,
    events,
    moe_orch,
    rank_pid,
    run_json,
    submit,
    train_losses,
    wait_final,
    wait_for,
    wait_step,
    watch_until_final,
)

pytestmark = pytest.mark.slow  # the localhost SLURM: skipped when it is down (tests/conftest.py)

STALL_S = 15
# One node x 2 ranks: the other node can take the attempt after a hang, so the suspect's node is
# excluded (with both nodes needed, the unit tests show the retry on the same nodes).
RUN = (
    "training.max_steps=300", "training.save_steps=50", "training.logging_steps=1", "cluster.time_min=60",
    f"cluster.stall_timeout_s={STALL_S}", "cluster.heartbeat_s=2",
    "cluster.nodes=1", "cluster.tasks_per_node=2",
)  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """The same run without a fault, submitted first so that it trains beside the first test's."""
    home = tmp_path_factory.mktemp("reference")
    run_id, run_dir = submit(home, *RUN)
    yield run_id, run_dir, home


def _final_state(ref: tuple[str, Path, Path]) -> tuple[dict[int, float], dict[str, Any]]:
    run_id, run_dir, home = ref
    assert wait_final(run_id, home, timeout=300)["state"] == "completed"
    return dict(train_losses(run_dir)), checkpoint_tensors(run_dir / "checkpoints" / "step-000300")


def _assert_bitwise_equal(run_dir: Path, ref: tuple[str, Path, Path]) -> None:
    ref_losses, ref_weights = _final_state(ref)
    # A redone step is logged again, later: the last line of each step is the final trajectory's.
    assert dict(train_losses(run_dir)) == ref_losses
    mine = checkpoint_tensors(run_dir / "checkpoints" / "step-000300")
    assert mine.keys() == ref_weights.keys()
    assert all(mine[k].equal(ref_weights[k]) for k in mine), "final weights differ from the uninterrupted run"


def test_a_rank_stuck_before_a_step_is_found_by_the_watchdogs_and_the_run_resumes_bitwise(
    tmp_path: Path, reference: tuple[str, Path, Path]
) -> None:
    run_id, run_dir = submit(tmp_path, *RUN, "cluster.env.MOE_ORCH_FAULT=hang_at_step:120:1")
    record = wait_final(run_id, tmp_path, timeout=300)
    assert record["state"] == "completed", record
    first, second = record["attempts"]
    assert first["stop_reason"] == "hung" and first["requeued"], first
    assert (first["job_id"], second["job_id"]) == (first["job_id"], first["job_id"]), "SLURM requeued it"
    assert second["stop_reason"] == "completed" and second["resumed_from"] == "step-000100"
    assert second["steps_redone"] == 19, "steps 101-119 were done after the last checkpoint"

    (hang,) = events(run_dir, "hang")
    (node,) = first["nodes"]
    suspect = hang["suspects"]
    assert [(s["rank"], s["host"], s["step"]) for s in suspect] == [(1, node, 119)], hang
    assert [(w["rank"], w["host"], w["phase"]) for w in hang["waiting"]] == [(0, node, "collective")], hang
    assert hang["time"] - hang["last_progress"] <= STALL_S + 30, "detected within the limit plus 30 s"
    assert f"excluded {node} from the next run" in hang["note"], hang["note"]
    (other,) = second["nodes"]
    assert other != node, "the requeued job ran on the other node"
    stacks = run_dir / "attempts" / first["attempt_key"] / "stacks"
    assert sorted(p.name for p in stacks.iterdir()) == ["rank-0.txt", "rank-1.txt"]
    assert "_injected_hang" in (stacks / "rank-1.txt").read_text()
    assert "all_reduce" in (stacks / "rank-0.txt").read_text(), "rank 0 waits in the collective"

    _assert_bitwise_equal(run_dir, reference)

    first_steps = events(run_dir, "first_step")
    timings = {
        "hang_to_detection_s": round(hang["time"] - hang["last_progress"], 1),
        "detection_to_next_first_step_s": round(first_steps[1]["time"] - hang["time"], 1),
    }
    print("hang timings:", json.dumps(timings))
    shown = moe_orch("status", run_id, home=tmp_path).stdout
    print(shown)
    assert "attempt 1:" in shown and "stop hung" in shown, shown
    assert f"suspect rank 1 on {node} (data, step 119): behind the others" in shown, shown
    assert "goodput " in shown and "hang " in shown and "(19 steps redone)" in shown, shown
    data = json.loads(moe_orch("status", run_id, "--json", home=tmp_path).stdout)
    good = data["goodput"]
    assert good["hang_s"] >= 2 * STALL_S and good["steps_redone"] == 19
    assert abs(good["unattributed_s"]) <= 0.02 * good["allocated_s"], good


def _rank_pids(job: str) -> list[int]:
    return [pid for pid in (rank_pid(job, 0), rank_pid(job, 1)) if pid is not None]


def test_a_job_frozen_whole_is_killed_by_watch_from_silent_heartbeats_and_resumes_bitwise(
    tmp_path: Path, reference: tuple[str, Path, Path]
) -> None:
    run_id, run_dir = submit(tmp_path, *RUN)
    job = str(wait_for("the job id", lambda: run_json(run_dir)["attempts"], 30)[0]["job_id"])
    wait_step(run_dir, 120)
    pids = wait_for("both ranks' pids", lambda: (lambda p: p if len(p) == 2 else None)(_rank_pids(job)), 20)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    record, out = watch_until_final(run_id, tmp_path, timeout=300)
    assert record["state"] == "completed", (record, out)
    first, second = record["attempts"]
    assert first["stop_reason"] == "hung" and first["hang"]["detected_by"] == "watch", first
    assert "killed job" in out and "resubmitted" in out, out
    assert second["job_id"] != job and second["stop_reason"] == "completed"
    hang = events(run_dir, "hang")[0]
    assert hang["silent"] == [0, 1], "every rank's heartbeat went silent"
    _assert_bitwise_equal(run_dir, reference)
