"""`accelerate launch --config_file <rendered accelerate_config.yaml> -m worker ...` trains the same job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port

from orchestrator.render.files import render_to_dir
from orchestrator.rundir.reports import read_events
from orchestrator.spec.loading import load_config


@pytest.mark.slow
def test_accelerate_launch_with_the_rendered_config_runs_both_ranks(tmp_path: Path) -> None:
    cfg = load_config(
        "tiny-cpu",
        [
            "training.max_steps=2",
            "training.save_steps=2",
            "training.eval_steps=null",
            f"cluster.master_port={free_port()}",
        ],
    )
    paths = render_to_dir(cfg, tmp_path / "run", python=sys.executable)
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [str(accelerate), "launch", "--config_file", str(paths["accelerate_config.yaml"]),
         "-m", "worker", "--config", str(paths["run.yaml"]), "--run-dir", str(tmp_path / "run")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    events = read_events(tmp_path / "run")
    assert next(e for e in events if e["event"] == "start")["world_size"] == cfg.world_size == 2
    assert events[-1]["event"] == "exit" and events[-1]["reason"] == "completed"
