"""Routing of real tokens only in `deepspeed.moe.layer.MoE`: `MaskedTopKGate`.

DeepSpeed's `TopKGate` takes a `used_token` mask for top-1 only (top-2 ignores it), sizes the
expert capacity from every token of the batch, padding included, and averages the load-balancing
loss over all of them. `MaskedTopKGate` is a drop-in subclass (same `wg` parameter, same
constructor) that, given a mask, routes the real tokens exactly as DeepSpeed routes a batch that
holds only those tokens:

    real = rows of the mask          (n of the S tokens)
    DeepSpeed's own top1gating / top2gating on the n real tokens' logits
      -> capacity, locations, gates, l_aux and exp_counts of the real tokens alone
    padding rows get expert index -1 (DeepSpeed's "evicted" route: no slot, output 0)

so padding takes no capacity slot, does not size the capacity, and counts in neither the load
statistics nor the load-balancing loss; the noise draws (RSample, Jitter, top-2 sampling) have the
shape of the real tokens, so a padded batch routes bit for bit like the same tokens unpadded.

# NOTE: with expert parallelism every rank's dispatch buffer (E, C, d) must have the same C for the
# all_to_all. DeepSpeed gets that from an equal token count per rank (the loop pads micro-batches to
# a common length); real-token counts differ per rank, so the capacity is all-reduced (MAX) over the
# expert-parallel group. Each rank still drops against the capacity of its own real tokens, as
# DeepSpeed would for an unpadded batch; the larger buffer only holds empty slots.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.moe.sharded_moe import TopKGate, multiplicative_jitter, top1gating, top2gating
from torch import nn

logger = logging.getLogger(__name__)


class MaskedTopKGate(TopKGate):  # type: ignore[misc]  # deepspeed is untyped
    """`TopKGate` whose `used_token` mask works for k = 1 and 2 (see the module docstring).

    forward(input (S, d), used_token (S,) | None, sparse_routes, use_tutel) -> DeepSpeed's sparse
    routes: (l_aux (), capacity, E, indices (k, S) int32, locations (k, S) int32, gates (k, S),
    exp_counts (E,)). Without a mask it is DeepSpeed's gate unchanged. With one it also records
    `first_choice` (S,): the argmax of its logits per real token, -1 for padding (the routing
    statistics read it instead of computing the logits a second time).
    """

    first_choice: torch.Tensor | None = None

    @classmethod
    def replacing(cls, gate: TopKGate) -> MaskedTopKGate:
        """A masked gate with `gate`'s settings and router weight (the seeded initialisation kept)."""
        new = cls(
            int(gate.wg.in_features), int(gate.wg.out_features), k=gate.k,
            capacity_factor=gate.capacity_factor, eval_capacity_factor=gate.eval_capacity_factor,
            min_capacity=gate.min_capacity, noisy_gate_policy=gate.noisy_gate_policy,
            drop_tokens=gate.drop_tokens, use_rts=gate.use_rts, ep_group=gate.ep_group,
            top2_2nd_expert_sampling=gate.top2_2nd_expert_sampling,
        )  # fmt: skip
        with torch.no_grad():
            new.wg.weight.copy_(gate.wg.weight)
        return new

    def forward(
        self,
        input: torch.Tensor,
        used_token: torch.Tensor | None = None,
        sparse_routes: bool = False,
        use_tutel: bool = False,
    ) -> Any:
        if used_token is None:
            return super().forward(input, None, sparse_routes, use_tutel)
        if not sparse_routes or use_tutel:
            raise NotImplementedError("MaskedTopKGate gives sparse routes only (DeepSpeed >= 0.19 dispatch)")
        if self.k not in (1, 2):
            raise NotImplementedError(f"MaskedTopKGate routes top-1 or top-2, not top-{self.k}")
        rows = used_token.reshape(-1).bool().nonzero().squeeze(1)  # (n,) real tokens
        x = input.index_select(0, rows).float()  # (n, d)
        if self.noisy_gate_policy == "Jitter" and self.training:
            x = multiplicative_jitter(x, device=x.device)
        logits = nn.functional.linear(x, weight=self.wg.weight.float())  # (n, E)
        num_tokens = input.shape[0]
        # the first choice per token for the routing statistics (worker.model.MoeFFN.top1)
        first = logits.argmax(dim=1)  # (n,)
        self.first_choice = first.new_full((num_tokens,), -1).index_copy_(0, rows, first)  # (S,)
        capacity_factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if self.k == 1:
            noisy = self.noisy_gate_policy if self.training else None
            out = top1gating(logits, capacity_factor, self.min_capacity, None, noisy, self.drop_tokens,
                             self.use_rts, self.ep_group, True, False)  # fmt: skip
        else:
            out = top2gating(logits, capacity_factor, self.min_capacity, self.drop_tokens, self.ep_group,
                             self.top2_2nd_expert_sampling, True)  # fmt: skip
        l_aux, capacity, num_experts, indices, locations, gates, exp_counts = out
        capacity = torch.as_tensor(capacity, dtype=torch.int64, device=logits.device).reshape(())
        if self.ep_group is not None and dist.get_world_size(group=self.ep_group) > 1:
            dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=self.ep_group)
        k = indices.shape[0]
        full_indices = indices.new_full((k, num_tokens), -1)  # (k, S): padding is never routed
        full_indices[:, rows] = indices
        full_locations = locations.new_zeros((k, num_tokens))  # (k, S)
        full_locations[:, rows] = locations
        full_gates = gates.new_zeros((k, num_tokens))  # (k, S)
        full_gates[:, rows] = gates
        return l_aux, capacity, num_experts, full_indices, full_locations, full_gates, exp_counts


def mask_gate(layer: nn.Module) -> nn.Module:
    """Swap the `TopKGate` of a `deepspeed.moe.layer.MoE` for a `MaskedTopKGate` (in place)."""
    moe_layer: Any = layer.get_submodule("deepspeed_moe")
    moe_layer.gate = MaskedTopKGate.replacing(moe_layer.gate)
    return layer
