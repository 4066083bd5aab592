"""On the localhost SLURM cluster (tools/slurm-local/start.sh): SLURM reads the rendered #SBATCH lines
as intended, and the rendered sbatch.sh, submitted by hand, trains the tiny MoE over 2 nodes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.render.files import render_to_dir
from orchestrator.rundir.reports import read_events
from orchestrator.spec.loading import load_config


def job_fields(job_id: str) -> dict[str, str]:
    text = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True
    ).stdout
    fields: dict[str, str] = {}
    key = ""
    # `scontrol -o` prints Key=Value pairs separated by spaces; values may hold spaces themselves.
    for token in text.strip().split(" "):
        if re.match(r"^[A-Za-z][\w:/]*=", token):
            key, value = token.split("=", 1)
            fields[key] = value
        elif key and token:
            fields[key] += " " + token
    return fields


def test_slurm_reads_escaped_sbatch_values_back_verbatim(tmp_path: Path) -> None:
    comment = 'it\'s "quoted" #not-a-comment $(touch pwned)'
    cfg = load_config("tiny-slurm", [f"cluster.sbatch_extra={{comment: {json.dumps(comment)}}}"])
    run_dir = tmp_path / "run dir's"
    paths = render_to_dir(cfg, run_dir, python="/bin/false")
    submitted = subprocess.run(
        ["sbatch", "--hold", "--parsable", str(paths["sbatch.sh"])],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    )  # fmt: skip
    job_id = submitted.stdout.strip().split(";")[0]
    try:
        fields = job_fields(job_id)
        assert fields["Comment"] == comment
        assert fields["JobName"] == "tiny-slurm"
        assert fields["StdOut"] == f"{run_dir}/logs/{job_id}_sbatch.out"
        assert fields["NumNodes"].split("-")[0] == "2"
        assert fields["Partition"] == "debug"
        assert fields["Requeue"] == "1"
    finally:
        subprocess.run(["scancel", job_id], check=False)
    assert not list(tmp_path.rglob("pwned"))


@pytest.mark.slow
def test_rendered_sbatch_script_submitted_by_hand_trains_on_two_nodes(tmp_path: Path) -> None:
    cfg = load_config(
        "tiny-slurm", ["training.max_steps=4", "training.save_steps=2", "training.eval_steps=null"]
    )
    paths = render_to_dir(cfg, tmp_path / "run", python=sys.executable)
    job_id = subprocess.run(
        ["sbatch", "--parsable", str(paths["sbatch.sh"])],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        state = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True
        ).stdout
        if not state.strip():
            break
        time.sleep(2)
    else:
        subprocess.run(["scancel", job_id], check=False)
        pytest.fail(f"job {job_id} still running after 240 s")
    run = tmp_path / "run"
    events = read_events(run)
    start = next(e for e in events if e["event"] == "start")
    assert start["world_size"] == 2 and start["nodes"] == ["n1", "n2"]
    assert events[-1]["event"] == "exit" and events[-1]["reason"] == "completed", events[-1]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000004"
    for task in (0, 1):  # per-task logs under the names submitit uses
        assert (run / "logs" / f"{job_id}_{task}_log.out").exists()
