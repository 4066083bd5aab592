"""The sort-based dropless MoE layer (`moe.implementation: dropless`).

A `deepspeed.moe.layer.MoE` (subclass) with the same constructor arguments, the same
`forward(hidden) -> (output, l_aux, exp_counts)` contract, the same parameter names and the same
gating maths as DeepSpeed's `TopKGate` for k = 1 and k = 2. What differs is the dispatch:

    DeepSpeed: route -> capacity C per expert (tokens over C are dropped) -> (E, C, d) buffer
               -> all_to_all of the whole buffer, empty slots included
    here:      route -> sort the S*k (token, expert) assignments by expert -> gather the token rows
               -> [ep_size > 1: all_to_all of the counts, then of exactly the rows each EP rank's
                  experts receive] -> each local expert runs on its contiguous slice
               -> [all_to_all back] -> scatter-add the weighted rows into place

so no token is ever dropped and no capacity padding is computed or sent (MegaBlocks-style).

Being an `MoE` to DeepSpeed's engine, the layer gets what the stock layer gets: its expert
parameters (DeepSpeed's `Experts`: `allreduce=False`, `group_name` `ep_size_<E>`) are reduced over
the expert-data-parallel group only, the engine creates the EP groups (`set_deepspeed_parallelism`)
and saves one `layer_{L}_expert_{E}` file per global expert, so checkpoints, resharding and the
export read it like the stock layer. Parameter names match DeepSpeed's:
    deepspeed_moe.gate.wg.weight                                   (E, d)
    deepspeed_moe.experts.deepspeed_experts.{i}.<expert params>    i: local id, global = EP rank x E/ep + i

# NOTE: checkpoints of this layer written before it had expert parallelism (issue 14) kept the
# experts in the module states; they do not load into it (the expert files are missing).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.moe.experts import Experts
from deepspeed.moe.layer import MoE
from torch import nn

logger = logging.getLogger(__name__)


def _gumbel(shape: torch.Size, device: torch.device) -> torch.Tensor:
    # NOTE: the same distribution object and draw as DeepSpeed's `gumbel_rsample`, so with the same
    # torch RNG state both layers sample the same top-2 second expert.
    zero = torch.tensor(0.0, device=device)
    one = torch.tensor(1.0, device=device)
    return torch.distributions.gumbel.Gumbel(zero, one).rsample(shape)


def _jitter(x: torch.Tensor, epsilon: float = 1e-2) -> torch.Tensor:
    """DeepSpeed's `multiplicative_jitter`: x times U(1 - eps, 1 + eps)."""
    low = torch.tensor(1.0 - epsilon, device=x.device)
    high = torch.tensor(1.0 + epsilon, device=x.device)
    return x * torch.distributions.uniform.Uniform(low, high).rsample(x.shape)


class DroplessGate(nn.Module):
    """The router: DeepSpeed `TopKGate` semantics for k = 1 and 2, without capacity.

    forward(x (S, d)) -> (weights (S, k), indices (S, k), l_aux (), exp_counts (E,))
    - top-1: weight = softmax probability of the chosen expert (not renormalised).
    - top-2: the two probabilities renormalised to sum to 1; the second expert is the argmax of the
      logits (plus Gumbel noise when `top2_2nd_expert_sampling`) with the first one masked out.
    - l_aux = E * sum_e(mean_s(prob_e) * fraction of tokens whose first choice is e).
    - exp_counts = assignments per expert (first and second choices), as DeepSpeed counts them.
    """

    def __init__(
        self,
        model_dim: int,
        num_experts: int,
        k: int = 1,
        noisy_gate_policy: str | None = None,
        top2_2nd_expert_sampling: bool = True,
    ) -> None:
        super().__init__()
        if k not in (1, 2):
            raise ValueError(f"the dropless gate supports top_k 1 or 2, got {k}")
        if noisy_gate_policy not in (None, "None", "Jitter", "RSample"):
            raise ValueError(
                f"noisy_gate_policy must be None, 'Jitter' or 'RSample', got {noisy_gate_policy!r}"
            )
        self.wg = nn.Linear(model_dim, num_experts, bias=False)
        self.k = k
        self.num_experts = num_experts
        self.noisy_gate_policy = None if noisy_gate_policy == "None" else noisy_gate_policy
        self.top2_2nd_expert_sampling = top2_2nd_expert_sampling
        self.first_choice: torch.Tensor | None = None  # (S,) argmax of the last forward's logits

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: (S, d). Routing is computed in fp32 whatever the model dtype, as DeepSpeed does.
        x32 = x.float()
        if self.noisy_gate_policy == "Jitter" and self.training:
            x32 = _jitter(x32)
        logits = F.linear(x32, self.wg.weight.float())  # (S, E)
        gates = F.softmax(logits, dim=1)  # (S, E)
        num_tokens, num_experts = gates.shape
        me = gates.mean(dim=0)  # (E,)
        first = torch.argmax(gates, dim=1)  # (S,) the router's first choice (routing statistics)
        self.first_choice = first

        if self.k == 1:
            if self.noisy_gate_policy == "RSample" and self.training:
                idx1 = torch.argmax(logits + _gumbel(logits.shape, logits.device), dim=1)  # (S,)
            else:
                idx1 = first
            counts1 = torch.bincount(idx1, minlength=num_experts)  # (E,)
            ce = counts1.float() / num_tokens
            l_aux = torch.sum(me * ce) * num_experts
            weights = gates.gather(1, idx1.unsqueeze(1))  # (S, 1)
            return weights, idx1.unsqueeze(1), l_aux, counts1

        idx1 = first
        if self.top2_2nd_expert_sampling:
            logits = logits + _gumbel(logits.shape, logits.device)
        idx2 = torch.argmax(logits.scatter(1, idx1.unsqueeze(1), float("-inf")), dim=1)  # (S,)
        counts1 = torch.bincount(idx1, minlength=num_experts)  # (E,)
        counts2 = torch.bincount(idx2, minlength=num_experts)  # (E,)
        ce = counts1.float() / num_tokens
        # NOTE: DeepSpeed writes top-2's loss as mean * E * E (= top-1's sum * E); kept verbatim.
        l_aux = torch.mean(me * ce) * num_experts * num_experts
        g1 = gates.gather(1, idx1.unsqueeze(1))  # (S, 1)
        g2 = gates.gather(1, idx2.unsqueeze(1))  # (S, 1)
        denom = torch.clamp(g1 + g2, min=torch.finfo(gates.dtype).eps)
        weights = torch.cat([g1 / denom, g2 / denom], dim=1)  # (S, 2)
        return weights, torch.stack([idx1, idx2], dim=1), l_aux, counts1 + counts2


class DroplessExperts(Experts):  # type: ignore[misc]  # deepspeed is untyped
    """DeepSpeed's `Experts` (this rank's `num_local_experts` deep copies of `expert`, named
    `deepspeed_experts.{i}`, parameters marked for the expert group) run on sorted slices."""

    def forward(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        # x_sorted: (A, d) rows grouped by expert, counts[e] rows for expert e -> (A, d)
        # NOTE: every expert runs, even on an empty slice, so every expert parameter gets a (zero)
        # gradient: ZeRO and DDP expect a gradient for each parameter on every rank.
        # NOTE: measured on this CPU (S=4096, d=256, f=1024, E=8, 1 thread): this loop of per-expert
        # matmuls takes 22 ms for one projection, torch's grouped_mm 19 ms and one dense matmul of
        # the same FLOPs 17.5 ms. grouped_mm has no CPU backward in torch 2.13 and needs the weights
        # stacked (E, f, d), which breaks DeepSpeed's per-expert parameter names, so we loop.
        outputs: list[torch.Tensor] = []
        for chunk, expert in zip(torch.split(x_sorted, counts), self.deepspeed_experts, strict=True):
            out = expert(chunk)
            if isinstance(out, tuple):
                out = out[0]  # an expert returning (output, bias), as DeepSpeed allows
            outputs.append(out)
        return torch.cat(outputs, dim=0)


class _AllToAllV(torch.autograd.Function):
    """all_to_all_single with per-rank split sizes; its backward sends the gradients back the same
    way (the splits swapped). forward(x (sum(in_splits), d), out_splits, in_splits, group)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any
    ) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def _all_to_all_v(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
    out: torch.Tensor = _AllToAllV.apply(x, out_splits, in_splits, group)  # type: ignore[no-untyped-call]
    return out


def _expert_major(counts: torch.Tensor) -> torch.Tensor:
    """Rows laid out by (source rank, local expert) blocks -> the row order by (local expert, source
    rank). counts: (ep, n_local) rows per block; returns (rows,) int64 source positions."""
    flat = counts.reshape(-1)  # (ep * n_local,) blocks in (rank, expert) order
    starts = (flat.cumsum(0) - flat).view_as(counts)  # where each block starts in the received rows
    sizes_t = counts.t().reshape(-1)  # blocks in (expert, rank) order
    out_starts = sizes_t.cumsum(0) - sizes_t  # where each block starts in expert-major order
    shift = torch.repeat_interleave(starts.t().reshape(-1) - out_starts, sizes_t)  # (rows,)
    return torch.arange(shift.numel(), device=counts.device) + shift


class DroplessMoELayer(nn.Module):
    """Gate + experts + sort-based dispatch; the counterpart of DeepSpeed's `MOELayer`."""

    def __init__(self, gate: DroplessGate, experts: DroplessExperts, ep_size: int = 1) -> None:
        super().__init__()
        self.gate = gate
        self.experts = experts
        self.num_experts = gate.num_experts
        self.ep_size = ep_size
        self.num_local_experts = gate.num_experts // ep_size
        self.ep_group: Any = None  # set by `MoE.set_deepspeed_parallelism` (the engine calls it)
        self.l_aux: torch.Tensor | None = None
        self.exp_counts: torch.Tensor | None = None

    def _set_ep_group(self, ep_group: Any) -> None:
        self.ep_group = ep_group

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: (..., d) -> (..., d)
        d_model = hidden.shape[-1]
        x = hidden.reshape(-1, d_model)  # (S, d)
        weights, indices, l_aux, exp_counts = self.gate(x)  # (S, k), (S, k), (), (E,)
        self.l_aux, self.exp_counts = l_aux, exp_counts
        top_k = indices.shape[1]

        flat_expert = indices.reshape(-1)  # (S*k,) assignment a = token * k + slot
        order = torch.argsort(flat_expert, stable=True)  # (S*k,) assignments grouped by expert
        token_of = order // top_k  # (S*k,) source token of each sorted assignment

        x_sorted = x.index_select(0, token_of)  # (S*k, d) grouped by global expert
        if self.ep_size == 1:
            y_sorted = self.experts(x_sorted, exp_counts.tolist())  # (S*k, d)
        else:
            y_sorted = self._expert_parallel(x_sorted, exp_counts)  # (S*k, d)
        w_sorted = weights.reshape(-1).index_select(0, order)  # (S*k,) fp32
        # NOTE: weight and sum in fp32 (the gate's dtype) and cast back, as DeepSpeed's decode does.
        y_weighted = y_sorted * w_sorted.unsqueeze(1)  # (S*k, d) promoted dtype
        out: torch.Tensor = y_weighted.new_zeros(x.shape[0], d_model).index_add_(
            0, token_of, y_weighted
        )  # (S, d)
        return out.to(y_sorted.dtype).reshape(hidden.shape)

    def _expert_parallel(self, x_sorted: torch.Tensor, exp_counts: torch.Tensor) -> torch.Tensor:
        """Send each row to the EP rank holding its expert, run the local experts, send the results
        back. x_sorted: (A, d) grouped by global expert, exp_counts[e] rows for expert e -> (A, d)."""
        ep, n_local = self.ep_size, self.num_local_experts
        counts = exp_counts.to(torch.int64)  # (E,) = (ep, n_local): what this rank sends to each
        received = torch.empty_like(counts)  # (ep * n_local,): what each source sends my experts
        dist.all_to_all_single(received, counts, group=self.ep_group)
        received = received.view(ep, n_local)  # [source rank, local expert]
        send_splits = counts.view(ep, n_local).sum(1).tolist()  # rows to each EP rank
        recv_splits = received.sum(1).tolist()  # rows from each EP rank
        x_recv = _all_to_all_v(x_sorted, recv_splits, send_splits, self.ep_group)  # (R, d)
        if n_local == 1:
            y_recv = self.experts(x_recv, [sum(recv_splits)])  # (R, d)
        else:
            # NOTE: the rows come by (source rank, local expert); the experts want them by expert.
            perm = _expert_major(received)  # (R,)
            y_local = self.experts(x_recv.index_select(0, perm), received.sum(0).tolist())  # (R, d)
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(perm.numel(), device=perm.device)
            y_recv = y_local.index_select(0, inverse)  # (R, d) back in received order
        return _all_to_all_v(y_recv, send_splits, recv_splits, self.ep_group)  # (A, d)


class DroplessMoE(MoE):  # type: ignore[misc]  # deepspeed is untyped
    """Sort-based dropless MoE: a `deepspeed.moe.layer.MoE` with its own dispatch.

    forward(hidden (..., d)) -> (output (..., d), l_aux (), exp_counts (E,) int64)

    Accepts DeepSpeed's constructor arguments so `_make_moe_layer` can pass the same ones; the
    capacity arguments (`capacity_factor`, `eval_capacity_factor`, `min_capacity`, `drop_tokens`,
    `use_rts`) are accepted and ignored, since nothing is dropped. Differences from DeepSpeed:
    - no capacity: no token is dropped, in training or eval, so outputs equal DeepSpeed's only when
      DeepSpeed drops nothing (e.g. capacity_factor >= num_experts);
    - any number of tokens works (DeepSpeed asserts tokens >= min_capacity, so 1-token generation
      fails there);
    - with `ep_size` > 1 the all_to_alls carry exactly the routed rows (per-expert counts first),
      not a capacity-sized buffer; each EP rank holds experts rank x E/ep .. (rank + 1) x E/ep - 1;
    - `use_residual`, `use_tutel` and expert tensor parallelism are not supported.
    `used_token` (S,) marks the real tokens: only they are routed (padding gets output 0 and counts
    in neither `exp_counts` nor `l_aux`), exactly as if the batch held only them.
    """

    def __init__(
        self,
        hidden_size: int,
        expert: nn.Module,
        num_experts: int = 1,
        ep_size: int = 1,
        k: int = 1,
        capacity_factor: float = 1.0,
        eval_capacity_factor: float = 1.0,
        min_capacity: int = 4,
        use_residual: bool = False,
        noisy_gate_policy: str | None = None,
        drop_tokens: bool = True,
        use_rts: bool = True,
        use_tutel: bool = False,
        enable_expert_tensor_parallelism: bool = False,
        top2_2nd_expert_sampling: bool = True,
    ) -> None:
        # NOTE: not MoE.__init__: it builds DeepSpeed's TopKGate, whose nn.Linear draws from the RNG
        # and would shift the seeded initialisation of our gate. The attributes DeepSpeed's engine
        # reads (checkpoints, groups) are set here as MoE.__init__ sets them.
        nn.Module.__init__(self)
        if num_experts % ep_size != 0:
            raise ValueError(f"num_experts {num_experts} is not divisible by ep_size {ep_size}")
        if use_residual or use_tutel or enable_expert_tensor_parallelism:
            raise ValueError(
                "the dropless MoE layer supports neither use_residual, use_tutel nor expert tensor "
                "parallelism; use moe.implementation: deepspeed"
            )
        del capacity_factor, eval_capacity_factor, min_capacity, drop_tokens, use_rts  # no capacity
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False
        self.hidden_size = hidden_size
        self.ep_size = ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.num_experts = num_experts
        self.num_local_experts = num_experts // ep_size
        self.k = k
        self.deepspeed_moe = DroplessMoELayer(
            DroplessGate(hidden_size, num_experts, k, noisy_gate_policy, top2_2nd_expert_sampling),
            DroplessExperts(expert, self.num_local_experts, self.expert_group_name),
            ep_size,
        )

    # set_deepspeed_parallelism (MoE's): creates the `ep_size_<E>` groups, hands the EP group to
    # deepspeed_moe._set_ep_group. DeepSpeed's engine calls it; a layer used without the engine at
    # ep_size 1 needs no group.

    def forward(
        self, hidden_states: torch.Tensor, used_token: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if used_token is None:
            output = self.deepspeed_moe(hidden_states)
        else:
            # NOTE: route the real tokens alone (their noise draws too), then put them back in place.
            d_model = hidden_states.shape[-1]
            flat = hidden_states.reshape(-1, d_model)  # (S, d)
            rows = used_token.reshape(-1).bool().nonzero().squeeze(1)  # (n,)
            routed = self.deepspeed_moe(flat.index_select(0, rows))  # (n, d)
            output = routed.new_zeros(flat.shape).index_copy(0, rows, routed).reshape(hidden_states.shape)
            gate = self.deepspeed_moe.gate
            if gate.first_choice is not None:  # (n,) -> (S,), padding -1
                gate.first_choice = gate.first_choice.new_full((flat.shape[0],), -1).index_copy_(
                    0, rows, gate.first_choice
                )
        assert self.deepspeed_moe.l_aux is not None and self.deepspeed_moe.exp_counts is not None
        return output, self.deepspeed_moe.l_aux, self.deepspeed_moe.exp_counts
