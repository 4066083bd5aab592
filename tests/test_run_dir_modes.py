"""Run directories are readable by their owner only (or their group, when shared), and a run home
that others can write to is refused: `orchestrator/rundir/access.py`.

Submissions go to a fake SLURM (tests/fakes.py); nothing real is ever run.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes import FakeSlurm
from helpers import REPO
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.errors import RunHomeError
from orchestrator.lifecycle import submit
from orchestrator.rundir import access, runs
from orchestrator.rundir.access import HOME_MODE_ENV, HomeMode
from orchestrator.spec.loading import load_config

TINY_SLURM = str(REPO / "configs" / "tiny-slurm.yaml")
runner = CliRunner()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def fake() -> Iterator[FakeSlurm]:
    with FakeSlurm().context() as f:
        yield f


@pytest.fixture(autouse=True)
def owner_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts from the default (a developer's shell may share runs with the group)."""
    monkeypatch.delenv(HOME_MODE_ENV, raising=False)


def submit_run(home: Path) -> Path:
    return submit.submit(TINY_SLURM, [], home=str(home), echo=lambda line: None)


# --- new homes and run directories ------------------------------------------------------------------


def test_a_new_home_and_run_directory_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    home = tmp_path / "new" / "runs"
    run_dir, _ = submit.create_run(load_config(TINY_SLURM), home, None)
    assert mode(home) == 0o700 and mode(run_dir) == 0o700
    assert mode(run_dir / "logs") == 0o700
    assert mode(run_dir / "run.yaml") == 0o600 and mode(run_dir / "run.json") == 0o600


def test_with_the_group_setting_they_are_readable_by_the_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(HOME_MODE_ENV, "group")
    home = tmp_path / "runs"
    run_dir, _ = submit.create_run(load_config(TINY_SLURM), home, None)
    assert mode(home) == 0o750 and mode(run_dir) == 0o750
    assert mode(run_dir / "logs") == 0o750 and mode(run_dir / "run.yaml") == 0o640
    assert mode(run_dir / "run.json") == 0o640, "teammates can read its status"


def test_everything_a_submission_writes_is_private_and_nothing_is_writable_by_others(
    fake: FakeSlurm, tmp_path: Path
) -> None:
    before = os.umask(0o022)
    os.umask(before)
    run_dir = submit_run(tmp_path / "home")
    written = [p for p in run_dir.rglob("*") if not p.is_symlink() and p.name != "run.json.lock"]
    assert {p.name for p in written} >= {"sbatch.sh", "100_submitted.pkl", "env.json", "run.yaml"}
    assert [str(p) for p in written if mode(p) & 0o077] == [], "no group or other bits"
    assert mode(run_dir / "rendered" / "sbatch.sh") == 0o700, "executable, by its owner"
    assert os.umask(before) == before, "the submitting process gets its umask back"


@pytest.mark.parametrize(
    ("dir_mode", "umask"),
    [(0o700, 0o077), (0o750, 0o027), (0o755, 0o022), (0o775, 0o022), (0o777, 0o022)],
)
def test_the_job_creates_files_no_more_open_than_its_run_directory(
    tmp_path: Path, dir_mode: int, umask: int
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(dir_mode)
    assert access.run_dir_umask(run_dir) == umask


@pytest.mark.parametrize(("dir_mode", "file_mode"), [(0o700, 0o600), (0o750, 0o640), (0o755, 0o600)])
def test_run_json_is_readable_by_the_group_only_in_a_run_directory_shared_with_it(
    tmp_path: Path, dir_mode: int, file_mode: int
) -> None:
    tmp_path.chmod(dir_mode)
    assert access.private_file_mode(tmp_path) == file_mode


def test_an_existing_home_keeps_its_mode(fake: FakeSlurm, tmp_path: Path) -> None:
    home = tmp_path / "runs"
    home.mkdir()
    home.chmod(0o755)
    run_dir = submit_run(home)
    assert mode(home) == 0o755, "never changed"
    assert mode(run_dir) == 0o700


# --- unsafe homes are refused ------------------------------------------------------------------------


def test_submit_refuses_a_home_that_everyone_can_write_and_writes_nothing(
    fake: FakeSlurm, tmp_path: Path
) -> None:
    home = tmp_path / "shared"
    home.mkdir()
    home.chmod(0o757)
    result = runner.invoke(app, ["submit", TINY_SLURM, "--home", str(home)])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [
        f"error: the run home {home} is writable by every user (mode 0757): anyone could replace a run "
        f"directory and what its job runs; remove their write access: chmod o-w {home}"
    ]
    assert list(home.iterdir()) == [] and fake.calls == []


def test_validate_refuses_it_too(tmp_path: Path) -> None:
    home = tmp_path / "shared"
    home.mkdir()
    home.chmod(0o777)
    result = runner.invoke(app, ["validate", "tiny-slurm", "--home", str(home)])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: the run home {home} is writable by every user")
    assert f"chmod go-w {home}" in result.stderr and "Traceback" not in result.output


def test_validate_checks_the_home_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "shared"
    home.mkdir()
    home.chmod(0o777)
    monkeypatch.setenv("MOE_ORCH_HOME", str(home))
    assert runner.invoke(app, ["validate", "tiny-slurm"]).exit_code == 2


def test_a_dry_run_says_submit_would_refuse(tmp_path: Path) -> None:
    home = tmp_path / "shared"
    home.mkdir()
    home.chmod(0o777)
    result = runner.invoke(app, ["submit", TINY_SLURM, "--dry-run", "--home", str(home)])
    assert result.exit_code == 0, result.output
    assert f"# submit would refuse: the run home {home} is writable by every user" in result.stdout


def test_a_group_writable_home_is_refused_unless_runs_are_shared_with_the_group(
    fake: FakeSlurm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "team"
    home.mkdir()
    home.chmod(0o770)
    refused = r"writable by its group \(mode 0770\).*chmod g-w .*MOE_ORCH_HOME_MODE=group"
    with pytest.raises(RunHomeError, match=refused):
        submit_run(home)
    assert list(home.iterdir()) == []
    monkeypatch.setenv(HOME_MODE_ENV, "group")
    run_dir = submit_run(home)
    assert mode(run_dir) == 0o750 and mode(home) == 0o770


def test_a_home_writable_by_group_and_others_names_both_in_the_fix(tmp_path: Path) -> None:
    home = tmp_path / "a b"
    home.mkdir()
    home.chmod(0o777)
    with pytest.raises(RunHomeError, match=r"chmod go-w '/.*/a b'$"):
        access.check_home(home, HomeMode.OWNER)
    access.check_home(tmp_path / "not there yet", HomeMode.OWNER)


def test_an_unknown_home_mode_is_one_line_and_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HOME_MODE_ENV, "everyone")
    result = runner.invoke(app, ["submit", TINY_SLURM, "--home", str(tmp_path / "h")])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: {HOME_MODE_ENV}='everyone' is not a mode of the run home: use owner (the default: runs "
        "readable by you only) or group (readable by your group too)"
    ]
    assert not (tmp_path / "h").exists()


def test_a_home_that_is_a_file_is_one_line(fake: FakeSlurm, tmp_path: Path) -> None:
    home = tmp_path / "file"
    home.write_text("")
    result = runner.invoke(app, ["submit", TINY_SLURM, "--home", str(home)])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [f"error: the run home {home} is not a folder; give another --home"]
    assert runs.list_runs(home) == []
