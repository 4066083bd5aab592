"""Heartbeats, the stall watchdog and stragglers with real ranks (torchrun, 2 ranks over gloo, the
tiny MoE), no scheduler: a rank stuck inside a collective that nobody else joins is found and named,
so is a rank stuck before the rendezvous (under `cluster.startup_timeout_s`), and a rank made three
times slower is flagged as a straggler. tests/test_hangs_slurm.py runs the hang outside a
collective, the requeue and the resume on the real cluster."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, events, free_port

from orchestrator.rundir.exitcodes import EXIT_HUNG
from orchestrator.rundir.heartbeats import read_heartbeats

pytestmark = pytest.mark.slow  # each launch starts 2 ranks (~20 s of imports on 2 cores)

TINY = REPO / "configs" / "tiny-cpu.yaml"


def launch(run_dir: Path, fault: str, *sets: str, timeout: int = 240) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), "-m", "worker", "--config", str(TINY), "--run-dir", str(run_dir)]  # fmt: skip
    for item in sets:
        args += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "TOKENIZERS_PARALLELISM": "false", "MOE_ORCH_FAULT": fault}  # fmt: skip
    proc = subprocess.run(
        args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )
    (run_dir.parent / f"{run_dir.name}.log").write_text(proc.stdout + proc.stderr)
    return proc


def test_a_rank_stuck_inside_a_collective_is_named_and_every_rank_leaves_with_exit_76(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = launch(run_dir, "hang_at_step:8:1:collective", "training.max_steps=40", "training.save_steps=5",
                  "cluster.stall_timeout_s=8", "cluster.heartbeat_s=1")  # fmt: skip
    assert f"exitcode  : {EXIT_HUNG}" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    (hang,) = events(run_dir, "hang")
    assert [(s["rank"], s["phase"], s["step"]) for s in hang["suspects"]] == [(1, "collective", 7)], hang
    assert [w["rank"] for w in hang["waiting"]] == [0]
    assert hang["time"] - hang["last_progress"] < 8 + 30
    (exited,) = events(run_dir, "exit")
    assert exited["reason"] == "hung" and exited["requeued"] is False, "no scheduler here to requeue"
    assert exited["ledger"]["startup"] > 0 and exited["train_s"] > 0
    stacks = run_dir / "attempts" / hang["attempt_key"] / "stacks"
    rank1 = (stacks / "rank-1.txt").read_text()
    assert "in all_reduce" in rank1 and "_injected_hang" in rank1, rank1
    rank0 = (stacks / "rank-0.txt").read_text()
    assert "common_length" in rank0, "rank 0 waits in the next step's collective"


def test_a_rank_stuck_before_the_rendezvous_is_named_within_the_startup_limit(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = launch(run_dir, "hang_at_startup:1", "cluster.startup_timeout_s=10", "cluster.heartbeat_s=1",
                  timeout=120)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert out.count(f"exitcode  : {EXIT_HUNG}") == 2, out[-3000:]
    (hang,) = events(run_dir, "hang")
    assert hang["stage"] == "startup" and hang["stall_limit_s"] == 10.0 and hang["step"] is None
    assert [(s["rank"], s["phase"]) for s in hang["suspects"]] == [(1, "startup")], hang
    assert [(w["rank"], w["phase"]) for w in hang["waiting"]] == [(0, "rendezvous")]
    assert hang["suspects"][0]["host"] == socket.gethostname()
    (exited,) = events(run_dir, "exit")
    assert exited["reason"] == "hung" and exited["requeued"] is False, "no scheduler here to requeue"
    assert events(run_dir, "start") == [], "training never started"
    stacks = run_dir / "attempts" / hang["attempt_key"] / "stacks"
    assert "_injected_startup_hang" in (stacks / "rank-1.txt").read_text()
    assert "init_distributed" in (stacks / "rank-0.txt").read_text(), "rank 0 waits for rank 1"


def test_a_rank_three_times_slower_is_flagged_as_a_straggler_with_its_host(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = launch(run_dir, "slow_rank:1:3", "training.max_steps=60", "training.save_steps=1000",
                  "cluster.heartbeat_s=0.5")  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    flagged = events(run_dir, "straggler")
    assert [(e["rank"], e["host"]) for e in flagged] == [(1, socket.gethostname())], flagged
    assert flagged[0]["factor"] >= 1.5
    key = events(run_dir, "start")[0]["attempt_key"]
    beats = read_heartbeats(run_dir, key)
    assert sorted(beats) == [0, 1] and all(b["phase"] == "done" for b in beats.values())
    assert len(beats[1]["compute_s"]) == 50, "the last 50 steps"
