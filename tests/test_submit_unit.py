"""`submit`, `cancel` and the bundle against a fake SLURM (nothing real is ever run)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes import FakeSlurm
from helpers import REPO
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.errors import ConfigError, NothingToCancelError, SubmissionError
from orchestrator.lifecycle import control, submit
from orchestrator.redact import redact_env
from orchestrator.rundir import runs
from orchestrator.rundir.runs import RunState

TINY_SLURM = str(REPO / "configs" / "tiny-slurm.yaml")


@pytest.fixture
def fake() -> Iterator[FakeSlurm]:
    with FakeSlurm().context() as f:
        yield f


@pytest.fixture
def weird_home(tmp_path: Path) -> Path:
    # submitit's weird_dir habit: quotes, spaces and a shell command in the path.
    return tmp_path / "a'; echo foo" / "runs home"


def _submit(home: Path, *overrides: str) -> Path:
    lines: list[str] = []
    run_dir = submit.submit(TINY_SLURM, list(overrides), home=str(home), echo=lines.append)
    assert lines == [run_dir.name], "submit prints the run id"
    return run_dir


def test_submit_creates_the_run_and_submits_one_job(fake: FakeSlurm, weird_home: Path) -> None:
    run_dir = _submit(weird_home)
    rec = runs.read_run(run_dir)
    assert rec.name == "tiny-slurm" and rec.executor == "slurm"
    assert [a.job_id for a in rec.attempts] == ["100"]
    assert rec.state == RunState.PENDING
    assert fake.count("sbatch") == 1
    assert rec.config_hash == runs.config_hash((run_dir / "run.yaml").read_text())
    for name in ("sbatch.sh", "hostfile", "ds_config.json", "accelerate_config.yaml", "run.yaml"):
        assert (run_dir / "rendered" / name).is_file()


def test_submitted_sbatch_lines_equal_the_rendered_ones(fake: FakeSlurm, weird_home: Path) -> None:
    run_dir = _submit(weird_home, "cluster.exclude=n9", "cluster.mem_gb=1.5", "cluster.account=a b")
    submitted = fake.jobs["100"].script
    rendered = (run_dir / "rendered" / "sbatch.sh").read_text()
    sbatch = [ln for ln in submitted.splitlines() if ln.startswith("#SBATCH")]
    assert sbatch == [ln for ln in rendered.splitlines() if ln.startswith("#SBATCH")]
    assert "#SBATCH --exclude=n9" in sbatch and "#SBATCH --requeue" in sbatch
    assert "submitit.core._submit" in submitted, "submitit's own command runs the job"


def test_submitit_parameters_agree_with_the_rendered_options(tmp_path: Path) -> None:
    from orchestrator.spec.loading import load_config

    cfg = load_config(TINY_SLURM, ["cluster.gpus_per_node=2", "cluster.tasks_per_node=2", "cluster.qos=high"])
    plan = submit.plan_submission(cfg, tmp_path / "r")
    p = plan.parameters
    assert (p["nodes"], p["ntasks_per_node"], p["gpus_per_node"], p["time"]) == (
        2,
        2,
        2,
        cfg.cluster.time_min,
    )
    assert p["qos"] == "high" and p["signal_delay_s"] == cfg.cluster.signal_delay_s
    assert p["additional_parameters"]["requeue"] is True
    assert "DS_ACCELERATOR" not in plan.env, "a GPU run keeps the accelerator auto-detected"
    assert plan.env["HF_HUB_OFFLINE"] == "1"


def test_bundle_has_pip_freeze_resolved_config_and_redacted_env(
    fake: FakeSlurm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("MY_API_KEY", "k")
    run_dir = _submit(tmp_path / "home")
    bundle = run_dir / "attempts" / "1"
    assert (bundle / "pip-freeze.txt").read_text() == fake.pip_freeze
    assert (bundle / "run.yaml").read_text() == (run_dir / "run.yaml").read_text()
    assert (bundle / "rendered" / "sbatch.sh").is_file()
    env = json.loads((bundle / "env.json").read_text())
    assert env["HF_TOKEN"] == "<redacted>" and env["MY_API_KEY"] == "<redacted>"
    assert "hf_secret" not in (bundle / "env.json").read_text()


def test_redact_env_matches_token_key_secret_password() -> None:
    env = redact_env({"GH_TOKEN": "1", "ssh_key": "2", "DB_PASSWORD": "3", "MY_SECRET": "4", "PATH": "/bin"})
    assert env == {k: "<redacted>" for k in ("DB_PASSWORD", "GH_TOKEN", "MY_SECRET", "ssh_key")} | {
        "PATH": "/bin"
    }


def test_invalid_config_submits_nothing_and_creates_nothing(fake: FakeSlurm, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ep_size"):
        submit.submit(TINY_SLURM, ["moe.ep_size=3"], home=str(tmp_path / "home"), echo=print)
    assert not (tmp_path / "home").exists()
    assert fake.calls == []


def test_missing_data_file_submits_nothing(fake: FakeSlurm, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["submit", TINY_SLURM, "--set", "data.train_file=/nope.jsonl", "--home", str(tmp_path / "h")]
    )
    assert result.exit_code == 2
    assert not (tmp_path / "h").exists()
    assert fake.count("sbatch") == 0


def test_failed_sbatch_leaves_a_record_saying_so(fake: FakeSlurm, tmp_path: Path) -> None:
    fake.sbatch_error = "sbatch: error: invalid partition specified: nope"
    with pytest.raises(SubmissionError, match="invalid partition"):
        _submit(tmp_path / "home")
    (run_dir,) = runs.list_runs(tmp_path / "home")
    rec = runs.read_run(run_dir)
    assert rec.state == RunState.FAILED and "invalid partition" in (rec.state_reason or "")
    assert rec.attempts[0].job_id is None, "never a half-submitted job"


def test_failed_sbatch_exits_non_zero_with_the_error(fake: FakeSlurm, tmp_path: Path) -> None:
    fake.sbatch_error = (
        "sbatch: error: Batch job submission failed: Requested node configuration is not available"
    )
    result = CliRunner().invoke(app, ["submit", TINY_SLURM, "--home", str(tmp_path / "h")])
    assert result.exit_code == 3
    assert "Requested node configuration is not available" in result.output


def test_dry_run_creates_and_submits_nothing(fake: FakeSlurm, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["submit", TINY_SLURM, "--dry-run", "--home", str(tmp_path / "h")])
    assert result.exit_code == 0, result.output
    assert "#SBATCH --nodes=2" in result.output and "submitit parameters" in result.output
    assert [c[:2] for c in fake.calls] == [["sbatch", "--test-only"]], "only SLURM's start estimate"
    assert not (tmp_path / "h").exists()


def test_cancel_records_cancelled_before_scancel(fake: FakeSlurm, tmp_path: Path) -> None:
    run_dir = _submit(tmp_path / "home")
    seen: list[str] = []
    fake.on_scancel = lambda jid: seen.append(runs.read_run(run_dir).state)
    rec = control.cancel(run_dir)
    assert seen == [RunState.CANCELLED]
    assert rec.cancel_requested
    assert fake.calls[-1] == ["scancel", "100"]


def test_a_cancelled_run_cannot_be_resumed(fake: FakeSlurm, tmp_path: Path) -> None:
    from orchestrator.lifecycle.watch import resume

    run_dir = _submit(tmp_path / "home")
    control.cancel(run_dir)
    with pytest.raises(SubmissionError, match="never comes back"):
        resume(run_dir)
    assert fake.count("sbatch") == 1


def test_cancel_refuses_a_completed_run(fake: FakeSlurm, tmp_path: Path) -> None:
    run_dir = _submit(tmp_path / "home")
    runs.update_run(run_dir, lambda r: setattr(r, "state", RunState.COMPLETED))
    with pytest.raises(NothingToCancelError, match="already completed"):
        control.cancel(run_dir)
    assert fake.count("scancel") == 0


def test_a_value_slurm_cannot_take_creates_no_run(fake: FakeSlurm, tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        submit.submit(TINY_SLURM, ['cluster.account="a\\tb"'], home=str(tmp_path / "home"), echo=print)
    assert not any((tmp_path / "home").glob("*/run.json"))
    assert fake.calls == []


def test_the_fake_slurm_refuses_commands_it_does_not_know(fake: FakeSlurm) -> None:
    import subprocess

    from fakes import UnknownCommandError

    with pytest.raises(UnknownCommandError, match="scontrol"):
        subprocess.run(["scontrol", "requeue", "1"], check=False)
