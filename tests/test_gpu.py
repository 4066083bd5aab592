"""On CUDA GPUs (`python -m pytest -m gpu`; skipped where torch sees none): the user's path in
small, bf16 over NCCL with one rank per GPU (2 ranks and ep_size 2 on a machine with 2 GPUs or more,
else 1), through its checkpoints, an exact resume and the Hugging Face export. The checks are those
of test_bf16_cpu.py (tests/bf16_scenario.py). bench/gpu.sh runs them on the GPU machine.

NOTE: the bitwise resume relies on the GPU kernels of this tiny MoE being run-to-run deterministic
(cuBLAS on one stream is; no atomics-based reduction runs here); a failure there names the tensors.
"""

from __future__ import annotations

import bf16_scenario as scenario
import pytest


def gpus() -> int:
    import torch

    return min(2, torch.cuda.device_count())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> scenario.Runs:
    return scenario.run_all(tmp_path_factory.mktemp("bf16-gpu"), gpus=gpus())


def test_bf16_on_gpus_learns_with_one_rank_per_gpu(runs: scenario.Runs) -> None:
    start = scenario.start_events(runs.uninterrupted)[0]
    assert start["world_size"] == runs.gpus
    scenario.check_learns(runs)


def test_bf16_checkpoints_on_gpus_hold_bf16_weights_and_fp32_master_weights(runs: scenario.Runs) -> None:
    scenario.check_checkpoints_hold_bf16_weights_and_fp32_master_weights(runs)


def test_a_bf16_run_on_gpus_resumes_bitwise(runs: scenario.Runs) -> None:
    scenario.check_resume_is_bitwise(runs)


def test_the_bf16_export_of_a_gpu_run_is_bf16_and_matches_the_engines_logits(runs: scenario.Runs) -> None:
    scenario.check_export(runs)
