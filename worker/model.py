"""MPT loading and sparse upcycling of its FFNs into `deepspeed.moe.layer.MoE`.

The training loop calls `build_model`, then reads the MoE side channels after each forward:
`moe_aux_loss`, `moe_label_loss`, `expert_token_counts` and `routing_top1`.

Real tokens only: a forward pre-hook on the model hands the call's `attention_mask` to every MoE
layer, which routes only the tokens it marks (DeepSpeed's layer through `worker.moe_gate`, the
dropless one by itself): padding takes no expert capacity and counts in no load statistic or
loss. Label routing: `set_label_routing` gives each layer the (labels, E) table of allowed experts
once; `set_token_labels` gives the next forward each token's label id (one-shot, training only).
`optimizer_param_groups` gives the groups DeepSpeed needs (expert parameters in their own group, or
DeepSpeed asserts).

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
    # `wg` never fires; without a mask (its own gate runs) routing_top1 recomputes the logits.
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

    Keeps the last forward's `l_aux`, `exp_counts` (real tokens this rank routed to each global
    expert, before capacity dropping), `top1` (the router's first choice per token, shape (b*s,),
    taken from the gate's own logits; padding included, -1 or any expert: readers mask it) and
    `label_loss` (None unless label routing ran).
    """

    def __init__(self, moe: nn.Module, dropout_p: float = 0.0) -> None:
        super().__init__()
        self.moe = moe
        self.dropout_p = float(dropout_p)
        self.l_aux: torch.Tensor | None = None
        self.exp_counts: torch.Tensor | None = None
        self.top1: torch.Tensor | None = None
        self.label_loss: torch.Tensor | None = None
        self.token_mask: torch.Tensor | None = None  # (b, s) of the current forward; None: all real
        self.token_labels: torch.Tensor | None = None  # (b, s) label id per token, -1: none
        self.label_experts: torch.Tensor | None = None  # (labels, E) bool: each label's experts

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
        used = None
        if self.token_mask is not None:
            if self.token_mask.shape != hidden.shape[:-1]:
                raise ValueError(
                    f"token mask {tuple(self.token_mask.shape)} does not match the hidden states "
                    f"{tuple(hidden.shape[:-1])}"
                )
            used = self.token_mask.reshape(-1).to(device=hidden.device, dtype=torch.int64)  # (b*s,)
        out, l_aux, exp_counts = self.moe(hidden) if used is None else self.moe(hidden, used)
        self.top1 = self._first_choice(hidden)
        self.label_loss = self._label_loss(hidden, used) if self.training else None
        self.l_aux = l_aux
        self.exp_counts = exp_counts.detach() if isinstance(exp_counts, torch.Tensor) else exp_counts
        out = F.dropout(out, p=self.dropout_p, training=self.training)
        return out + residual

    def _first_choice(self, hidden: torch.Tensor) -> torch.Tensor:
        """(b*s,) the router's first choice per token of the forward that just ran.

        The gate's own, when it recorded one (`first_choice`: both of our gates do, from the logits
        they routed with; padding -1); else (DeepSpeed's gate without a mask) recomputed from the
        router weight."""
        gate: Any = getattr(getattr(self.moe, "deepspeed_moe", None), "gate", None)
        choice = getattr(gate, "first_choice", None)
        if isinstance(choice, torch.Tensor):
            gate.first_choice = None  # one-shot: never read a stale forward's choice
            return choice
        with torch.no_grad():
            flat = hidden.detach().reshape(-1, hidden.shape[-1]).float()  # (b*s, d)
            top1: torch.Tensor = F.linear(flat, _gate_weight(self.moe).detach().float()).argmax(dim=-1)
        return top1

    def _label_loss(self, hidden: torch.Tensor, used: torch.Tensor | None) -> torch.Tensor | None:
        """Mean over the real, guided tokens of -log(router probability of the token's experts)."""
        if self.token_labels is None or self.label_experts is None:
            return None
        labels = self.token_labels.reshape(-1).to(hidden.device)  # (b*s,)
        if labels.shape[0] != hidden.shape[:-1].numel():
            raise ValueError(
                f"token labels {tuple(self.token_labels.shape)} do not match {tuple(hidden.shape[:-1])}"
            )
        table = self.label_experts.to(hidden.device)  # (labels, E)
        guided = (labels >= 0) & table[labels.clamp(min=0)].any(dim=-1)  # (b*s,) a label with experts
        if used is not None:
            guided &= used.bool()
        rows = guided.nonzero().squeeze(1)  # (n,)
        if rows.numel() == 0:
            return None
        x = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows).float()  # (n, d)
        logp = F.log_softmax(F.linear(x, _gate_weight(self.moe).float()), dim=-1)  # (n, E)
        allowed = table[labels.index_select(0, rows)]  # (n, E)
        return -(logp.masked_fill(~allowed, float("-inf")).logsumexp(dim=-1)).mean()


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

    from worker.moe_gate import mask_gate

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
    return mask_gate(layer)  # NOTE: DeepSpeed's own gate masks top-1 only and sizes capacity with padding


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
    # NOTE: a plain tuple in __dict__, not a registered attribute: the layers stay where they are.
    model.__dict__[MOE_LAYERS] = tuple(m for m in model.modules() if isinstance(m, MoeFFN))
    model.register_forward_pre_hook(_route_real_tokens, with_kwargs=True)
    logger.info("upcycled blocks %s into %d experts (top-%d)", indices, cfg.moe.num_experts, cfg.moe.top_k)
    return model


PENDING_LABELS = "_moe_pending_token_labels"


def _route_real_tokens(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Forward pre-hook: this call's `attention_mask` (None: every token is real) and the pending
    token labels go to every MoE layer, so a stale mask can never outlive its batch."""
    mask = kwargs.get("attention_mask")
    labels = getattr(model, PENDING_LABELS, None)
    setattr(model, PENDING_LABELS, None)  # one-shot: set again before each training forward
    for layer in moe_layers(model):
        layer.token_mask = mask.bool() if isinstance(mask, torch.Tensor) else None
        layer.token_labels = labels
    return args, kwargs


def set_token_labels(model: nn.Module, token_labels: torch.Tensor | None) -> None:
    """Each token's label id (b, s) (-1: none) for the next forward's label-routing loss only."""
    setattr(model, PENDING_LABELS, token_labels)


def label_expert_table(assignment: dict[str, list[int]], labels: list[str], num_experts: int) -> torch.Tensor:
    """(labels, E) bool: row i marks the experts of `labels[i]` (all False: the label is not guided)."""
    table = torch.zeros((max(len(labels), 1), num_experts), dtype=torch.bool)
    for i, label in enumerate(labels):
        for expert in assignment.get(label, []):
            table[i, expert] = True
    return table


def set_label_routing(model: nn.Module, table: torch.Tensor | None) -> None:
    """Give every MoE layer the label -> experts table (None turns label routing off)."""
    for layer in moe_layers(model):
        layer.label_experts = table


def build_model(cfg: RunConfig, vocab_size: int) -> MptForCausalLM:
    """The model the worker trains: the dense MPT, upcycled when `moe.enabled`."""
    model = load_dense_model(cfg, vocab_size)
    if cfg.moe.enabled:
        model = upcycle(model, cfg)
    return model


MOE_LAYERS = "_moe_ffn_layers"


def moe_layers(model: nn.Module) -> list[MoeFFN]:
    """The MoE FFNs in block order (recorded by `upcycle`, else found by walking the modules)."""
    # NOTE: walking the ~300 modules twice per forward (the pre-hook, the aux loss) cost ~5 ms of
    # CPU per step on bench/train_step.py's shape.
    recorded = model.__dict__.get(MOE_LAYERS)
    if recorded is not None:
        return list(recorded)
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


def moe_label_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the last forward's label-routing losses over the MoE layers (None: none ran)."""
    losses = [m.label_loss for m in moe_layers(model) if m.label_loss is not None]
    if not losses:
        return None
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


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """torch's AdamW over `optimizer_param_groups`, fused: one pass over each tensor.

    # NOTE: ZeRO-1/2 hands the optimizer ONE flat fp32 partition per parameter group, so
    # `foreach=True` has nothing to batch (measured on 9 M elements, one CPU thread: 50 ms per
    # step single-tensor, 34 ms foreach, 5 ms fused). The default (foreach=None) picks the
    # single-tensor path on CPU: ~10 elementwise passes. Fused results differ from it in the last
    # bit of ~0.2 % of the elements (the same maths, other rounding), so a run's trajectory is its
    # own: tests/assets/losses were re-recorded with it.
    """
    groups = optimizer_param_groups(model, weight_decay)
    return torch.optim.AdamW(groups, lr=lr, fused=True)


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
