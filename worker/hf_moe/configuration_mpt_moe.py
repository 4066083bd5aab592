"""Configuration of an MPT whose chosen blocks have a Mixture-of-Experts FFN (`model_type: mpt_moe`).

Self-contained: imports only transformers, because it is copied next to exported weights and loaded
with `trust_remote_code=True` where moe-orch and DeepSpeed are not installed.
"""

from __future__ import annotations

from transformers import MptConfig


class MptMoeConfig(MptConfig):  # type: ignore[no-untyped-call]
    """`MptConfig` plus the MoE layout written by moe-orch's export."""

    model_type = "mpt_moe"

    num_experts: int = 4
    """Experts per MoE layer."""

    num_experts_per_tok: int = 1
    """Experts each token is routed to (1 or 2; moe-orch's `moe.top_k`).

    NOTE: named like Mixtral's field, not `top_k`: generation reads a config's `top_k` as its
    sampling parameter."""

    moe_layers: list[int] | None = None
    """Indices of the blocks whose FFN is an MoE layer; unset means every block."""

    def moe_layer_indices(self) -> list[int]:
        if self.moe_layers is None:
            return list(range(self.n_layers))
        return sorted(int(i) for i in self.moe_layers)


__all__ = ["MptMoeConfig"]
