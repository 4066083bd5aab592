"""End to end on submitit's local executor: the real worker, two CPU ranks, one shared run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import REPO, moe_orch, status_json

from orchestrator.backends.local import controller_alive

pytestmark = pytest.mark.slow
Run = tuple[Path, str, subprocess.CompletedProcess[str]]  # home, run id, the `submit --wait` result


@pytest.fixture(scope="module")
def completed_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Run]:
    home = tmp_path_factory.mktemp("local-home")
    res = moe_orch(
        "submit", "configs/tiny-cpu.yaml", "--set", "training.max_steps=6",
        "--set", "training.logging_steps=2", "--set", "training.eval_steps=3", "--wait", home=home,
    )  # fmt: skip
    run_id = res.stdout.splitlines()[0] if res.stdout else ""
    yield home, run_id, res


def test_submit_wait_completes_on_the_local_executor(
    completed_run: Run,
) -> None:
    home, run_id, res = completed_run
    assert res.returncode == 0, res.stdout + res.stderr
    assert run_id.startswith("tiny-cpu-")
    assert "completed" in res.stdout
    status = moe_orch("status", run_id, "--json", home=home)
    record = json.loads(status.stdout)
    assert record["state"] == "completed"
    (attempt,) = record["attempts"]
    assert attempt["stop_reason"] == "completed" and attempt["last_step"] == 6
    assert attempt["job_id"] and attempt["attempt_key"] == f"{attempt['job_id']}.0"
    assert record["latest_checkpoint"]["step"] == 6


def test_status_table_and_logs_of_both_ranks(
    completed_run: Run,
) -> None:
    home, run_id, _ = completed_run
    table = moe_orch("status", home=home)
    assert run_id in table.stdout and "completed" in table.stdout and "6/6" in table.stdout
    logs = moe_orch("logs", run_id, home=home)
    assert logs.returncode == 0
    assert any(line.startswith("[rank 0] ") for line in logs.stdout.splitlines())
    assert any(line.startswith("[rank 1] ") for line in logs.stdout.splitlines())
    one = moe_orch("logs", run_id, "--rank", "1", "--tail", "2", home=home)
    assert len(one.stdout.splitlines()) == 2 and all(
        ln.startswith("[rank 1] ") for ln in one.stdout.splitlines()
    )


def test_plot_writes_a_png(completed_run: Run, tmp_path: Path) -> None:
    home, run_id, _ = completed_run
    out = tmp_path / "plot.png"
    res = moe_orch("plot", run_id, "--out", str(out), home=home)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cancel_stops_a_local_run_submitted_from_a_process_that_ignores_sigint(tmp_path: Path) -> None:
    # `nohup moe-orch submit ... &` or a script's background job ignores SIGINT, and children keep an
    # ignored signal: cancel's SIGINT must still reach the local controller (backends/local.py).
    env = dict(os.environ, MOE_ORCH_HOME=str(tmp_path), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    out = tmp_path / "submit.out"
    with out.open("w") as fh:  # a file, not a pipe: the controller it starts keeps its stdout
        code = subprocess.call(
            [sys.executable, "-m", "orchestrator.cli", "submit", "configs/tiny-cpu.yaml",
             "--set", "training.max_steps=100000"],
            cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=120,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )  # fmt: skip
    assert code == 0, out.read_text()
    run_id = out.read_text().splitlines()[0].strip()
    job = status_json(run_id, tmp_path)["attempts"][0]["job_id"]
    assert controller_alive(job)
    cancelled = moe_orch("cancel", run_id, home=tmp_path)
    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
    deadline = time.time() + 60
    while controller_alive(job) and time.time() < deadline:
        time.sleep(0.2)
    assert not controller_alive(job), "the controller ignored cancel's SIGINT"
    record = status_json(run_id, tmp_path)
    assert record["state"] == "cancelled"
    assert record["attempts"][0]["stop_reason"] == "cancelled"
