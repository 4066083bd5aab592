"""The numbers `validate` reports: parallel sizes, global batch, parameters and ZeRO memory."""

from __future__ import annotations

import pytest

from orchestrator.lifecycle.validate import WARNING_CHECKS, collect_warnings, summary_text, validate
from orchestrator.spec.estimate import bytes_per_param, estimate_memory
from orchestrator.spec.loading import load_config
from orchestrator.spec.schema import RunConfig


@pytest.mark.parametrize(("nodes", "gpus"), [(1, 1), (1, 8), (4, 8), (16, 8)])
def test_dense_bf16_zero2_estimate_equals_deepspeeds_estimator(nodes: int, gpus: int) -> None:
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg = load_config(
        "mpt7b-moe-4x8",
        [f"cluster.nodes={nodes}", f"cluster.tasks_per_node={gpus}", f"cluster.gpus_per_node={gpus}",
         "moe.enabled=false", "cluster.gpu_mem_gb=null"],
    )  # fmt: skip
    est = estimate_memory(cfg)
    assert est is not None and est.params.expert == 0
    _, gpu_bytes = estimate_zero2_model_states_mem_needs(
        est.params.total, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=False
    )
    assert est.total_bytes == gpu_bytes


def test_mpt7b_parameter_count_is_the_published_6_7b() -> None:
    est = estimate_memory(load_config("mpt7b-moe-4x8", ["moe.enabled=false"]))
    assert est is not None
    assert 6.6e9 < est.params.dense_parent < 6.7e9


def test_experts_are_split_over_ep_size_and_their_states_over_the_expert_data_parallel_group() -> None:
    cfg = load_config("mpt7b-moe-4x8")  # 32 ranks, ep_size 8 -> 4 expert-data-parallel ranks
    est = estimate_memory(cfg)
    assert est is not None
    replicated, partitioned = bytes_per_param("bf16", 2)
    local_experts = est.params.expert // 8
    assert est.expert_replicated == replicated * local_experts
    assert est.expert_partitioned == partitioned * local_experts // 4
    assert est.non_expert_partitioned == partitioned * est.params.non_expert // 32


@pytest.mark.parametrize(
    ("precision", "stage", "expected"),
    [
        ("bf16", 2, (2, 18)),
        ("fp32", 2, (4, 16)),
        ("bf16", 1, (4, 16)),
        ("bf16", 0, (20, 0)),
        ("fp32", 3, (0, 20)),
    ],
)
def test_bytes_per_parameter_by_precision_and_zero_stage(
    precision: str, stage: int, expected: tuple[int, int]
) -> None:
    assert bytes_per_param(precision, stage) == expected


def test_summary_shows_the_global_batch_as_its_product() -> None:
    summary = validate(load_config("tiny-slurm"))
    assert (summary.world_size, summary.data_parallel_size, summary.ep_size) == (2, 2, 2)
    assert (summary.expert_parallel_groups, summary.experts_per_rank) == (1, 2)
    assert summary.global_batch_size == 4 * 1 * 2
    assert summary.tokens_per_step == 8 * 64
    text = summary_text(summary)
    assert "8 = 4 micro x 1 accumulation x 2 data-parallel" in text
    assert "activations" in text


def test_top2_activates_two_experts_per_token() -> None:
    summary = validate(load_config("mpt7b-moe-4x8", ["moe.top_k=2"]), check_data=False)
    assert summary.params is not None and summary.active_params_per_token is not None
    p = summary.params
    assert summary.active_params_per_token == p.non_expert + p.expert * 2 // 8


def test_unknown_architecture_is_a_warning_not_an_error() -> None:
    summary = validate(load_config("tiny-slurm", ["model.name_or_path=someone/unknown-model"]))
    assert summary.memory is None and summary.params is None
    assert any("no parameter count or memory estimate" in w for w in summary.warnings)


def test_a_registered_warning_check_reaches_the_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    def slow_saves(cfg: RunConfig) -> list[str]:
        return [f"signal_delay_s {cfg.cluster.signal_delay_s} is short"]

    monkeypatch.setattr("orchestrator.lifecycle.validate.WARNING_CHECKS", [*WARNING_CHECKS, slow_saves])
    assert "signal_delay_s 60 is short" in validate(load_config("tiny-slurm")).warnings
    assert collect_warnings(load_config("tiny-slurm"), [slow_saves])[-1] == "signal_delay_s 60 is short"
