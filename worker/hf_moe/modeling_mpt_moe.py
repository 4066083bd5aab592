"""MPT with dropless top-k Mixture-of-Experts FFNs, in plain torch (`model_type: mpt_moe`).

Self-contained: imports only torch and transformers, because it is copied next to exported weights
and loaded with `trust_remote_code=True` where moe-orch and DeepSpeed are not installed.

Gating follows `deepspeed.moe.sharded_moe.TopKGate` (without noise and without capacity):
logits = x @ wg.T in fp32, probabilities = softmax(logits); top-1 weights an expert by its
probability, top-2 renormalises the two probabilities to sum to 1. Every token reaches its experts.

Parameter names mirror DeepSpeed's, so export is a rename:
    transformer.blocks.{i}.ffn.gate.wg.weight               (num_experts, d_model)
    transformer.blocks.{i}.ffn.experts.{e}.up_proj.weight   (4 * d_model, d_model)
    transformer.blocks.{i}.ffn.experts.{e}.down_proj.weight (d_model, 4 * d_model)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import MptForCausalLM

from .configuration_mpt_moe import MptMoeConfig


class MptMoeExpert(nn.Module):
    """One expert: MPT's FFN without the residual add."""

    def __init__(self, config: MptMoeConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.up_proj = nn.Linear(d, 4 * d, bias=False)
        self.act = nn.GELU(approximate="none")
        self.down_proj = nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(self.act(self.up_proj(x)))
        return out


class MptMoeGate(nn.Module):
    """The router: a bias-free linear map from the hidden state to one logit per expert."""

    def __init__(self, config: MptMoeConfig) -> None:
        super().__init__()
        self.wg = nn.Linear(config.hidden_size, config.num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (tokens, d) -> logits (tokens, E), in fp32 like DeepSpeed
        return F.linear(x.float(), self.wg.weight.float())


class MptMoeFFN(nn.Module):
    """Drop-in for `MptMLP`: forward(hidden, residual) = MoE(hidden) + residual."""

    def __init__(self, config: MptMoeConfig) -> None:
        super().__init__()
        if config.num_experts_per_tok not in (1, 2):
            raise ValueError(f"num_experts_per_tok must be 1 or 2, got {config.num_experts_per_tok}")
        self.top_k = int(config.num_experts_per_tok)
        self.num_experts = int(config.num_experts)
        self.gate = MptMoeGate(config)
        self.experts = nn.ModuleList(MptMoeExpert(config) for _ in range(self.num_experts))
        self.hidden_dropout = float(getattr(config.attn_config, "attn_pdrop", 0.0))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert indices (tokens, k) and their combine weights (tokens, k), fp32."""
        probs = F.softmax(self.gate(x), dim=-1)  # (tokens, E)
        weights, indices = torch.topk(probs, k=self.top_k, dim=-1)  # (tokens, k)
        if self.top_k == 2:
            denom = weights.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(weights.dtype).eps)
            weights = weights / denom
        return indices, weights

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (tokens, d)
        indices, weights = self.route(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.nonzero(indices == e, as_tuple=True)
            if token_idx.numel() == 0:
                continue
            y = expert(x[token_idx]) * weights[token_idx, slot].unsqueeze(-1).to(x.dtype)
            out.index_add_(0, token_idx, y)
        out = F.dropout(out.reshape(shape), p=self.hidden_dropout, training=self.training)
        return out + residual


class MptMoeForCausalLM(MptForCausalLM):  # type: ignore[no-untyped-call]
    """`MptForCausalLM` whose blocks in `config.moe_layers` carry an `MptMoeFFN`."""

    config_class = MptMoeConfig

    def __init__(self, config: MptMoeConfig) -> None:
        super().__init__(config)
        for i in config.moe_layer_indices():
            self.transformer.blocks[i].ffn = MptMoeFFN(config)
        self.post_init()  # type: ignore[no-untyped-call]


__all__ = ["MptMoeFFN", "MptMoeForCausalLM"]
