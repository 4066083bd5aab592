"""Chaining without requeue (`cluster.continue_with: chain`) on a cluster that does not requeue
(issue 13).

The shared localhost cluster requeues (`JobRequeue=1`) and its partitions have no time limit, so
this module starts a SECOND, independent instance of tools/slurm-local (its own directory, ports
and nodes c1, c2; no accounting) with `JobRequeue=0` and the default partition's `MaxTime=1`
(minute), and stops it at the end. A run of 1,500 steps does not fit in one minute-long job: each
job stops itself 25 s before its limit, saves and submits its successor (`sbatch
--dependency=afterany:<job>`); nothing runs on the login node (no `watch`, no `status` until the
end). The run ends bitwise equal to an uninterrupted run of the same config (in the `urgent`
partition, which has no time limit), which trains alongside it.

NOTE: the steps are calibrated for at least three jobs with margin. Measured on the CI's kind of
machine (2 cores): ~15 steps/s for each of two runs training at once, ~23-26 steps/s for one alone,
~10 s from a job's start to its first step. The reference trains alongside the first two jobs, so
each of them trains ~25 s x ~15 steps/s, ~380 steps: 4 jobs in ~130 s there (3 runs: 360-410
steps per job). A loaded machine makes more jobs, never fewer; two jobs would need a machine ~1.7x
faster (the reference ends sooner there, and a job alone trains faster). Where jobs train much
more than that, the test says so: raise STEPS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO, checkpoint_tensors, events, train_losses, wait_for

pytestmark = pytest.mark.slow  # a second localhost SLURM (needs what the first needs: root, the packages)

CHAIN_DIR = "/tmp/slurm-local-chain"
CLUSTER = {
    "SLURM_LOCAL_DIR": CHAIN_DIR, "SLURM_LOCAL_NODE_PREFIX": "c", "SLURM_LOCAL_JOB_REQUEUE": "0",
    "SLURM_LOCAL_MAX_TIME": "1", "SLURM_LOCAL_ACCOUNTING": "0", "SLURM_LOCAL_GPUS": "0",
    "SLURM_LOCAL_CTLD_PORT": "6917", "SLURM_LOCAL_DBD_PORT": "6919", "SLURM_LOCAL_DB_PORT": "13406",
    "SLURM_LOCAL_NODE_PORT": "17101",
}  # fmt: skip
STEPS = 1500
RUN = (
    f"training.max_steps={STEPS}", "training.save_steps=1000", "training.eval_steps=1000",
    "training.logging_steps=1",
)  # fmt: skip
CHAIN = (
    "cluster.continue_with=chain",
    "cluster.requeue=false",
    "cluster.time_min=1",
    "cluster.signal_delay_s=25",
)


@pytest.fixture(scope="module")
def chain_env() -> Iterator[dict[str, str]]:
    """The environment of the second cluster's commands (SLURM_CONF), started for this module."""
    tools = REPO / "tools" / "slurm-local"
    env = dict(os.environ, **CLUSTER)
    res = subprocess.run(
        ["bash", str(tools / "start.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, f"the second cluster did not start:\n{res.stderr}"
    try:
        yield dict(os.environ, SLURM_CONF=f"{CHAIN_DIR}/etc/slurm.conf")
    finally:
        subprocess.run(["bash", str(tools / "stop.sh"), "--purge"], env=env, capture_output=True, timeout=300)


def cli(env: dict[str, str], home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    run_env = dict(env, MOE_ORCH_HOME=str(home), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args], cwd=REPO, env=run_env, capture_output=True,
        text=True, timeout=300, check=False,
    )  # fmt: skip


def submit(env: dict[str, str], home: Path, *sets: str) -> Path:
    res = cli(env, home, "submit", "configs/tiny-slurm.yaml", *(a for s in sets for a in ("--set", s)))
    assert res.returncode == 0, res.stdout + res.stderr
    return home / res.stdout.splitlines()[0].strip()


def pending_dependencies(env: dict[str, str]) -> dict[str, str]:
    """{job id: its Dependency} of the jobs pending now."""
    out = subprocess.run(
        ["squeue", "-h", "-t", "PENDING", "-o", "%i|%E|%r"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    return {ln.split("|")[0]: ln.split("|")[1] for ln in out.stdout.splitlines() if "|" in ln}


def test_chain_mode_spans_three_jobs_linked_by_dependencies_and_ends_bitwise_equal(
    chain_env: dict[str, str], tmp_path: Path
) -> None:
    reference = submit(chain_env, tmp_path, *RUN, "cluster.partition=urgent", "cluster.time_min=10")
    run_dir = submit(chain_env, tmp_path, *RUN, *CHAIN)
    assert "--signal" not in (run_dir / "rendered" / "sbatch.sh").read_text(), "the job stops itself on time"
    assert (run_dir / "logs" / "successor.sh").is_file()

    # Only squeue is asked while the run goes on: no watch, no status (which would reconcile).
    seen: dict[str, str] = {}
    deadline = time.time() + 600

    def exit_events() -> list[dict[str, Any]]:
        return events(run_dir, "exit")

    while time.time() < deadline:
        for job, dep in pending_dependencies(chain_env).items():
            if dep.startswith("after"):
                seen.setdefault(job, dep)  # `afterany:<job>(unfulfilled)` while it waits
        ends = exit_events()
        if ends and ends[-1]["reason"] != "timeout":
            break
        time.sleep(0.1)  # NOTE: a successor is pending for only ~1 s
    starts, ends = events(run_dir, "start"), exit_events()
    assert ends and ends[-1]["reason"] == "completed", ends

    jobs = [str(e["job_id"]) for e in starts]
    steps = [e["step"] - (p["step"] if p else 0) for p, e in zip([None, *ends], ends, strict=False)]
    print("job chain:", " -> ".join(jobs), "steps per job:", steps, "dependencies seen:", seen)
    assert len(jobs) >= 3, f"{len(jobs)} jobs trained {steps} steps: faster than calibrated, raise STEPS"
    assert len(set(jobs)) == len(jobs), jobs
    assert [e["reason"] for e in ends] == ["timeout"] * (len(jobs) - 1) + ["completed"]
    assert [e.get("successor") for e in ends[:-1]] == jobs[1:], "each job submitted the next"
    assert all(e["requeued"] is False for e in ends)
    linked = {job: seen[job] for job in jobs[1:] if job in seen}
    assert linked, "a successor was seen pending on its dependency"
    for job, dep in linked.items():
        assert dep.startswith(f"afterany:{jobs[jobs.index(job) - 1]}"), (job, dep)
    assert not {j for j in seen if j in jobs[:1]}, "the first job waits on nothing"
    for prev, nxt in zip(ends[:-1], starts[1:], strict=True):
        assert nxt["resumed_from"] == f"step-{prev['step']:06d}" and nxt["steps_redone"] == 0

    # Equal, bit for bit, to the uninterrupted run.
    wait_for(
        "the reference run", lambda: [e for e in events(reference, "exit") if e["reason"] == "completed"], 300
    )
    assert [s for s, _ in train_losses(run_dir)] == list(range(1, STEPS + 1))
    assert train_losses(run_dir) == train_losses(reference)
    final = f"step-{STEPS:06d}"
    mine, theirs = (
        checkpoint_tensors(run_dir / "checkpoints" / final),
        checkpoint_tensors(reference / "checkpoints" / final),
    )
    assert mine.keys() == theirs.keys() and all(mine[k].equal(theirs[k]) for k in mine)

    # What run.json learns afterwards: one attempt per job, each successor noted.
    res = cli(chain_env, tmp_path, "status", run_dir.name, "--json")
    assert res.returncode == 0, res.stderr
    record = json.loads(res.stdout)
    assert record["state"] == "completed", record["state_reason"]
    assert [a["job_id"] for a in record["attempts"]] == jobs
    assert [a["stop_reason"] for a in record["attempts"]] == ["timeout"] * (len(jobs) - 1) + ["completed"]
    assert all(
        a["note"] == f"chained by job {p} (cluster.continue_with: chain)"
        for p, a in zip(jobs, record["attempts"][1:], strict=False)
    )
