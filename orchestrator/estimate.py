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
    from orchestrator.config import RunConfig


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
    params: ParamCounts
    # Bytes per rank, split the way ZeRO partitions them.
    non_expert_params_grads: int
    expert_params_grads: int
    non_expert_optimizer: int
    expert_optimizer: int

    @property
    def total_bytes(self) -> int:
        return (
            self.non_expert_params_grads
            + self.expert_params_grads
            + self.non_expert_optimizer
            + self.expert_optimizer
        )

    @property
    def total_gb(self) -> float:
        return self.total_bytes / 1e9


def estimate_memory(cfg: RunConfig) -> MemoryEstimate | None:
    """ZeRO-1/2 model states per rank; None when the architecture is unknown offline.

    Replicated on every rank: parameters and gradients in the training dtype (2 bytes each in
    bf16/fp16, 4 in fp32). Partitioned: 16 bytes per parameter (fp32 master copy, fp32 gradient
    partition, Adam's two moments), the same split DeepSpeed's ZeRO-2 estimator assumes. Expert
    parameters live on 1/ep_size of the ranks, and their partitioned states are split over the
    expert-data-parallel group (world / ep_size) only.
    """
    arch = architecture(cfg)
    if arch is None:
        return None
    counts = count_params(arch, cfg)
    width = 4 if cfg.training.precision == "fp32" else 2
    world = cfg.world_size
    ep = cfg.ep_size
    edp = cfg.expert_data_parallel_size
    experts_local = counts.expert // ep
    if cfg.training.zero_stage == 0:
        # No partitioning: every rank holds all optimizer state of what it owns.
        ne_opt, ex_opt = 16 * counts.non_expert, 16 * experts_local
    elif cfg.training.zero_stage == 1:
        # Stage 1 partitions only the optimizer states; the fp32 gradient is not kept apart.
        ne_opt, ex_opt = 12 * counts.non_expert // world, 12 * experts_local // edp
    else:
        ne_opt, ex_opt = 16 * counts.non_expert // world, 16 * experts_local // edp
    return MemoryEstimate(
        params=counts,
        non_expert_params_grads=2 * width * counts.non_expert,
        expert_params_grads=2 * width * experts_local,
        non_expert_optimizer=ne_opt,
        expert_optimizer=ex_opt,
    )
