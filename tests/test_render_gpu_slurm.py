"""On the localhost SLURM cluster (tools/slurm-local/start.sh: 2 nodes with 2 fake GPUs each, as
count-only generic resources under select/cons_tres): `sbatch --test-only` accepts the rendered GPU
job both ways of asking for GPUs (`cluster.gpu_request`), and refuses more GPUs than a node has, so
the acceptance is SLURM reading the request, not ignoring it. Nothing is queued."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from orchestrator.render.files import render_to_dir
from orchestrator.spec.loading import load_config

# The user's MPT-7B job, shrunk to the localhost cluster: 2 nodes x 2 GPUs, one rank per GPU.
SMALL = ["cluster.nodes=2", "cluster.tasks_per_node=2", "cluster.gpus_per_node=2", "cluster.cpus_per_task=1",
         "moe.ep_size=4", "cluster.gpu_mem_gb=null", "cluster.time_min=30"]  # fmt: skip


def sbatch_test_only(tmp_path: Path, sets: list[str]) -> subprocess.CompletedProcess[str]:
    cfg = load_config("mpt7b-moe-4x8", sets)
    paths = render_to_dir(cfg, tmp_path / "run", python="/bin/false")
    return subprocess.run(
        ["sbatch", "--test-only", str(paths["sbatch.sh"])],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("request_", "line"), [("gpus_per_node", "--gpus-per-node=2"), ("gres", "--gres=gpu:2")]
)
def test_sbatch_test_only_accepts_the_rendered_gpu_job(tmp_path: Path, request_: str, line: str) -> None:
    res = sbatch_test_only(tmp_path, [*SMALL, f"cluster.gpu_request={request_}"])
    assert f"#SBATCH {line}\n" in (tmp_path / "run" / "sbatch.sh").read_text()
    assert res.returncode == 0, res.stderr
    assert "to start at" in res.stderr and "on nodes n[1-2]" in res.stderr


@pytest.mark.parametrize("request_", ["gpus_per_node", "gres"])
def test_sbatch_test_only_refuses_more_gpus_than_a_node_has(tmp_path: Path, request_: str) -> None:
    sets = [*SMALL, "cluster.gpus_per_node=3", f"cluster.gpu_request={request_}"]
    res = sbatch_test_only(tmp_path, sets)
    assert res.returncode != 0
    assert "Requested node configuration is not available" in res.stderr
