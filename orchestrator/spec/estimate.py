"""Parameter counts and ZeRO model-state memory per GPU, without downloading anything.

The estimate covers model states only (parameters, gradients, optimizer states), as DeepSpeed's
own `estimate_zero2_model_states_mem_needs` does; activations come on top.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.spec.schema import RunConfig


@dataclass(frozen=True)
class MptArch:
    d_model: int
    n_layers: int
    n_heads: int
    expansion_ratio: int
    vocab_size: int


# MPT checkpoints we know by name (their config.json values), so `validate` can size a run offline.
KNOWN_MPT: dict[str, MptArch] = {
    "mosaicml/mpt-7b": MptArch(4096, 32, 32, 4, 50432),
    "mosaicml/mpt-7b-instruct": MptArch(4096, 32, 32, 4, 50432),
    "mosaicml/mpt-7b-chat": MptArch(4096, 32, 32, 4, 50432),
    "mosaicml/mpt-7b-storywriter": MptArch(4096, 32, 32, 4, 50432),
    "mosaicml/mpt-7b-8k": MptArch(4096, 32, 32, 4, 50432),
    "mosaicml/mpt-30b": MptArch(7168, 48, 64, 4, 50432),
    "mosaicml/mpt-30b-instruct": MptArch(7168, 48, 64, 4, 50432),
    "mosaicml/mpt-30b-chat": MptArch(7168, 48, 64, 4, 50432),
    "mosaicml/mpt-1b-redpajama-200b": MptArch(2048, 24, 16, 4, 50432),
}


def architecture(cfg: RunConfig) -> MptArch | None:
    """The MPT architecture named by the config, or None when it cannot be known offline."""
    m = cfg.model
    if m.is_tiny:
        t = m.tiny
        return MptArch(t.d_model, t.n_layers, t.n_heads, t.expansion_ratio, t.vocab_size)
    if m.name_or_path in KNOWN_MPT:
        return KNOWN_MPT[m.name_or_path]
    config_json = Path(m.name_or_path).expanduser() / "config.json"
    if config_json.is_file():
        try:
            raw = json.loads(config_json.read_text())
            return MptArch(
                int(raw["d_model"]),
                int(raw["n_layers"]),
                int(raw["n_heads"]),
                int(raw.get("expansion_ratio", 4)),
                int(raw["vocab_size"]),
            )
        except (KeyError, ValueError, TypeError):
            return None
    return None


@dataclass(frozen=True)
class ParamCounts:
    non_expert: int  # embeddings, attention, norms, gates, dense FFNs (replicated on every rank)
    expert: int  # all experts of all MoE layers (split over ep_size ranks)
    dense_parent: int  # the model before upcycling

    @property
    def total(self) -> int:
        return self.non_expert + self.expert

    def active_per_token(self, top_k: int, num_experts: int) -> int:
        """Parameters a token passes through (for FLOP estimates)."""
        if not self.expert:
            return self.total
        return self.non_expert + self.expert * top_k // num_experts


def count_params(arch: MptArch, cfg: RunConfig) -> ParamCounts:
    """MPT with `no_bias=True` (the MPT default): tied embeddings, bias-free LayerNorms."""
    d, e = arch.d_model, arch.expansion_ratio
    embed = arch.vocab_size * d  # tied with the LM head
    attn = 4 * d * d  # Wqkv (3d x d) + out_proj (d x d)
    norms = 2 * d
    ffn = 2 * e * d * d  # up_proj + down_proj
    final_norm = d
    dense = embed + arch.n_layers * (attn + norms + ffn) + final_norm
    moe_layers = cfg.moe.moe_layer_indices(arch.n_layers)
    n_moe = len(moe_layers)
    experts = n_moe * cfg.moe.num_experts * ffn
    gates = n_moe * d * cfg.moe.num_experts
    non_expert = dense - n_moe * ffn + gates
    return ParamCounts(non_expert=non_expert, expert=experts, dense_parent=dense)


@dataclass(frozen=True)
class MemoryEstimate:
    """Model-state bytes per rank, split the way ZeRO keeps them (activations come on top)."""

    params: ParamCounts
    zero_stage: int
    # Held in full by every rank that owns the parameters: the training-dtype weights (and, below
    # ZeRO-2, their gradients).
    non_expert_replicated: int
    expert_replicated: int
    # Split over the data-parallel group (non-expert) or the expert-data-parallel group (experts):
    # gradients from ZeRO-2 on, the fp32 master weights and Adam's two moments.
    non_expert_partitioned: int
    expert_partitioned: int

    @property
    def non_expert_bytes(self) -> int:
        return self.non_expert_replicated + self.non_expert_partitioned

    @property
    def expert_bytes(self) -> int:
        return self.expert_replicated + self.expert_partitioned

    @property
    def total_bytes(self) -> int:
        return self.non_expert_bytes + self.expert_bytes

    @property
    def total_gb(self) -> float:
        return self.total_bytes / 1e9


def bytes_per_param(precision: str, zero_stage: int) -> tuple[int, int]:
    """(replicated, partitioned) bytes per parameter for a precision and ZeRO stage.

    Mixed precision (bf16/fp16) follows DeepSpeed's `estimate_zero2_model_states_mem_needs`:
    2 bytes of 16-bit weights on every rank, and 18 partitioned bytes (16-bit gradient, fp32
    gradient, fp32 master weight, Adam's two fp32 moments). In fp32 the weights are 4 bytes and the
    gradient needs no second copy: 4 + 16 partitioned bytes (gradient, master copy, two moments).
    Below ZeRO-2 the gradient is not partitioned; at ZeRO-0 nothing is.
    """
    width = 4 if precision == "fp32" else 2
    grad16 = width if precision != "fp32" else 0  # the extra half-precision gradient buffer
    states = 4 + 4 + 8  # fp32 gradient partition, fp32 master weights, Adam exp_avg + exp_avg_sq
    if zero_stage == 0:
        return width + grad16 + states, 0
    if zero_stage == 1:
        return width + grad16, states
    if zero_stage == 2:
        return width, grad16 + states
    return 0, width + grad16 + states  # stage 3 (dense only): everything partitioned


def estimate_memory(cfg: RunConfig) -> MemoryEstimate | None:
    """ZeRO model states per rank; None when the architecture is unknown offline.

    Non-expert parameters live on every rank and ZeRO splits their partitioned states over the
    whole data-parallel group (world size). Each rank holds `1/ep_size` of the experts, and their
    partitioned states are split over the expert-data-parallel group (world / ep_size) only. For a
    dense layout in bf16 with ZeRO-2 this equals DeepSpeed's `estimate_zero2_model_states_mem_needs`
    GPU figure (checked in tests).
    """
    arch = architecture(cfg)
    if arch is None:
        return None
    counts = count_params(arch, cfg)
    stage = cfg.training.zero_stage
    replicated, partitioned = bytes_per_param(cfg.training.precision, stage)
    experts_local = counts.expert // cfg.ep_size
    return MemoryEstimate(
        params=counts,
        zero_stage=stage,
        non_expert_replicated=replicated * counts.non_expert,
        expert_replicated=replicated * experts_local,
        non_expert_partitioned=partitioned * counts.non_expert // cfg.data_parallel_size,
        expert_partitioned=partitioned * experts_local // cfg.expert_data_parallel_size,
    )
