"""MPT loading and sparse upcycling of its FFNs into `deepspeed.moe.layer.MoE`.

The training loop calls `build_model`, then reads the MoE side channels after each forward:
`moe_aux_loss`, `expert_token_counts` and `routing_top1`. `optimizer_param_groups` gives the
groups DeepSpeed needs (expert parameters in their own group, or DeepSpeed asserts).

Module names matter: `worker/export.py` maps them to `worker/hf_moe/modeling_mpt_moe.py`:
    transformer.blocks.{i}.ffn.moe.deepspeed_moe.gate.wg.weight                      (E, d)
    transformer.blocks.{i}.ffn.moe.deepspeed_moe.experts.deepspeed_experts.{j}.up_proj.weight
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import MptConfig, MptForCausalLM

from orchestrator.spec.schema import RunConfig

logger = logging.getLogger(__name__)


class ExpertMLP(nn.Module):
    """One expert: the dense MPT FFN without the residual add (DeepSpeed's experts take x only)."""

    def __init__(self, up_proj: nn.Module, act: nn.Module, down_proj: nn.Module) -> None:
        super().__init__()
        self.up_proj = up_proj
        self.act = act
        self.down_proj = down_proj

    @classmethod
    def from_dense(cls, mlp: nn.Module) -> ExpertMLP:
        """A copy of an `MptMLP`'s weights (the dense model is left untouched)."""
        parts = [copy.deepcopy(mlp.get_submodule(name)) for name in ("up_proj", "act", "down_proj")]
        return cls(*parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., d) -> (..., d)
        out: torch.Tensor = self.down_proj(self.act(self.up_proj(x)))
        return out


def _gate_weight(layer: nn.Module) -> torch.Tensor:
    """The router weight (E, d) of an MoE layer, whichever implementation built it."""
    # NOTE: DeepSpeed's TopKGate calls F.linear(x, self.wg.weight) directly, so a forward hook on
    # `wg` never fires; routing_top1 recomputes the logits from the weight instead.
    for path in ("deepspeed_moe.gate.wg.weight", "gate.wg.weight", "gate.weight"):
        obj: Any = layer
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, torch.Tensor):
            return obj
    raise AttributeError(
        f"{type(layer).__name__} has no router weight (looked for deepspeed_moe.gate.wg, gate)"
    )


class MoeFFN(nn.Module):
    """Drop-in for `MptBlock.ffn`: forward(hidden, residual) = MoE(hidden) + residual.

    Keeps the last forward's `l_aux`, `exp_counts` (tokens this rank routed to each global expert,
    before capacity dropping) and `top1` (the router's first choice per token, shape (b*s,)).
    """

    def __init__(self, moe: nn.Module, dropout_p: float = 0.0) -> None:
        super().__init__()
        self.moe = moe
        self.dropout_p = float(dropout_p)
        self.l_aux: torch.Tensor | None = None
        self.exp_counts: torch.Tensor | None = None
        self.top1: torch.Tensor | None = None

    def train(self, mode: bool = True) -> MoeFFN:
        super().train(mode)
        # NOTE: top-2 samples its second expert with Gumbel noise even in eval (docs/deepspeed-cpu.md,
        # "MoE evaluation"); keep DeepSpeed's sampling for training and make eval deterministic.
        gate = getattr(getattr(self.moe, "deepspeed_moe", None), "gate", None)
        if gate is not None and hasattr(gate, "top2_2nd_expert_sampling"):
            gate.top2_2nd_expert_sampling = mode
        return self

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        # hidden, residual: (b, s, d)
        with torch.no_grad():
            flat = hidden.detach().reshape(-1, hidden.shape[-1]).float()  # (b*s, d)
            self.top1 = F.linear(flat, _gate_weight(self.moe).detach().float()).argmax(dim=-1)  # (b*s,)
        out, l_aux, exp_counts = self.moe(hidden)
        self.l_aux = l_aux
        self.exp_counts = exp_counts.detach() if isinstance(exp_counts, torch.Tensor) else exp_counts
        out = F.dropout(out, p=self.dropout_p, training=self.training)
        return out + residual


def _make_moe_layer(cfg: RunConfig, hidden_size: int, expert: nn.Module) -> nn.Module:
    """The MoE layer for one block; forward(x (b, s, d)) -> (out (b, s, d), l_aux, exp_counts (E,))."""
    m = cfg.moe
    if m.implementation == "dropless":
        # NOTE: same names and contract as DeepSpeed's MoE; no capacity arguments (nothing is dropped).
        from worker.moe_dropless import DroplessMoE

        return DroplessMoE(
            hidden_size=hidden_size,
            expert=expert,
            num_experts=m.num_experts,
            ep_size=m.ep_size,
            k=m.top_k,
            noisy_gate_policy=None if m.noisy_gate_policy == "none" else m.noisy_gate_policy,
        )
    from deepspeed.moe.layer import MoE

    layer: nn.Module = MoE(
        hidden_size=hidden_size,
        expert=expert,
        num_experts=m.num_experts,
        ep_size=m.ep_size,
        k=m.top_k,
        capacity_factor=m.capacity_factor,
        eval_capacity_factor=m.eval_capacity,
        min_capacity=m.min_capacity,
        use_residual=False,
        noisy_gate_policy=None if m.noisy_gate_policy == "none" else m.noisy_gate_policy,
        drop_tokens=m.drop_tokens,
    )
    return layer


def dense_config(cfg: RunConfig, vocab_size: int | None = None) -> MptConfig:
    """The dense MPT's config: built from `model.tiny`, or read from the hub id or folder."""
    mc = cfg.model
    if mc.is_tiny:
        t = mc.tiny
        if t.expansion_ratio != 4:
            logger.warning(
                "model.tiny.expansion_ratio %d is ignored: transformers' MptMLP is always 4 x d_model",
                t.expansion_ratio,
            )
        return MptConfig(
            d_model=t.d_model,
            n_heads=t.n_heads,
            n_layers=t.n_layers,
            expansion_ratio=t.expansion_ratio,
            max_seq_len=t.max_seq_len,
            vocab_size=vocab_size if vocab_size is not None else t.vocab_size,
            no_bias=True,
            use_cache=False,
        )
    # NOTE: the explicit class reads the hub's MPT config natively; trust_remote_code only matters
    # to Auto classes (transformers warns and ignores it here).
    config = MptConfig.from_pretrained(mc.name_or_path, revision=mc.revision or "main")
    if vocab_size is not None:
        config.vocab_size = vocab_size
    return config


def load_dense_model(cfg: RunConfig, vocab_size: int) -> MptForCausalLM:
    """The dense parent in fp32: a seeded random tiny MPT, or an MPT from the hub or a folder."""
    mc = cfg.model
    with torch.random.fork_rng(devices=[]):
        # NOTE: the same seed on every rank gives identical initial weights without a broadcast.
        torch.manual_seed(cfg.training.seed)
        if mc.is_tiny:
            model = MptForCausalLM(dense_config(cfg, vocab_size))
        else:
            model = MptForCausalLM.from_pretrained(
                mc.name_or_path,
                revision=mc.revision or "main",
                trust_remote_code=mc.trust_remote_code,
                dtype=torch.float32,
            )
            if vocab_size > model.config.vocab_size:
                logger.info(
                    "resizing embeddings %d -> %d for the tokenizer", model.config.vocab_size, vocab_size
                )
                model.resize_token_embeddings(vocab_size)
    # NOTE: fp32 master weights; DeepSpeed casts for bf16/fp16. (model.float() is untyped.)
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.float()
    model.config.use_cache = False
    if mc.gradient_checkpointing:
        # NOTE: non-reentrant recomputation replays the MoE forward (all_to_all included) with the
        # same RNG state, so gradients equal those without checkpointing.
        enable: Any = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:  # transformers >= 5.x
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            enable = model.gradient_checkpointing_enable
            enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def upcycle(model: MptForCausalLM, cfg: RunConfig) -> MptForCausalLM:
    """Replace the chosen blocks' FFNs by MoE layers whose experts all start as the dense FFN."""
    blocks = model.transformer.blocks
    indices = cfg.moe.moe_layer_indices(len(blocks))
    bad = [i for i in indices if i >= len(blocks)]
    if bad:
        from orchestrator.errors import ConfigError, ConfigIssue

        raise ConfigError(
            [
                ConfigIssue(
                    "moe.layers", f"layer indices {bad} do not exist: the model has {len(blocks)} blocks"
                )
            ]
        )
    hidden_size = int(model.config.hidden_size)
    with torch.random.fork_rng(devices=[]):
        # NOTE: the gates are fresh nn.Linear layers; seeding makes them identical on all ranks.
        torch.manual_seed(cfg.training.seed + 1)
        for i in indices:
            dense = blocks[i].get_submodule("ffn")
            layer = _make_moe_layer(cfg, hidden_size, ExpertMLP.from_dense(dense))
            blocks[i].ffn = MoeFFN(layer, dropout_p=float(getattr(dense, "hidden_dropout", 0.0)))
    model.train(model.training)  # sets the top-2 sampling flag for the current mode
    logger.info("upcycled blocks %s into %d experts (top-%d)", indices, cfg.moe.num_experts, cfg.moe.top_k)
    return model


def build_model(cfg: RunConfig, vocab_size: int) -> MptForCausalLM:
    """The model the worker trains: the dense MPT, upcycled when `moe.enabled`."""
    model = load_dense_model(cfg, vocab_size)
    if cfg.moe.enabled:
        model = upcycle(model, cfg)
    return model


def moe_layers(model: nn.Module) -> list[MoeFFN]:
    """The MoE FFNs in block order."""
    return [m for m in model.modules() if isinstance(m, MoeFFN)]


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the last forward's load-balancing losses (0 for a dense model)."""
    losses = [m.l_aux for m in moe_layers(model) if m.l_aux is not None]
    if not losses:
        return torch.zeros((), device=next(model.parameters()).device)
    total = losses[0]
    for loss in losses[1:]:
        total = total + loss
    return total


def expert_token_counts(model: nn.Module) -> list[torch.Tensor]:
    """Per MoE layer: tokens this rank routed to each global expert in the last forward, (E,)."""
    return [m.exp_counts for m in moe_layers(model) if m.exp_counts is not None]


def routing_top1(model: nn.Module) -> list[torch.Tensor]:
    """Per MoE layer: the router's first-choice expert of every token of the last forward, (b*s,)."""
    return [m.top1 for m in moe_layers(model) if m.top1 is not None]


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices, none on norms; expert parameters split into MoE groups."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups: list[dict[str, Any]] = [{"params": decay, "name": "decay", "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "name": "no_decay", "weight_decay": 0.0})
    if not moe_layers(model):
        return groups
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    split = split_params_into_different_moe_groups_for_optimizer(groups)
    return [g for g in split if g["params"]]
