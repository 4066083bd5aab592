"""The dropless MoE layer equals DeepSpeed's MoE whenever DeepSpeed drops nothing, and drops nothing
where DeepSpeed does. DeepSpeed runs here in one process: a world-size-1 gloo group."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import free_port
from torch import nn

from worker.moe_dropless import DroplessMoE

D, F, E = 16, 32, 4  # d_model, expert FFN width, experts
ATOL = 1e-5


@pytest.fixture(scope="module")
def ds_world() -> Iterator[None]:
    """A single-process DeepSpeed world (gloo, world size 1), as DeepSpeed's MoE needs one."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        # NOTE: skips the 55 s shm C++ JIT that init_distributed triggers on CPU (docs/deepspeed-cpu.md,
        # "The shm build"); training never uses it. `import deepspeed.comm.torch` would bind torch itself.
        import deepspeed.comm.torch

        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # type: ignore[attr-defined]
        keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
        saved = {k: os.environ.get(k) for k in keys}
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
        )
        try:
            deepspeed.init_distributed(dist_backend="gloo")
        finally:
            # The group lives on; the environment goes back to what other tests expect.
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    yield


def _expert() -> nn.Module:
    return nn.Sequential(nn.Linear(D, F), nn.GELU(), nn.Linear(F, D))


def _stock_and_dropless(
    k: int, capacity_factor: float, drop_tokens: bool = True, sampling: bool = False
) -> tuple[nn.Module, DroplessMoE]:
    """DeepSpeed's MoE and ours with identical, distinct experts and the same gate."""
    from deepspeed.moe.layer import MoE

    torch.manual_seed(0)
    stock = MoE(
        D,
        _expert(),
        num_experts=E,
        ep_size=1,
        k=k,
        capacity_factor=capacity_factor,
        eval_capacity_factor=capacity_factor,
        min_capacity=0,
        drop_tokens=drop_tokens,
        use_rts=False,
        top2_2nd_expert_sampling=sampling,
    )
    stock.set_deepspeed_parallelism()
    with torch.no_grad():
        # Distinct experts (DeepSpeed starts them as copies), so a wrong route changes the output.
        for p in stock.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    ours = DroplessMoE(D, _expert(), num_experts=E, k=k, top2_2nd_expert_sampling=sampling)
    ours.load_state_dict(stock.state_dict())  # strict: the parameter names are DeepSpeed's
    return stock, ours


def _gate_weight(layer: nn.Module) -> torch.Tensor:
    weight: torch.Tensor = layer.get_parameter("deepspeed_moe.gate.wg.weight")
    return weight


def _forward_backward(
    layer: nn.Module, x: torch.Tensor, target: torch.Tensor, seed: int = 0
) -> dict[str, Any]:
    layer.zero_grad(set_to_none=True)
    xx = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    out, l_aux, counts = layer(xx)
    ((out * target).sum() + l_aux).backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    return {"out": out.detach(), "l_aux": l_aux.detach(), "counts": counts, "x_grad": xx.grad, "grads": grads}


def _assert_same(ours: dict[str, Any], stock: dict[str, Any]) -> None:
    torch.testing.assert_close(ours["out"], stock["out"], atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(ours["l_aux"], stock["l_aux"], atol=ATOL, rtol=ATOL)
    assert torch.equal(ours["counts"].long(), stock["counts"].long())
    torch.testing.assert_close(ours["x_grad"], stock["x_grad"], atol=ATOL, rtol=ATOL)
    assert ours["grads"].keys() == stock["grads"].keys()
    for name, grad in stock["grads"].items():
        assert grad is not None and ours["grads"][name] is not None, name
        torch.testing.assert_close(ours["grads"][name], grad, atol=ATOL, rtol=ATOL, msg=name)


@pytest.mark.parametrize("k", [1, 2])
def test_dropless_equals_deepspeed_outputs_aux_loss_and_gradients_when_nothing_is_dropped(
    ds_world: None, k: int
) -> None:
    # capacity_factor = num_experts gives every expert room for every token: DeepSpeed drops none.
    stock, ours = _stock_and_dropless(k, capacity_factor=float(E))
    x = torch.randn(3, 20, D)
    target = torch.randn(3, 20, D)
    got, want = _forward_backward(ours, x, target), _forward_backward(stock, x, target)
    _assert_same(got, want)
    assert int(got["counts"].sum()) == 3 * 20 * k
    assert got["l_aux"].item() > 0


@pytest.mark.parametrize("k", [1, 2])
def test_dropless_equals_deepspeed_in_eval_mode_with_the_default_eval_capacity(
    ds_world: None, k: int
) -> None:
    stock, ours = _stock_and_dropless(k, capacity_factor=float(E))
    stock.eval()
    ours.eval()
    x = torch.randn(2, 24, D)
    with torch.no_grad():
        got, want = ours(x), stock(x)
    torch.testing.assert_close(got[0], want[0], atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(got[1], want[1], atol=ATOL, rtol=ATOL)


def test_top2_second_expert_sampling_draws_the_same_gumbel_noise_as_deepspeed(ds_world: None) -> None:
    stock, ours = _stock_and_dropless(2, capacity_factor=float(E), sampling=True)
    x = torch.randn(4, 16, D)
    target = torch.randn(4, 16, D)
    _assert_same(_forward_backward(ours, x, target, seed=7), _forward_backward(stock, x, target, seed=7))
    # and the noise really matters: another seed routes some second choices elsewhere
    other = _forward_backward(ours, x, target, seed=8)
    assert not torch.allclose(other["out"], _forward_backward(ours, x, target, seed=7)["out"])


def test_stock_layer_drops_tokens_over_capacity_where_dropless_keeps_every_token(ds_world: None) -> None:
    # Documented difference: with capacity_factor 1 and every token routed to expert 0, DeepSpeed
    # keeps capacity = S / E tokens and zeroes the rest; the dropless layer computes them all.
    stock, ours = _stock_and_dropless(1, capacity_factor=1.0, drop_tokens=True)
    with torch.no_grad():
        for layer in (stock, ours):
            wg = _gate_weight(layer)
            wg.zero_()
            wg[0, 0] = 5.0
    x = torch.randn(1, 32, D)
    x[..., 0] = x[..., 0].abs() + 1.0  # logit of expert 0 > 0 = the others' logits
    with torch.no_grad():
        stock_out, _, stock_counts = stock(x)
        ours_out, _, ours_counts = ours(x)
    zero_rows_stock = int((stock_out[0].abs().sum(dim=-1) == 0).sum())
    zero_rows_ours = int((ours_out[0].abs().sum(dim=-1) == 0).sum())
    assert zero_rows_stock == 32 - 32 // E  # capacity ceil(32 / 4 * 1.0) = 8 tokens kept
    assert zero_rows_ours == 0
    assert ours_counts.tolist() == stock_counts.tolist() == [32, 0, 0, 0]  # both count before dropping
    # every token of ours is its gate probability times expert 0's output
    with torch.no_grad():
        gates = torch.softmax(x[0] @ _gate_weight(ours).T, dim=-1)
        expected = gates[:, :1] * ours.deepspeed_moe.experts.deepspeed_experts[0](x[0])
    torch.testing.assert_close(ours_out[0], expected, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("k", [1, 2])
def test_dropless_runs_one_token_and_gives_unused_experts_zero_gradients(k: int) -> None:
    # DeepSpeed asserts tokens >= min_capacity; ZeRO wants a gradient for every parameter.
    torch.manual_seed(0)
    layer = DroplessMoE(D, _expert(), num_experts=E, k=k, top2_2nd_expert_sampling=False)
    out, l_aux, counts = layer(torch.randn(1, 1, D))
    (out.sum() + l_aux).backward()
    assert out.shape == (1, 1, D)
    assert int(counts.sum()) == k
    for i, expert in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
        for p in expert.parameters():
            assert p.grad is not None
            assert bool(p.grad.abs().sum() > 0) == bool(counts[i] > 0)


def test_top2_with_identical_experts_preserves_the_dense_function() -> None:
    # Sparse upcycling: top-2 weights sum to 1, so copies of the dense FFN give the dense output.
    torch.manual_seed(0)
    dense = _expert()
    layer = DroplessMoE(D, dense, num_experts=E, k=2)
    x = torch.randn(2, 8, D)
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[0], dense(x), atol=ATOL, rtol=ATOL)


def test_parameter_names_are_deepspeeds_and_experts_are_not_marked_as_moe_params() -> None:
    layer = DroplessMoE(D, _expert(), num_experts=2, k=1)
    names = [n for n, _ in layer.named_parameters()]
    assert names == [
        "deepspeed_moe.gate.wg.weight",
        *[
            f"deepspeed_moe.experts.deepspeed_experts.{i}.{j}.{w}"
            for i in range(2)
            for j in (0, 2)
            for w in ("weight", "bias")
        ],
    ]
    # ep_size 1: experts are reduced over the whole world, like dense parameters (module docstring)
    assert not any(hasattr(p, "allreduce") for p in layer.parameters())


def test_expert_parallelism_is_refused_with_the_fix_in_the_message() -> None:
    with pytest.raises(ValueError, match=re.escape("ep_size: 1 or moe.implementation: deepspeed")):
        DroplessMoE(D, _expert(), num_experts=4, ep_size=2)


def test_moe_layer_benchmark_smoke_returns_a_timed_record_per_token_count(ds_world: None) -> None:
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from bench.moe_layer import run

    results = run(smoke=True, tokens=[64, 128], top_ks=(1,), repeats=1, warmup=0)
    assert [r.name for r in results] == ["moe fwd+bwd top1 S=64", "moe fwd+bwd top1 S=128"]
    for r in results:
        assert r.ours > 0 and r.baseline is not None and r.baseline > 0
        assert r.ratio == pytest.approx(r.ours / r.baseline)
        assert "dense" in r.note


def test_worker_builds_the_dropless_layer_and_top2_upcycling_keeps_the_dense_loss() -> None:
    from orchestrator.spec.schema import RunConfig
    from worker.model import build_model, expert_token_counts

    def tiny(moe: dict[str, Any]) -> RunConfig:
        return RunConfig.model_validate(
            {
                "name": "t",
                "model": {"name_or_path": "tiny", "tiny": {"d_model": 32, "n_layers": 2, "n_heads": 2}},
                "moe": moe,
                "training": {"precision": "fp32"},
            }
        )

    dense = build_model(tiny({"enabled": False}), 300)
    moe = build_model(tiny({"implementation": "dropless", "top_k": 2, "num_experts": 4}), 300)
    assert isinstance(moe.get_submodule("transformer.blocks.0.ffn.moe"), DroplessMoE)
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        dense_loss = dense(input_ids=ids, labels=ids).loss
        moe_loss = moe(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(moe_loss, dense_loss, atol=ATOL, rtol=ATOL)
    assert [int(c.sum()) for c in expert_token_counts(moe)] == [2 * 12 * 2] * 2
