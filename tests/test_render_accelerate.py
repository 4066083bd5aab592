"""`accelerate launch --config_file <rendered accelerate_config.yaml> -m worker ...` trains the same job."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.render.files import render_to_dir
from orchestrator.spec.loading import load_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert next(e for e in events if e["event"] == "start")["world_size"] == cfg.world_size == 2
    assert events[-1]["event"] == "exit" and events[-1]["reason"] == "completed"
