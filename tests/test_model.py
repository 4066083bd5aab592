"""MPT loading and sparse upcycling into DeepSpeed MoE (one process, world size 1 over gloo)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from helpers import free_port

from orchestrator.spec.schema import RunConfig

VOCAB = 300


@pytest.fixture(scope="module", autouse=True)
def single_rank_dist() -> Iterator[None]:
    """A world of one gloo rank, so DeepSpeed's MoE layers get their (trivial) expert group."""
    import deepspeed
    import deepspeed.comm.torch
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # type: ignore[attr-defined]
    if not dist.is_initialized():
        # NOTE: tcp:// instead of env:// so RANK/MASTER_* never leak into other tests' subprocesses.
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="gloo")
    yield


def _cfg(tiny: dict[str, Any] | None = None, **moe: Any) -> RunConfig:
    return RunConfig.model_validate(
        {
            "name": "model-test",
            "model": {
                "name_or_path": "tiny",
                "tiny": tiny or {"d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 64},
            },
            "moe": moe,
            "training": {"precision": "fp32", "seed": 5},
        }
    )


def _moe_model(cfg: RunConfig) -> Any:
    from worker.model import build_model, moe_layers

    model = build_model(cfg, VOCAB)
    for layer in moe_layers(model):
        cast(Any, layer.moe).set_deepspeed_parallelism()  # what deepspeed.initialize does for every MoE layer
    return model


def _batch(seed: int = 0, shape: tuple[int, int] = (2, 16)) -> Any:
    import torch

    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def test_top2_upcycling_preserves_the_dense_loss_at_step_0() -> None:
    import torch

    from worker.model import load_dense_model

    cfg = _cfg(num_experts=4, top_k=2, drop_tokens=False)
    ids = _batch()
    dense = load_dense_model(cfg, VOCAB)
    moe = _moe_model(cfg)
    with torch.no_grad():
        dense_loss = dense(input_ids=ids, labels=ids).loss
        moe.eval()
        eval_loss = moe(input_ids=ids, labels=ids).loss
        moe.train()  # training samples the second expert (Gumbel); every expert is the dense FFN
        train_loss = moe(input_ids=ids, labels=ids).loss
    assert abs(float(eval_loss) - float(dense_loss)) <= 1e-6
    assert abs(float(train_loss) - float(dense_loss)) <= 1e-6


def test_top1_upcycling_scales_each_token_by_its_router_probability_so_the_loss_moves() -> None:
    import torch

    from worker.model import load_dense_model

    cfg = _cfg(num_experts=4, top_k=1)
    ids = _batch()
    moe = _moe_model(cfg).eval()
    with torch.no_grad():
        dense_loss = float(load_dense_model(cfg, VOCAB)(input_ids=ids, labels=ids).loss)
        moe_loss = float(moe(input_ids=ids, labels=ids).loss)
    assert abs(moe_loss - dense_loss) > 1e-4


def test_every_expert_starts_as_a_copy_of_the_dense_ffn_and_rebuilding_gives_identical_gates() -> None:
    import torch

    from worker.model import load_dense_model, moe_layers

    cfg = _cfg(num_experts=3, top_k=1, layers=[1])
    dense_ffn: Any = load_dense_model(cfg, VOCAB).transformer.blocks[1].ffn
    first, second = _moe_model(cfg), _moe_model(cfg)
    layers = moe_layers(first)
    assert len(layers) == 1 and first.transformer.blocks[0].ffn.__class__.__name__ == "MptMLP"
    experts: Any = cast(Any, layers[0].moe).deepspeed_moe.experts.deepspeed_experts
    assert len(experts) == 3
    for expert in experts:
        assert torch.equal(expert.up_proj.weight, dense_ffn.up_proj.weight)
        assert torch.equal(expert.down_proj.weight, dense_ffn.down_proj.weight)
    # same seed on every rank -> the same gate everywhere, without a broadcast
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_side_channels_report_aux_loss_token_counts_and_first_choice_routing() -> None:
    import torch

    from worker.model import expert_token_counts, moe_aux_loss, routing_top1

    cfg = _cfg(num_experts=4, top_k=1)
    model = _moe_model(cfg).train()
    ids = _batch(shape=(3, 10))
    out = model(input_ids=ids, labels=ids)
    aux = moe_aux_loss(model)
    counts, top1 = expert_token_counts(model), routing_top1(model)

    assert len(counts) == len(top1) == 2
    for layer_counts, layer_top1 in zip(counts, top1, strict=True):
        assert layer_top1.shape == (30,)
        # without noise the top-1 gate's own decision equals the argmax of its logits
        assert torch.equal(torch.bincount(layer_top1, minlength=4), layer_counts.long())
    assert float(aux.detach()) > 0
    (out.loss + 0.01 * aux).backward()
    gate = model.transformer.blocks[0].ffn.moe.deepspeed_moe.gate.wg.weight
    assert gate.grad is not None and float(gate.grad.abs().sum()) > 0


def test_dense_model_has_zero_aux_loss_and_no_moe_param_group() -> None:
    from worker.model import build_model, moe_aux_loss, optimizer_param_groups

    model = build_model(_cfg(enabled=False), VOCAB)
    assert float(moe_aux_loss(model)) == 0.0
    groups = optimizer_param_groups(model, weight_decay=0.1)
    assert not any(g.get("moe") for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_param_groups_put_every_expert_parameter_in_a_moe_group() -> None:
    from worker.model import optimizer_param_groups

    model = _moe_model(_cfg(num_experts=4, top_k=1))
    groups = optimizer_param_groups(model, weight_decay=0.1)
    moe_groups = [g for g in groups if g.get("moe")]
    assert [g["name"] for g in moe_groups] == ["ep_size_1"]
    expert_ids = {id(p) for n, p in model.named_parameters() if ".deepspeed_experts." in n}
    assert {id(p) for g in moe_groups for p in g["params"]} == expert_ids
    assert not {id(p) for g in groups if not g.get("moe") for p in g["params"]} & expert_ids
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert {g["weight_decay"] for g in groups if g["name"] == "no_decay"} == {0.0}


def test_top2_eval_is_deterministic_while_training_keeps_second_expert_sampling() -> None:
    import torch

    model = _moe_model(_cfg(num_experts=4, top_k=2))
    gate = model.transformer.blocks[0].ffn.moe.deepspeed_moe.gate
    assert gate.top2_2nd_expert_sampling is True
    model.eval()
    assert gate.top2_2nd_expert_sampling is False
    # make experts differ, so a different second choice would change the output
    with torch.no_grad():
        experts = model.transformer.blocks[0].ffn.moe.deepspeed_moe.experts.deepspeed_experts
        for i, expert in enumerate(experts):
            expert.down_proj.weight.mul_(1.0 + 0.5 * i)
        ids = _batch(seed=3)
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_dense_mpt_saved_with_save_pretrained_loads_back_with_the_same_logits(tmp_path: Path) -> None:
    import torch

    from worker.model import load_dense_model

    tiny = load_dense_model(_cfg(enabled=False), VOCAB)
    tiny.save_pretrained(str(tmp_path / "mpt"))
    cfg = RunConfig.model_validate(
        {
            "name": "local",
            "model": {"name_or_path": str(tmp_path / "mpt")},
            "moe": {"enabled": False},
            "training": {"precision": "fp32"},
        }
    )
    loaded = load_dense_model(cfg, VOCAB)
    ids = _batch()
    with torch.no_grad():
        assert torch.equal(tiny(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())

    bigger = load_dense_model(cfg, VOCAB + 20)  # a tokenizer larger than the model's vocabulary
    assert cast(Any, bigger.get_input_embeddings()).weight.shape[0] >= VOCAB + 20


def test_upcycling_refuses_layer_indices_the_model_does_not_have() -> None:
    from orchestrator.errors import ConfigError
    from worker.model import load_dense_model, upcycle

    dense = load_dense_model(_cfg(), VOCAB)
    cfg = RunConfig.model_validate(
        {
            "name": "x",
            "model": {"name_or_path": "/nonexistent"},
            "moe": {"layers": [0, 7]},
            "training": {"precision": "fp32"},
        }
    )
    with pytest.raises(ConfigError, match=r"layer indices \[7\] do not exist: the model has 2 blocks"):
        upcycle(dense, cfg)


@pytest.mark.parametrize(
    ("implementation", "top_k"), [("deepspeed", 1), ("deepspeed", 2), ("dropless", 1), ("dropless", 2)]
)
def test_hf_moe_model_reproduces_the_training_moe_forward_under_renamed_weights(
    implementation: str, top_k: int
) -> None:
    import torch

    from worker.export import hf_key
    from worker.hf_moe.configuration_mpt_moe import MptMoeConfig
    from worker.hf_moe.modeling_mpt_moe import MptMoeForCausalLM

    cfg = _cfg(num_experts=4, top_k=top_k, layers=[1], implementation=implementation)
    model = _moe_model(cfg).eval()
    experts = model.transformer.blocks[1].ffn.moe.deepspeed_moe.experts.deepspeed_experts
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # distinct experts, so a wrong expert order or weight would show
        for p in experts.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    assert not torch.equal(experts[0].up_proj.weight, experts[1].up_proj.weight)
    config = MptMoeConfig(
        **{
            k: v for k, v in model.config.to_dict().items() if k not in {"model_type", "transformers_version"}
        },
        num_experts=4,
        num_experts_per_tok=top_k,
        moe_layers=[1],
    )
    hf = cast(Any, MptMoeForCausalLM(config)).eval()
    hf.load_state_dict({hf_key(k): v for k, v in model.state_dict().items()}, strict=True)
    ids = _batch(seed=9, shape=(2, 24))
    with torch.no_grad():
        diff = (hf(input_ids=ids).logits - model(input_ids=ids).logits).abs().max()
    assert float(diff) < 1e-5


def test_gradient_checkpointing_recomputes_the_moe_forward_to_identical_gradients() -> None:
    import torch

    from worker.model import moe_aux_loss

    grads = []
    for checkpointing in (False, True):
        cfg = _cfg(num_experts=4, top_k=1).model_copy(deep=True)
        cfg.model.gradient_checkpointing = checkpointing
        model = _moe_model(cfg).train()
        assert model.transformer.gradient_checkpointing is checkpointing
        ids = _batch(seed=4)
        torch.manual_seed(1)  # random token selection draws from the torch RNG
        out = model(input_ids=ids, labels=ids)
        (out.loss + 0.01 * moe_aux_loss(model)).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(grads[0], grads[1], strict=True))
