"""Sweeps as one SLURM job array, and notifications, on the localhost SLURM cluster (issue 13).

A 2x2 grid of `configs/tiny-slurm.yaml` (2 fake nodes x 1 rank each) with `--max-parallel 2`: one
array job whose tasks `<id>_0..<id>_3` sacct lists; element 0 is preempted with USR2 mid-run and
resumes bitwise equal to an uninterrupted run of its config; the others run once; `status SWEEP`
marks the element with the lowest eval loss. A local HTTP server receives the webhook
notifications of the preempted element, in order. A sweep with one invalid element submits nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import WebhookServer as Hook
from helpers import (
    checkpoint_tensors,
    events,
    job_field,
    moe_orch,
    rank_pid,
    submit,
    train_losses,
    wait_final,
    wait_for,
    wait_step,
)

pytestmark = pytest.mark.slow  # the localhost SLURM: skipped when it is down (tests/conftest.py)

STEPS = 120
RUN = (
    f"training.max_steps={STEPS}", "training.save_steps=40", "training.eval_steps=40",
    "training.logging_steps=1", "cluster.time_min=60",
)  # fmt: skip
GRID = ("--grid", "training.learning_rate=1.0e-3,3.0e-3", "--grid", "moe.top_k=1,2")


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.shutdown()


def _array_rows(array_id: str) -> list[str]:
    res = subprocess.run(
        ["sacct", "-X", "-P", "-n", "-j", array_id, "--format=JobID,State"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    return [ln for ln in res.stdout.splitlines() if ln.strip()]


def _sweep_json(home: Path, sweep_id: str) -> dict[str, Any]:
    res = moe_orch("status", sweep_id, "--json", home=home)
    assert res.returncode == 0, res.stdout + res.stderr
    data: dict[str, Any] = json.loads(res.stdout)
    return data


def test_a_2x2_sweep_is_one_array_one_element_preempted_resumes_bitwise_and_status_marks_the_best(
    tmp_path: Path, hook: Hook
) -> None:
    sets = [arg for s in (*RUN, f"notify.webhook={hook.url}") for arg in ("--set", s)]
    res = moe_orch("sweep", "configs/tiny-slurm.yaml", *GRID, "--max-parallel", "2", *sets, home=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    sweep_id = res.stdout.splitlines()[0].strip()
    sweep_dir = tmp_path / sweep_id
    record = json.loads((sweep_dir / "sweep.json").read_text())
    array = record["array_job_id"]
    elements = [sweep_dir / e["run_id"] for e in record["elements"]]
    assert [e["values"] for e in record["elements"]] == [
        {"training.learning_rate": lr, "moe.top_k": k} for lr in (1.0e-3, 3.0e-3) for k in (1, 2)
    ]
    assert "#SBATCH --array=0-3%2" in (sweep_dir / "array.sh").read_text()
    # The reference: element 0's config as a plain run, never interrupted.
    ref_id, ref_dir = submit(
        tmp_path, *RUN, "training.learning_rate=1.0e-3", "moe.top_k=1", "notify.webhook=null"
    )

    # Element 0 (task <array>_0) is preempted past its step-40 checkpoint.
    wait_step(elements[0], 55, timeout=180)
    # NOTE: USR2 to the task's ranks, as SLURM delivers it: `scancel --signal=USR2` on an array task
    # (either spelling of its id) delivers it but is answered "Job can not be altered now, try
    # again later" (SLURM 22.05), and scancel retries until it signals the requeued task again.
    raw = job_field(f"{array}_0", "JobId")
    assert raw and raw.isdigit(), raw
    for rank in (0, 1):

        def pid_of(rank: int = rank) -> int | None:
            return rank_pid(raw, rank)

        os.kill(wait_for(f"rank {rank} of task {array}_0", pid_of, 30), signal.SIGUSR2)
    wait_for("element 0 to stop", lambda: events(elements[0], "exit"), 60)

    def all_ended() -> dict[str, Any] | None:
        data = _sweep_json(tmp_path, sweep_id)
        return (
            data
            if all(e["state"] in ("completed", "failed", "cancelled") for e in data["elements"])
            else None
        )

    status = wait_for("every element to end", all_ended, 420, 3)
    reference = wait_final(ref_id, tmp_path, timeout=240)
    assert [e["state"] for e in status["elements"]] == ["completed"] * 4, status
    assert reference["state"] == "completed"

    # One array job: sacct lists its four tasks.
    ids = {row.split("|")[0] for row in _array_rows(array)}
    assert {f"{array}_{k}" for k in range(4)} <= ids, ids

    # Element 0: two attempts of task <array>_0 (preempted and requeued, then completed), bitwise
    # equal to the reference; the others: one attempt each, never signalled.
    runs0 = json.loads((elements[0] / "run.json").read_text())
    first, second = runs0["attempts"]
    assert first["job_id"] == second["job_id"] == f"{array}_0"
    assert (first["attempt_key"], second["attempt_key"]) == (f"{array}_0.0", f"{array}_0.1")
    assert first["stop_reason"] == "preempted" and first["requeued"], first
    assert second["resumed_from"] == f"step-{first['last_step']:06d}" and second["steps_redone"] == 0
    assert train_losses(elements[0]) == train_losses(ref_dir)
    final = f"step-{STEPS:06d}"
    mine, theirs = (
        checkpoint_tensors(elements[0] / "checkpoints" / final),
        checkpoint_tensors(ref_dir / "checkpoints" / final),
    )
    assert mine.keys() == theirs.keys() and all(mine[k].equal(theirs[k]) for k in mine)
    for k in (1, 2, 3):
        rec = json.loads((elements[k] / "run.json").read_text())
        assert [a["job_id"] for a in rec["attempts"]] == [f"{array}_{k}"], rec["attempts"]
        assert not events(elements[k], "signal")
        assert [s for s, _ in train_losses(elements[k])] == list(range(1, STEPS + 1))

    # status SWEEP: one row per element with its grid values; the best is the lowest eval loss.
    evals = [e["eval_loss"] for e in status["elements"]]
    best = min(range(4), key=lambda k: evals[k])
    assert status["best"] == best and [e["best"] for e in status["elements"]] == [k == best for k in range(4)]
    shown = moe_orch("status", sweep_id, home=tmp_path)
    assert shown.returncode == 0, shown.stderr
    print(shown.stdout)
    row = next(ln for ln in shown.stdout.splitlines() if ln.lstrip().startswith(f"{best} "))
    assert row.rstrip().endswith("*") and "completed" in row, shown.stdout
    assert f"best (lowest eval loss): element {best}" in shown.stdout
    logs = moe_orch("logs", sweep_id, "--element", "3", "--rank", "0", home=tmp_path)
    assert logs.returncode == 0 and f"step {STEPS}/{STEPS}" in logs.stdout, logs.stdout[-1000:]

    # The webhook got element 0's notifications from the job itself, in order.
    mine_hooks = [b for b in hook.bodies if b["run_id"] == elements[0].name]
    assert [b["kind"] for b in mine_hooks] == ["attempt_start", "preempted", "attempt_start", "completed"]
    assert [b["attempt_key"] for b in mine_hooks[:3:2]] == [f"{array}_0.0", f"{array}_0.1"]
    assert all(
        b["text"].startswith(f"moe-orch {elements[0].name}: ") and b["source"] == "job" for b in mine_hooks
    )
    assert not [b for b in hook.bodies if b["run_id"] == ref_id], "the reference has no webhook"


def test_a_sweep_with_one_invalid_element_submits_nothing_and_exits_2(tmp_path: Path) -> None:
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=False).stdout
    res = moe_orch(
        "sweep", "configs/tiny-slurm.yaml", "--grid", "training.learning_rate=1.0e-3,-1",
        "--grid", "moe.top_k=1,2", home=tmp_path,
    )  # fmt: skip
    assert res.returncode == 2, res.stdout + res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert errors and all(ln.startswith("error: sweep element ") for ln in errors), res.stderr
    assert "sweep element 2 (training.learning_rate=-1, moe.top_k=1): training.learning_rate" in res.stderr
    assert "Traceback" not in res.stderr
    assert not tmp_path.exists() or not any(tmp_path.iterdir()), "nothing created"
    after = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=False).stdout
    assert after == before, "nothing submitted"
