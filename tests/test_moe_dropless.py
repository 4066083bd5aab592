"""The dropless MoE layer equals DeepSpeed's MoE whenever DeepSpeed drops nothing, drops nothing
where DeepSpeed does, and equals a plain loop over the experts, on one rank and with its experts
split over 2 ranks (expert parallelism). DeepSpeed runs here in one process (a world-size-1 gloo
group), the expert-parallel test in 2 spawned processes."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import REPO, free_port
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


def test_parameter_names_are_deepspeeds_and_experts_are_marked_as_moe_params() -> None:
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
    # DeepSpeed's engine reduces them over the expert-data-parallel group and saves one file per
    # expert, as for its own layer; the gate is an ordinary parameter.
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.utils import is_moe_param

    assert isinstance(layer, MoE)
    experts = [p for n, p in layer.named_parameters() if ".experts." in n]
    assert all(is_moe_param(p) and p.group_name == "ep_size_1" for p in experts)
    assert not is_moe_param(_gate_weight(layer))


def _reference(
    gate: nn.Module, experts: list[nn.Module], x: torch.Tensor, used: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's maths written plainly: `gate` routes the real tokens, then a loop over experts
    adds each token's weighted expert outputs. -> (out (..., d), l_aux, counts (E,))"""
    flat = x.reshape(-1, x.shape[-1])  # (S, d)
    rows = torch.arange(flat.shape[0]) if used is None else used.reshape(-1).nonzero().squeeze(1)
    real = flat[rows]  # (n, d)
    weights, indices, l_aux, counts = gate(real)  # (n, k), (n, k), (), (E,)
    out = torch.zeros_like(flat)
    for e, expert in enumerate(experts):
        for slot in range(indices.shape[1]):
            chosen = (indices[:, slot] == e).nonzero().squeeze(1)  # (m,) real tokens sending slot to e
            if chosen.numel():
                out = out.index_add(0, rows[chosen], weights[chosen, slot : slot + 1] * expert(real[chosen]))
    return out.reshape(x.shape), l_aux, counts


@pytest.mark.parametrize(("k", "sampling"), [(1, False), (2, False), (2, True)])
def test_dropless_equals_a_reference_loop_over_experts(k: int, sampling: bool) -> None:
    torch.manual_seed(0)
    layer = DroplessMoE(D, _expert(), num_experts=E, k=k, top2_2nd_expert_sampling=sampling)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    gate = copy.deepcopy(layer.deepspeed_moe.gate)
    experts = [copy.deepcopy(m) for m in layer.deepspeed_moe.experts.deepspeed_experts]
    x = torch.randn(3, 20, D)
    used = torch.ones(3, 20, dtype=torch.int64)
    used[1, 15:] = 0  # padding: routed by neither
    target = torch.randn(3, 20, D)
    results = []
    for run in ("layer", "reference"):
        xx = x.clone().requires_grad_(True)
        torch.manual_seed(3)  # the same Gumbel draws for the second choice
        out, l_aux, counts = layer(xx, used) if run == "layer" else _reference(gate, experts, xx, used)
        ((out * target).sum() + l_aux).backward()
        params = [*gate.parameters(), *[p for e in experts for p in e.parameters()]]
        grads = [p.grad for p in (layer.parameters() if run == "layer" else params)]
        results.append((out.detach(), l_aux.detach(), counts, xx.grad, grads))
    got, want = results
    for a, b in zip(got[:2], want[:2], strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=ATOL)
    assert torch.equal(got[2], want[2]) and int(got[2].sum()) == (60 - 5) * k
    torch.testing.assert_close(got[3], want[3], atol=ATOL, rtol=ATOL)
    for a, b in zip(got[4], want[4], strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=ATOL)


def _expert_parallel_rank(rank: int, port: int) -> None:
    """One of 2 ranks: a dropless layer with ep_size 2 (experts 0-1 on rank 0, 2-3 on rank 1)
    against the reference loop over all 4 experts, on this rank's own tokens."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")  # fmt: skip
    torch.set_num_threads(1)
    import deepspeed
    import deepspeed.comm.torch
    import torch.distributed as dist

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # type: ignore[attr-defined]
    deepspeed.init_distributed(dist_backend="gloo")
    # (k, sampling, this rank's tokens): 1 token on rank 0 leaves most of its splits empty
    cases = [(1, False, (2, 7) if rank == 0 else (3, 5)), (2, True, (1, 1) if rank == 0 else (2, 9))]
    for k, sampling, shape in cases:
        torch.manual_seed(0)  # the same full layer on both ranks
        full = DroplessMoE(D, _expert(), num_experts=E, k=k, top2_2nd_expert_sampling=sampling)
        with torch.no_grad():
            for p in full.parameters():
                p.copy_(torch.randn_like(p) * 0.5)
        layer = DroplessMoE(D, _expert(), num_experts=E, ep_size=2, k=k, top2_2nd_expert_sampling=sampling)
        layer.set_deepspeed_parallelism()
        local = layer.deepspeed_moe.experts.deepspeed_experts
        all_experts = full.deepspeed_moe.experts.deepspeed_experts
        layer.deepspeed_moe.gate.load_state_dict(full.deepspeed_moe.gate.state_dict())
        for i, expert in enumerate(local):
            expert.load_state_dict(all_experts[rank * len(local) + i].state_dict())
        gen = torch.Generator().manual_seed(10 + rank)
        x = torch.randn(*shape, D, generator=gen)
        target = torch.randn(*shape, D, generator=gen)
        used = torch.ones(shape, dtype=torch.int64)
        if rank == 1:
            used[0, -2:] = 0  # padding on one rank only
        results = []
        for run in ("ep", "reference"):
            xx = x.clone().requires_grad_(True)
            torch.manual_seed(5 + rank)
            if run == "ep":
                out, l_aux, counts = layer(xx, used)
            else:
                out, l_aux, counts = _reference(full.deepspeed_moe.gate, list(all_experts), xx, used)
            ((out * target).sum() + l_aux).backward()
            results.append((out.detach(), l_aux.detach(), counts, xx.grad))
        for a, b in zip(results[0], results[1], strict=True):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(
            layer.deepspeed_moe.gate.wg.weight.grad,
            full.deepspeed_moe.gate.wg.weight.grad,
            atol=ATOL,
            rtol=ATOL,
        )
        # An expert's gradient gathers every rank's tokens: the reference's, summed over the ranks.
        for ref in all_experts.parameters():
            if ref.grad is None:  # the reference ran no token of this rank through it
                ref.grad = torch.zeros_like(ref)
            dist.all_reduce(ref.grad)
        for i, expert in enumerate(local):
            want = all_experts[rank * len(local) + i]
            for p, ref in zip(expert.parameters(), want.parameters(), strict=True):
                torch.testing.assert_close(p.grad, ref.grad, atol=ATOL, rtol=ATOL)
    dist.barrier()


def test_expert_parallel_dropless_on_two_ranks_equals_the_reference_loop() -> None:
    from torch.multiprocessing.spawn import start_processes

    start_processes(_expert_parallel_rank, args=(free_port(),), nprocs=2, start_method="spawn")  # type: ignore[no-untyped-call]


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


def _launch_tiny(run_dir: Path, *sets: str, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    """`torchrun --nproc_per_node 2 -m worker` on configs/tiny-cpu.yaml (ep_size 2), dropless."""
    args = ["--config", str(REPO / "configs" / "tiny-cpu.yaml"), "--run-dir", str(run_dir)]
    for item in ("moe.implementation=dropless", *sets):
        args += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MOE_ORCH_FAULT", None)
    if fault:
        env["MOE_ORCH_FAULT"] = fault
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), "-m", "worker", *args]  # fmt: skip
    return subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_expert_parallel_dropless_trains_saves_one_file_per_expert_resumes_bitwise_and_exports(
    tmp_path: Path,
) -> None:
    from orchestrator.rundir.reports import read_metrics

    sets = ("training.max_steps=4", "training.save_steps=2", "training.logging_steps=1")
    straight = _launch_tiny(tmp_path / "a", *sets, "training.export_on_finish=true")
    assert straight.returncode == 0, straight.stderr[-3000:]
    crashed = _launch_tiny(tmp_path / "b", *sets, fault="crash_at_step:3")
    assert crashed.returncode != 0
    resumed = _launch_tiny(tmp_path / "b", *sets)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def losses(run_dir: Path) -> dict[int, float]:
        return {int(r["step"]): r["loss"] for r in read_metrics(run_dir) if "loss" in r}

    assert losses(tmp_path / "a") == losses(tmp_path / "b")  # the resume from step 2 is exact
    final = tmp_path / "a" / "checkpoints" / "step-000004"
    experts = sorted(p.name for p in final.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))
    assert experts == [
        f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in range(2) for e in range(4)
    ]
    config = json.loads((tmp_path / "a" / "export" / "config.json").read_text())
    assert config["num_experts"] == 4
