"""The wheel ships the templates, the configs and the sample data, and its CLI finds them."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
         str(REPO)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (path,) = out.glob("moe_orch-*.whl")
    return path


def test_wheel_contains_templates_configs_and_sample_data(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for template in ("sbatch.sh", "hostfile", "ds_config.json", "accelerate_config.yaml"):
        assert f"orchestrator/_data/templates/{template}" in names
    for config in sorted((REPO / "configs").glob("*.yaml")):
        assert f"orchestrator/_data/configs/{config.name}" in names
    assert "orchestrator/_data/configs/data/qa_sample.jsonl" in names
    assert "orchestrator/cli/__init__.py" in names and "worker/__main__.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "moe-orch = orchestrator.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_cli_from_the_unpacked_wheel_validates_and_renders_a_shipped_config(
    wheel: Path, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = "import orchestrator.render.files as r; print(r.__file__); print(r.templates_dir())"
    where = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    module, templates = where.stdout.split()
    assert module.startswith(str(site)) and templates == str(site / "orchestrator" / "_data" / "templates")

    cli = [sys.executable, "-m", "orchestrator.cli"]
    result = subprocess.run(
        [*cli, "validate", "tiny-slurm"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    result = subprocess.run(
        [*cli, "render", "tiny-slurm", "--out", str(tmp_path / "r")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    run_yaml = (tmp_path / "r" / "run.yaml").read_text()
    assert str(site / "orchestrator" / "_data" / "configs" / "data" / "qa_sample.jsonl") in run_yaml
