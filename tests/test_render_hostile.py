"""Hostile strings never run as shell: every value that reaches sbatch.sh is quoted.

Like submitit's `weird_dir` fixture: run dirs, paths, env values and SLURM values hold quotes, `$(...)`,
backticks, `;`, `#` and newlines. The rendered script is executed with `srun` and `scontrol` stubbed:
nothing may be created, and the stub must receive every value exactly as configured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.errors import ConfigError
from orchestrator.render.files import render, render_to_dir, sbatch_options
from orchestrator.spec.loading import validate_data

PAYLOADS = [
    "a'; touch pwned; '",
    "$(touch pwned)",
    "`touch pwned`",
    'x"; touch pwned; "',
    "line1\ntouch pwned",
    "semi; touch pwned",
    "#not a comment",
    "\\'$HOME${IFS}*",
]

DUMP = (
    "import json, os, sys; "
    'json.dump({"argv": sys.argv[1:], "env": dict(os.environ)}, open(os.environ["STUB_OUT"], "w"))'
)
STUB = (
    f"srun() {{ \"$STUB_PYTHON\" -c '{DUMP}' \"$@\"; }}\n"
    + r"""
scontrol() { printf 'n1\nn2\n'; }
export -f srun scontrol
"""
)


def hostile_config(tmp_path: Path, **cluster: Any) -> Any:
    data = {
        "name": "hostile",
        "cluster": {
            "executor": "slurm",
            "nodes": 2,
            "partition": "debug$(touch pwned)",
            "account": "acct'; touch pwned; '",
            "qos": "`touch pwned`",
            "constraint": "a100#comment",
            "exclude": ["n3"],
            "sbatch_extra": {"comment": "it's \"quoted\" $(touch pwned)"},
            "env": {f"HOSTILE_{i}": value for i, value in enumerate(PAYLOADS)},
            **cluster,
        },
        "model": {"name_or_path": "tiny"},
        "moe": {"num_experts": 2, "ep_size": 2},
        "data": {"train_file": str(tmp_path / "data $(touch pwned).jsonl"), "max_seq_length": 64,
                 "max_target_length": 16},
        "training": {"precision": "fp32"},
    }  # fmt: skip
    return validate_data(data)


@pytest.mark.parametrize("run_name", ["a'; touch pwned; '", "$(touch pwned)", "with space `touch pwned`"])
def test_rendered_script_runs_nothing_it_was_not_meant_to(tmp_path: Path, run_name: str) -> None:
    cfg = hostile_config(tmp_path)
    run_dir = tmp_path / run_name
    python = str(tmp_path / "py $(touch pwned)" / "python")
    paths = render_to_dir(cfg, run_dir, python=python, nodelist="n[1-2]")
    script = paths["sbatch.sh"]
    subprocess.run(["bash", "-n", str(script)], check=True)

    out = tmp_path / "stub.json"
    env = {
        "PATH": os.environ["PATH"],
        "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_JOB_ID": "4242",
        "STUB_PYTHON": sys.executable,
        "STUB_OUT": str(out),
    }
    result = subprocess.run(
        ["bash", "-c", STUB + 'exec bash "$1"', "stub", str(script)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not list(tmp_path.rglob("pwned")), "a hostile value ran as shell"

    called = json.loads(out.read_text())
    logs = run_dir / "logs"
    assert called["argv"] == [
        "--ntasks-per-node=1", "--cpus-per-task=1", "--kill-on-bad-exit=0",
        f"--output={logs}/%j_%t_log.out", f"--error={logs}/%j_%t_log.err",
        python, "-u", "-m", "worker", "--config", str(run_dir / "run.yaml"), "--run-dir", str(run_dir),
    ]  # fmt: skip
    for i, value in enumerate(PAYLOADS):
        assert called["env"][f"HOSTILE_{i}"] == value
    assert called["env"]["MASTER_ADDR"] == "n1"
    assert called["env"]["MASTER_PORT"] == str(20000 + 4242 % 20000)
    assert called["env"]["DS_ACCELERATOR"] == "cpu"


def test_sbatch_lines_keep_hostile_values_inside_one_comment_line(tmp_path: Path) -> None:
    cfg = hostile_config(tmp_path)
    text = render(cfg, run_dir=tmp_path / "a b", python="python")["sbatch.sh"]
    header = text.split("\nset -euo pipefail")[0].splitlines()
    # Every line before `set -euo pipefail` is a comment: nothing there can run.
    assert all(line.startswith("#") for line in header)
    assert '#SBATCH --partition="debug$(touch pwned)"' in header
    assert '#SBATCH --constraint="a100#comment"' in header  # an unquoted # would cut the value
    assert f'#SBATCH --output="{tmp_path}/a b/logs/%j_sbatch.out"' in header


def test_a_run_dir_with_a_newline_is_refused_not_rendered(tmp_path: Path) -> None:
    cfg = hostile_config(tmp_path)
    with pytest.raises(ConfigError, match="newline") as info:
        render(cfg, run_dir=tmp_path / "a\ntouch pwned", python="python")
    assert info.value.issues[0].path == "run directory"


@pytest.mark.parametrize("field", ["partition", "account", "qos", "constraint"])
def test_a_newline_in_a_slurm_value_is_refused_naming_the_field(tmp_path: Path, field: str) -> None:
    cfg = hostile_config(tmp_path, **{field: "ok\ntouch pwned"})
    with pytest.raises(ConfigError) as info:
        sbatch_options(cfg, tmp_path)
    assert info.value.issues[0].path == f"cluster.{field}"


def test_run_yaml_keeps_hostile_values_as_data(tmp_path: Path) -> None:
    from orchestrator.spec.loading import load_resolved

    cfg = hostile_config(tmp_path)
    paths = render_to_dir(cfg, tmp_path / "run", python="python")
    assert load_resolved(paths["run.yaml"]).cluster.env == cfg.cluster.env
