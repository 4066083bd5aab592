"""bf16 on CPU (`training.bf16_on_cpu`, for tests): the user's precision through the worker, its
checkpoints, an exact resume and the Hugging Face export, on 2 gloo ranks with the tiny MoE
(4 experts, ep_size 2). The same checks run on GPUs in test_gpu.py (tests/bf16_scenario.py).

Four launches share one module fixture (about a minute on 2 idle cores): the tests are `slow`.
"""

from __future__ import annotations

import bf16_scenario as scenario
import pytest

from orchestrator.spec.loading import load_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> scenario.Runs:
    return scenario.run_all(tmp_path_factory.mktemp("bf16-cpu"), gpus=0)


@pytest.mark.slow
def test_a_tiny_bf16_run_learns(runs: scenario.Runs) -> None:
    scenario.check_learns(runs)


@pytest.mark.slow
def test_bf16_checkpoints_hold_bf16_weights_and_fp32_master_weights(runs: scenario.Runs) -> None:
    scenario.check_checkpoints_hold_bf16_weights_and_fp32_master_weights(runs)


@pytest.mark.slow
def test_a_bf16_run_resumes_bitwise(runs: scenario.Runs) -> None:
    scenario.check_resume_is_bitwise(runs)


@pytest.mark.slow
def test_the_bf16_export_is_bf16_and_matches_the_engines_logits(runs: scenario.Runs) -> None:
    scenario.check_export(runs)


def test_the_deepspeed_config_of_a_bf16_run_on_cpu_enables_bf16() -> None:
    from orchestrator.spec.deepspeed import deepspeed_config

    cfg = load_config(scenario.TINY, scenario.bf16_sets(0))
    assert cfg.cpu_only and cfg.training.precision == "bf16"
    ds = deepspeed_config(cfg)
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
