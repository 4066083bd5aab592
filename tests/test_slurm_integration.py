"""End to end on the localhost SLURM cluster (tools/slurm-local/start.sh): the real worker.

Skipped unless `scontrol ping` answers (source /tmp/slurm-local/env.sh first). One completed run
is shared by the assertions that read it; the crash, cancel, dry-run and invalid-config checks
each submit (or refuse to submit) once.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import events, moe_orch, status_json, wait_for, wait_step

pytestmark = pytest.mark.slow  # the localhost SLURM: skipped when it is down (tests/conftest.py)

Run = tuple[Path, str, subprocess.CompletedProcess[str]]  # home, run id, the `submit --wait` result


def squeue_ids() -> set[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.fixture(scope="module")
def completed_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    home = tmp_path_factory.mktemp("slurm-home")
    res = moe_orch("submit", "configs/tiny-slurm.yaml", "--set", "training.max_steps=8", "--wait", home=home)
    yield home, (res.stdout.splitlines() or [""])[0], res


def test_a_just_completed_attempt_is_finishing_until_the_scheduler_records_its_exit_code(
    completed_run: Run,
) -> None:
    # NOTE: first in this module, so this is the first `status` after `submit --wait` returned: the
    # worker's exit event is in, and the ranks are usually still leaving (sacct lags besides).
    home, run_id, res = completed_run
    assert res.returncode == 0, res.stdout + res.stderr
    (attempt,) = status_json(run_id, home)["attempts"]
    assert attempt["state"] == "ended"
    shown = (attempt["slurm_state"], attempt["exit_code"])
    assert shown in (("finishing", None), ("COMPLETED", None), ("COMPLETED", "0:0")), shown

    def final_record() -> tuple[str, str] | None:
        (att,) = status_json(run_id, home)["attempts"]
        return (att["slurm_state"], att["exit_code"]) if att["exit_code"] is not None else None

    assert wait_for("the scheduler's final record", final_record, 60, 1) == ("COMPLETED", "0:0")


def test_two_node_expert_parallel_run_completes(completed_run: Run) -> None:
    home, run_id, res = completed_run
    assert res.returncode == 0, res.stdout + res.stderr
    record = status_json(run_id, home)
    assert record["state"] == "completed"
    (attempt,) = record["attempts"]
    assert attempt["stop_reason"] == "completed" and attempt["last_step"] == 8
    assert sorted(attempt["nodes"]) == ["n1", "n2"], "one rank per node"
    run_yaml = (Path(record["run_dir"]) / "run.yaml").read_text()
    assert "ep_size: 2" in run_yaml, "experts split over the two nodes"
    assert attempt["job_id"] and attempt["attempt_key"] == f"{attempt['job_id']}.0"


def test_sbatch_options_submitted_are_the_rendered_ones(completed_run: Run) -> None:
    home, run_id, _ = completed_run
    record = status_json(run_id, home)
    run_dir = Path(record["run_dir"])
    job = record["attempts"][0]["job_id"]
    submitted = (run_dir / "logs" / f"{job}_submission.sh").read_text()
    rendered = (run_dir / "rendered" / "sbatch.sh").read_text()
    assert [ln for ln in submitted.splitlines() if ln.startswith("#SBATCH")] == [
        ln for ln in rendered.splitlines() if ln.startswith("#SBATCH")
    ]


def test_logs_show_both_ranks(completed_run: Run) -> None:
    home, run_id, _ = completed_run
    res = moe_orch("logs", run_id, home=home)
    lines = res.stdout.splitlines()
    assert any(ln.startswith("[rank 0] ") for ln in lines) and any(ln.startswith("[rank 1] ") for ln in lines)


def test_a_crashing_job_ends_failed_with_its_traceback(tmp_path: Path) -> None:
    res = moe_orch(
        "submit", "configs/tiny-slurm.yaml", "--set", "cluster.env.MOE_ORCH_FAULT=crash_at_start",
        "--set", "cluster.max_failures=0", "--wait", home=tmp_path,
    )  # fmt: skip
    assert res.returncode == 1, res.stdout + res.stderr
    run_id = res.stdout.splitlines()[0]
    record = status_json(run_id, tmp_path)
    assert record["state"] == "failed"
    assert record["attempts"][0]["stop_reason"] == "failed"
    err = moe_orch("logs", run_id, "--stderr", home=tmp_path).stdout
    assert "Traceback" in err and "InjectedFault" in err


@pytest.mark.parametrize("how", ["moe-orch cancel", "scancel"])
def test_cancelling_a_training_job_ends_the_run_cancelled_and_never_requeues_it(
    tmp_path: Path, how: str
) -> None:
    res = moe_orch("submit", "configs/tiny-slurm.yaml", "--set", "training.max_steps=100000", home=tmp_path)
    assert res.returncode == 0, res.stderr
    run_id = res.stdout.splitlines()[0]
    job = status_json(run_id, tmp_path)["attempts"][0]["job_id"]
    # Training, so the worker's SIGTERM handler is installed: it saves, and must not requeue.
    wait_step(tmp_path / run_id, 1)
    if how == "scancel":
        subprocess.run(["scancel", job], check=True)
    else:
        assert moe_orch("cancel", run_id, home=tmp_path).returncode == 0
    deadline = time.time() + 60
    while time.time() < deadline and job in squeue_ids():
        time.sleep(1)
    time.sleep(3)  # a wrongly requeued job would be back in the queue by now
    assert job not in squeue_ids(), "the cancelled job left the queue and did not come back"
    record = status_json(run_id, tmp_path)
    assert record["state"] == "cancelled", record
    assert record["cancel_requested"] == (how == "moe-orch cancel")
    assert len(record["attempts"]) == 1 and not record["attempts"][0]["requeued"]
    exits = [e for e in events(tmp_path / run_id, "exit")]
    assert exits and exits[-1]["reason"] == "cancelled" and exits[-1]["requeued"] is False


def test_dry_run_and_invalid_config_submit_nothing(tmp_path: Path) -> None:
    before = squeue_ids()
    dry = moe_orch("submit", "configs/tiny-slurm.yaml", "--dry-run", home=tmp_path)
    assert dry.returncode == 0 and "#SBATCH --nodes=2" in dry.stdout
    bad = moe_orch("submit", "configs/tiny-slurm.yaml", "--set", "moe.ep_size=3", home=tmp_path)
    assert bad.returncode == 2 and "ep_size" in bad.stderr
    assert squeue_ids() == before
    assert not any(tmp_path.iterdir())
