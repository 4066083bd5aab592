"""Elastic resume on the localhost SLURM cluster: a 2-node run (ep_size 2) whose rank dies is
resumed by hand on 1 node (`moe-orch resume RUN --nodes 1 --ep-size 1`); the worker reshards the
checkpoint at start and the run completes with the same global batch.

Skipped unless `scontrol ping` answers (`tools/slurm-local/start.sh`, then
`source /tmp/slurm-local/env.sh`).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from helpers import events, moe_orch, run_json, submit, wait_final, wait_for, wait_state, wait_step
from test_rank_failure_slurm import python_pids_on

from orchestrator.rundir.checkpoints import list_checkpoints
from orchestrator.spec.loading import load_resolved

pytestmark = pytest.mark.slow  # the localhost SLURM: skipped when it is down (tests/conftest.py)

SETS = ("training.max_steps=300", "training.save_steps=20", "cluster.time_min=60", "cluster.requeue=false",
        "training.gradient_accumulation_steps=2")  # fmt: skip
"""Global batch 16 = 4 micro x 2 accumulation x 2 ranks; on 1 rank: accumulation 4."""


def test_a_run_stopped_on_two_nodes_resumes_on_one_by_resharding(tmp_path: Path) -> None:
    run_id, run_dir = submit(tmp_path, *SETS)
    job = str(wait_for("the job id", lambda: run_json(run_dir)["attempts"], 30)[0]["job_id"])
    wait_for("a checkpoint", lambda: list_checkpoints(run_dir), 180, 1)
    wait_step(run_dir, 25)
    pid = wait_for("rank 1's python on n2", lambda: python_pids_on(job, "n2").get(1), 10, 0.2)
    os.kill(pid, signal.SIGKILL)
    assert wait_state(run_id, tmp_path, ("stopped",))["state"] == "stopped"

    res = moe_orch("resume", run_id, "--nodes", "1", "--ep-size", "1", home=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "accumulation 2 -> 4 keeps the global batch 16" in res.stdout, res.stdout
    cfg = load_resolved(run_dir / "run.yaml")
    assert (cfg.cluster.nodes, cfg.ep_size, cfg.training.gradient_accumulation_steps) == (1, 1, 4)

    final = wait_final(run_id, tmp_path, timeout=600)
    assert final["state"] == "completed", final
    start = events(run_dir, "start")[-1]
    change = start["topology_change"]
    assert change["from"]["world_size"] == 2 and change["to"]["world_size"] == 1
    assert change["to"]["gradient_accumulation_steps"] == 4
    assert change["experts_by_rank"] == [[0, 1, 2, 3]]
    assert (run_dir / "checkpoints" / change["tag"]).is_dir()
