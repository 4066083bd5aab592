"""End to end on submitit's local executor: the real worker, two CPU ranks, one shared run."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import moe_orch

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
