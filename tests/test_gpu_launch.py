"""How a GPU job starts, without a GPU: the NCCL settings and collective timeout sbatch.sh exports
(orchestrator/spec/launch.py), how it asks SLURM for GPUs (`cluster.gpu_request`), one rank per GPU
(`srun --gpu-bind=none`, local rank r -> cuda:r), and the bf16-on-CPU test switch."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orchestrator.backends.slurm.backend import SlurmBackend
from orchestrator.errors import ConfigError
from orchestrator.lifecycle.submit import job_env
from orchestrator.lifecycle.validate import collect_warnings
from orchestrator.render.files import render, sbatch_options
from orchestrator.spec.launch import (
    COLLECTIVE_TIMEOUT_ENV,
    DEFAULT_COLLECTIVE_TIMEOUT_S,
    collective_timeout_from_env,
    collective_timeout_s,
    job_env_defaults,
)
from orchestrator.spec.loading import load_config
from worker.dist import PROCESS_GROUP_BACKEND_GPU, gpu_device_index

RUN_DIR = Path("/runs/RUN-ID")
GPU_SMALL = ["cluster.nodes=2", "cluster.tasks_per_node=2", "cluster.gpus_per_node=2", "moe.ep_size=4",
             "cluster.gpu_mem_gb=null"]  # fmt: skip


def exports(sbatch: str) -> dict[str, str]:
    """The `export KEY=value` lines of a rendered sbatch.sh (values as written, unquoted when plain)."""
    return dict(re.findall(r"^export ([A-Z_]+)=(?!\")(\S+)$", sbatch, flags=re.M))


def test_a_gpu_job_exports_nccl_error_handling_and_the_collective_timeout() -> None:
    cfg = load_config("mpt7b-moe-4x8")
    sbatch = render(cfg, run_dir=RUN_DIR, python="python")["sbatch.sh"]
    env = exports(sbatch)
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert env["NCCL_DEBUG"] == "WARN"
    assert env[COLLECTIVE_TIMEOUT_ENV] == str(DEFAULT_COLLECTIVE_TIMEOUT_S)  # stall_timeout_s unset
    assert env["OMP_NUM_THREADS"] == "8"  # cpus_per_task: 8 ranks per node share the cores
    assert "DS_ACCELERATOR" not in env
    srun = next(ln for ln in sbatch.splitlines() if ln.startswith("srun "))
    assert "--gpu-bind=none" in srun and "--ntasks-per-node=8" in srun


def test_a_cpu_job_has_no_gpu_settings() -> None:
    sbatch = render(load_config("tiny-slurm"), run_dir=RUN_DIR, python="python")["sbatch.sh"]
    env = exports(sbatch)
    assert env["DS_ACCELERATOR"] == "cpu"
    assert not {k for k in env if "NCCL" in k or k == COLLECTIVE_TIMEOUT_ENV}
    assert "--gpu-bind" not in sbatch and "gres" not in sbatch and "gpus" not in sbatch


@pytest.mark.parametrize(("stall", "timeout"), [(None, 3600), (900.0, 1800), (30.0, 60), (0.2, 1)])
def test_the_collective_timeout_is_twice_the_stall_timeout(stall: float | None, timeout: int) -> None:
    sets = [] if stall is None else [f"cluster.stall_timeout_s={stall}"]
    cfg = load_config("mpt7b-moe-4x8", sets)
    assert collective_timeout_s(cfg) == timeout
    assert job_env_defaults(cfg)[COLLECTIVE_TIMEOUT_ENV] == str(timeout)
    # The worker reads the exported value (or derives the same one when launched by hand).
    assert collective_timeout_from_env({}, cfg) == timeout
    assert collective_timeout_from_env({COLLECTIVE_TIMEOUT_ENV: "120"}, cfg) == 120


@pytest.mark.parametrize("value", ["soon", "0", "-5"])
def test_a_bad_collective_timeout_names_the_variable(value: str) -> None:
    cfg = load_config("mpt7b-moe-4x8")
    with pytest.raises(ConfigError, match=rf"cluster\.env\.{COLLECTIVE_TIMEOUT_ENV}.*positive number"):
        collective_timeout_from_env({COLLECTIVE_TIMEOUT_ENV: value}, cfg)


def test_site_settings_in_cluster_env_reach_the_job_and_replace_a_default() -> None:
    sets = ["cluster.env={NCCL_SOCKET_IFNAME: ib0, NCCL_IB_HCA: mlx5, NCCL_DEBUG: INFO}"]
    cfg = load_config("mpt7b-moe-4x8", sets)
    sbatch = render(cfg, run_dir=RUN_DIR, python="python")["sbatch.sh"]
    env = exports(sbatch)
    assert (env["NCCL_SOCKET_IFNAME"], env["NCCL_IB_HCA"], env["NCCL_DEBUG"]) == ("ib0", "mlx5", "INFO")
    assert sbatch.count("export NCCL_DEBUG=") == 1
    # `submit` hands the job function the same environment as sbatch.sh exports.
    assert job_env(cfg) == env


@pytest.mark.parametrize(
    ("request_", "key", "value"), [("gpus_per_node", "gpus-per-node", "2"), ("gres", "gres", "gpu:2")]
)
def test_gpus_are_requested_the_way_the_cluster_expects(request_: str, key: str, value: str) -> None:
    cfg = load_config("mpt7b-moe-4x8", [*GPU_SMALL, f"cluster.gpu_request={request_}"])
    options = sbatch_options(cfg, RUN_DIR)
    gpu_keys = [k for k, _ in options if k in ("gres", "gpus-per-node")]
    assert gpu_keys == [key] and dict(options)[key] == value
    sbatch = render(cfg, run_dir=RUN_DIR, python="python")["sbatch.sh"]
    assert f"#SBATCH --{key}={value}\n" in sbatch
    # submit (submitit) starts the ranks with the same srun options as sbatch.sh.
    params = SlurmBackend().submitit_parameters(cfg, options)
    assert params["srun_args"] == ["--gpu-bind=none"]


@pytest.mark.parametrize(("extra", "field"), [("gres", "gpu_request"), ("gpus-per-task", "gpus_per_node")])
def test_sbatch_extra_cannot_change_how_gpus_are_requested(extra: str, field: str) -> None:
    cfg = load_config("mpt7b-moe-2x8-a100", [f"cluster.sbatch_extra={{{extra}: 'gpu:1'}}"])
    with pytest.raises(ConfigError, match=rf"cluster\.sbatch_extra\.{extra}.*cluster\.{field}"):
        sbatch_options(cfg, RUN_DIR)


def test_a_cpu_job_may_ask_for_other_generic_resources() -> None:
    cfg = load_config("tiny-slurm", ["cluster.sbatch_extra={gres: 'nvme:1'}"])
    assert dict(sbatch_options(cfg, RUN_DIR))["gres"] == "nvme:1"


@pytest.mark.parametrize(
    ("local_rank", "visible", "device"),
    [
        (0, 8, 0), (5, 8, 5),  # sbatch.sh: every task sees its node's GPUs, local rank r -> cuda:r
        (5, 1, 0),  # a site that binds one GPU per task (CUDA_VISIBLE_DEVICES of one device)
        (0, 1, 0),
    ],
)  # fmt: skip
def test_each_rank_binds_the_gpu_of_its_local_rank(local_rank: int, visible: int, device: int) -> None:
    assert gpu_device_index(local_rank, visible) == device


def test_a_rank_without_a_gpu_of_its_own_says_so() -> None:
    with pytest.raises(RuntimeError, match="local rank 3 has no GPU: this process sees 2 GPU"):
        gpu_device_index(3, 2)


def test_gpu_ranks_use_nccl_for_cuda_tensors_and_gloo_for_the_workers_cpu_collectives() -> None:
    assert PROCESS_GROUP_BACKEND_GPU == "cpu:gloo,cuda:nccl"


def test_bf16_without_gpus_needs_the_test_switch_and_validate_says_it_is_slow() -> None:
    with pytest.raises(ConfigError, match=r"bf16 needs GPUs.*bf16_on_cpu: true allows it"):
        load_config("tiny-cpu", ["training.precision=bf16"])
    with pytest.raises(ConfigError, match="fp16 needs GPUs"):
        load_config("tiny-cpu", ["training.precision=fp16", "training.bf16_on_cpu=true"])
    cfg = load_config("tiny-cpu", ["training.precision=bf16", "training.bf16_on_cpu=true"])
    assert cfg.cpu_only and cfg.training.precision == "bf16"
    assert any("2-4x slower" in w for w in collect_warnings(cfg))
    gpu = load_config("mpt7b-moe-4x8")
    assert not any("bf16_on_cpu" in w for w in collect_warnings(gpu))
