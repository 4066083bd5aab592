"""Routing of real tokens only, and label-guided routing, on the real DeepSpeed MoE and our dropless
layer (one process: a world-size-1 gloo group), then end to end through the worker (2 ranks).

- Padding takes no expert capacity and counts in no load statistic or loss: a padded batch routes
  exactly like its real tokens alone (counts, dropped tokens, outputs, l_aux, gradients).
- `moe.label_routing` raises the label/expert mutual information above an unguided run's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from helpers import REPO, free_port
from torch import nn

from orchestrator.rundir.reports import read_metrics
from orchestrator.spec.schema import RunConfig

D, F, E = 16, 32, 4  # d_model, expert FFN width, experts
LENGTHS = (9, 13, 16)  # real tokens per row of a (3, 16) right-padded batch: 38 real, 10 padding
ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def single_rank_dist() -> Iterator[None]:
    """A world of one gloo rank, so DeepSpeed's MoE layers get their (trivial) expert group."""
    import deepspeed
    import deepspeed.comm.torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # type: ignore[attr-defined]
    if not dist.is_initialized():
        # NOTE: tcp:// instead of env:// so RANK/MASTER_* never leak into other tests' subprocesses.
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="gloo")
    yield


def _mask() -> torch.Tensor:
    """(3, 16) attention mask of a right-padded batch with LENGTHS real tokens per row."""
    mask = torch.zeros((len(LENGTHS), max(LENGTHS)), dtype=torch.long)
    for row, n in enumerate(LENGTHS):
        mask[row, :n] = 1
    return mask


def _layer(implementation: str, k: int) -> nn.Module:
    """The worker's MoE layer (`_make_moe_layer`): capacity factor 1.0, tokens dropped (DeepSpeed),
    distinct experts and router so that a wrong route or drop changes the output."""
    from worker.model import _make_moe_layer

    cfg = RunConfig.model_validate(
        {
            "name": "routing",
            "moe": {"num_experts": E, "top_k": k, "implementation": implementation},
            "training": {"precision": "fp32"},
        }
    )
    torch.manual_seed(0)
    layer = _make_moe_layer(cfg, D, nn.Sequential(nn.Linear(D, F), nn.GELU(), nn.Linear(F, D)))
    cast(Any, layer).set_deepspeed_parallelism()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return layer


def _run(
    layer: nn.Module, x: torch.Tensor, target: torch.Tensor, used: torch.Tensor | None
) -> dict[str, Any]:
    layer.zero_grad(set_to_none=True)
    xx = x.detach().clone().requires_grad_(True)
    torch.manual_seed(1)  # the same noise draws (RTS, top-2 sampling) for both calls
    out, l_aux, counts = layer(xx) if used is None else layer(xx, used)
    ((out * target).sum() + l_aux).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return {
        "out": out.detach(), "l_aux": l_aux.detach(), "counts": counts.long(), "x_grad": xx.grad,
        "grads": grads,
    }  # fmt: skip


@pytest.mark.parametrize("implementation", ["deepspeed", "dropless"])
@pytest.mark.parametrize("k", [1, 2])
def test_a_padded_batch_routes_exactly_like_its_real_tokens_alone(implementation: str, k: int) -> None:
    layer = _layer(implementation, k)
    layer.train()
    mask = _mask()
    real = mask.reshape(-1).bool()
    torch.manual_seed(2)
    x = torch.randn((*mask.shape, D))  # (3, 16, d); the padding rows hold junk
    target = torch.randn_like(x) * real[:, None].reshape(*mask.shape, 1)  # no loss on padding

    padded = _run(layer, x, target, mask.reshape(-1))
    alone = _run(layer, x.reshape(-1, D)[real][None], target.reshape(-1, D)[real][None], None)  # (1, 38, d)

    assert int(padded["counts"].sum()) == k * int(real.sum())  # padding counts nowhere
    assert torch.equal(padded["counts"], alone["counts"])
    torch.testing.assert_close(padded["l_aux"], alone["l_aux"], atol=ATOL, rtol=ATOL)
    out = padded["out"].reshape(-1, D)
    torch.testing.assert_close(out[real], alone["out"][0], atol=ATOL, rtol=ATOL)
    assert torch.count_nonzero(out[~real]) == 0  # padding is never routed: output 0
    if (implementation, k) == ("deepspeed", 1):
        assert int((out[real].abs().sum(dim=1) == 0).sum()) > 0, "capacity binds: some real tokens dropped"
    x_grad = padded["x_grad"].reshape(-1, D)
    torch.testing.assert_close(x_grad[real], alone["x_grad"][0], atol=ATOL, rtol=ATOL)
    assert padded["grads"].keys() == alone["grads"].keys()
    for name, grad in alone["grads"].items():
        torch.testing.assert_close(padded["grads"][name], grad, atol=ATOL, rtol=ATOL, msg=name)


def test_without_the_mask_padding_takes_capacity_and_counts_as_load() -> None:
    # What the worker did before passing the mask (top-1, capacity 1.0): 48 routed tokens, not 38.
    layer = _layer("deepspeed", 1)
    mask = _mask()
    x = torch.randn((*mask.shape, D))
    unmasked = _run(layer, x, torch.zeros_like(x), None)
    masked = _run(layer, x, torch.zeros_like(x), mask.reshape(-1))
    assert int(unmasked["counts"].sum()) == mask.numel()
    assert int(masked["counts"].sum()) == int(mask.sum())


def _tiny_model(implementation: str, k: int) -> Any:
    from worker.model import build_model, moe_layers

    cfg = RunConfig.model_validate(
        {
            "name": "routing-model",
            "model": {"name_or_path": "tiny",
                      "tiny": {"d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 64}},
            "moe": {"num_experts": E, "top_k": k, "implementation": implementation},
            "training": {"precision": "fp32", "seed": 5},
        }
    )  # fmt: skip
    model = build_model(cfg, 300)
    for layer in moe_layers(model):
        cast(Any, layer.moe).set_deepspeed_parallelism()
    return model


@pytest.mark.parametrize("implementation", ["deepspeed", "dropless"])
@pytest.mark.parametrize("k", [1, 2])
def test_a_padded_batch_gives_the_same_routed_counts_and_loss_as_each_sequence_alone(
    implementation: str, k: int
) -> None:
    import torch.nn.functional as tf

    from worker.model import expert_token_counts

    model = _tiny_model(implementation, k).eval()  # eval: capacity num_experts x tokens / E, no drop
    mask = _mask()
    torch.manual_seed(3)
    ids = torch.randint(5, 300, mask.shape) * mask  # padding id 0
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))

    def loss_sum(logits: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        # summed next-token loss (b, s, V), (b, s) -> ()
        flat = logits[:, :-1].reshape(-1, logits.shape[-1])
        return tf.cross_entropy(flat, lab[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")

    with torch.no_grad():
        batch_logits = model(input_ids=ids, attention_mask=mask).logits
        batch_loss = loss_sum(batch_logits, labels)
        batch_counts = torch.stack(expert_token_counts(model)).long()  # (layers, E)
        alone_loss = torch.zeros(())
        alone_counts = torch.zeros_like(batch_counts)
        for row, n in enumerate(LENGTHS):
            one = model(input_ids=ids[row : row + 1, :n], attention_mask=mask[row : row + 1, :n]).logits
            alone_loss = alone_loss + loss_sum(one, labels[row : row + 1, :n])
            alone_counts += torch.stack(expert_token_counts(model)).long()
    assert torch.equal(batch_counts, alone_counts)
    assert int(batch_counts.sum()) == k * len(batch_counts) * int(mask.sum())
    torch.testing.assert_close(batch_loss, alone_loss, atol=1e-4, rtol=1e-5)


def test_label_routing_loss_reaches_the_router_and_only_on_guided_real_tokens() -> None:
    from worker import model as moe

    model = _tiny_model("deepspeed", 1).train()
    labels = ["a", "b", "c"]
    table = moe.label_expert_table({"a": [0], "b": [1, 2]}, labels, E)  # "c": not guided
    moe.set_label_routing(model, table)
    mask = _mask()
    ids = torch.randint(5, 300, mask.shape) * mask
    token_labels = torch.tensor([0, 1, 2])[:, None].expand_as(ids)
    moe.set_token_labels(model, token_labels)
    model(input_ids=ids, attention_mask=mask)
    loss = moe.moe_label_loss(model)
    assert loss is not None and float(loss.detach()) > 0
    cast(Any, loss).backward()
    gate = moe.moe_layers(model)[0].moe.get_parameter("deepspeed_moe.gate.wg.weight")
    assert gate.grad is not None and float(gate.grad.abs().sum()) > 0
    model(input_ids=ids, attention_mask=mask)  # the labels were for one forward only
    assert moe.moe_label_loss(model) is None
    moe.set_token_labels(model, torch.full_like(ids, 2))  # only an unguided label: nothing to pull
    model(input_ids=ids, attention_mask=mask)
    assert moe.moe_label_loss(model) is None


def _routing_batch(lengths: list[int]) -> dict[str, torch.Tensor]:
    """4 examples with label ids 0..3, 8 positions, right padding, the answer in the last real 3."""
    mask = torch.zeros((4, 8), dtype=torch.long)
    labels = torch.full((4, 8), -100)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        labels[row, n - 3 : n] = 7
    return {"attention_mask": mask, "labels": labels, "expert_label_ids": torch.arange(4)}


def _mi_fields(batch: dict[str, torch.Tensor], top1: torch.Tensor) -> dict[str, Any]:
    from worker.metrics import RoutingStats

    stats = RoutingStats([0, 1], E, ["a", "b", "c", "d"])
    for _ in range(3):
        stats.add([torch.bincount(top1, minlength=E)] * 2, [top1, top1], batch)
    fields = stats.reduce_and_reset()
    assert stats.reduce_and_reset()["routing_mi_bits"] == {"0": 0.0, "1": 0.0}  # reset after a window
    return fields


def test_routing_mi_is_log2_k_when_each_label_has_its_own_expert_padding_left_out() -> None:
    batch = _routing_batch([6, 6, 6, 6])  # equal counts per label, so I = H(label) = log2(4)
    real = batch["attention_mask"].reshape(-1).bool()
    top1 = torch.where(real, torch.arange(4).repeat_interleave(8), 3)  # padding's route: expert 3
    fields = _mi_fields(batch, top1)
    assert fields["routing_mi_max_bits"] == 2.0
    for key in ("routing_mi_bits", "routing_mi_answer_bits"):
        assert fields[key] == {"0": pytest.approx(2.0), "1": pytest.approx(2.0)}, key


def test_routing_mi_is_0_when_the_expert_does_not_depend_on_the_label() -> None:
    batch = _routing_batch([8, 8, 8, 8])
    top1 = torch.arange(8).repeat(4) % 4  # the expert follows the position: 2 tokens per expert each
    fields = _mi_fields(batch, top1)
    for key in ("routing_mi_bits", "routing_mi_answer_bits"):
        assert fields[key] == {"0": pytest.approx(0.0, abs=1e-9), "1": pytest.approx(0.0, abs=1e-9)}, key


# --- end to end: label routing raises the mutual information (2 ranks, the tiny config) ---------
STEPS = 100


def _train(run_dir: Path, *sets: str) -> list[dict[str, Any]]:
    run_dir.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MOE_ORCH_FAULT", None)
    args = ["--config", str(REPO / "configs" / "tiny-cpu.yaml"), "--run-dir", str(run_dir)]
    base = (f"training.max_steps={STEPS}", "training.save_steps=1000", "training.eval_steps=1000")
    for item in (*base, *sets):
        args += ["--set", item]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "worker", *args]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [r for r in read_metrics(run_dir) if "loss" in r]


def _late_mi(lines: list[dict[str, Any]], key: str = "routing_mi_bits") -> float:
    """Mean over the last 4 logged windows and the MoE layers."""
    values = [float(v) for r in lines[-4:] for v in r[key].values()]
    return sum(values) / len(values)


@pytest.mark.slow
def test_label_routing_raises_the_label_expert_mutual_information(tmp_path: Path) -> None:
    plain = _train(tmp_path / "plain")
    guided = _train(tmp_path / "guided", "moe.label_routing.weight=1.0", "training.export_on_finish=true")
    last = guided[-1]
    assert last["routing_mi_max_bits"] == 2.0  # log2(min(5 labels, 4 experts))
    assert set(last["routing_mi_bits"]) == set(last["routing_mi_answer_bits"]) == {"0", "1"}
    assert "label_routing_loss" in last and "label_routing_loss" not in plain[-1]
    assert _late_mi(guided) > _late_mi(plain) + 0.3, (_late_mi(guided), _late_mi(plain))
    assert _late_mi(guided, "routing_mi_answer_bits") > _late_mi(plain, "routing_mi_answer_bits")
    config = json.loads((tmp_path / "guided" / "export" / "config.json").read_text())
    assert config["label_routing"] == {
        "weight": 1.0,
        "experts": {"arithmetic": [0], "definition": [1], "factual_lookup": [2], "list_recall": [3],
                    "unit_conversion": [0]},
    }  # fmt: skip
