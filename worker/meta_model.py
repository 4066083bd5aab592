"""The model objects of a run, built on the meta device (shapes, no storage, nothing downloaded), to
hold `validate`'s offline numbers (orchestrator/spec/estimate.py) against what transformers and
DeepSpeed really build: parameter counts (total, active per token), the parameters one rank holds,
and which global experts each expert-parallel rank owns.

The MptConfig comes from the architecture table `KNOWN_MPT` (or `model.tiny`), never from the hub;
upcycling is the worker's own `worker.model.upcycle`, unchanged (it only copies modules, which the
meta device allows). Expert placement asks DeepSpeed's own group builder, rank by rank, under a fake
process group of the job's world size (as torchtitan's memory estimation does).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers import MptConfig, MptForCausalLM

from orchestrator.errors import ConfigError, ConfigIssue
from orchestrator.spec.estimate import MptArch, architecture
from orchestrator.spec.schema import RunConfig

logger = logging.getLogger(__name__)


def mpt_config(arch: MptArch) -> MptConfig:
    """transformers' MptConfig for an architecture of the table (MPT's defaults for the rest:
    `no_bias`, ALiBi, tied embeddings, as the hub's config.json files say)."""
    return MptConfig(
        d_model=arch.d_model,
        n_heads=arch.n_heads,
        n_layers=arch.n_layers,
        expansion_ratio=arch.expansion_ratio,
        vocab_size=arch.vocab_size,
        no_bias=True,
        use_cache=False,
    )


def build_meta_model(cfg: RunConfig, arch: MptArch | None = None) -> MptForCausalLM:
    """One rank's model for `cfg` on the meta device: the dense MPT, upcycled when `moe.enabled`
    (each rank holds `num_experts / ep_size` experts per MoE layer, as in training)."""
    from worker.model import upcycle

    arch = arch or architecture(cfg)
    if arch is None:
        raise ConfigError(
            [
                ConfigIssue(
                    "model.name_or_path",
                    f"{cfg.model.name_or_path!r} is not in the architecture table "
                    "(orchestrator/spec/estimate.py KNOWN_MPT) nor a folder with a config.json",
                )
            ]
        )
    with torch.device("meta"):
        model = MptForCausalLM(mpt_config(arch))
        if cfg.moe.enabled:
            model = upcycle(model, cfg)
    return model


def _local_experts(layer: nn.Module) -> nn.ModuleList:
    """The experts one MoE layer holds on this rank: DeepSpeed's `Experts.deepspeed_experts` (the
    dropless layer keeps the same name)."""
    for name, module in layer.named_modules():
        if name.endswith("deepspeed_experts") and isinstance(module, nn.ModuleList):
            return module
    raise AttributeError(f"{type(layer).__name__} holds no `deepspeed_experts`")


@dataclass(frozen=True)
class RankParams:
    """The parameters one rank's model object holds."""

    non_expert: int  # embeddings, attention, norms, gates, dense FFNs
    local_experts: int  # this rank's experts, all MoE layers
    one_expert: int  # one expert of one layer
    moe_layers: int
    experts_per_layer: int  # this rank's experts per MoE layer

    @property
    def held(self) -> int:
        return self.non_expert + self.local_experts


def rank_params(model: nn.Module) -> RankParams:
    """Count a (meta or real) model's parameters, split the way ZeRO and expert parallelism keep them."""
    from worker.model import moe_layers

    layers = [_local_experts(layer) for layer in moe_layers(model)]
    expert_ids = {id(p) for experts in layers for p in experts.parameters()}
    local = sum(p.numel() for p in model.parameters() if id(p) in expert_ids)
    non_expert = sum(p.numel() for p in model.parameters() if id(p) not in expert_ids)
    if not layers:
        return RankParams(non_expert, 0, 0, 0, 0)
    one = sum(p.numel() for p in layers[0][0].parameters())
    return RankParams(non_expert, local, one, len(layers), len(layers[0]))


def expert_placement(world_size: int, ep_size: int, num_experts: int) -> dict[int, list[int]]:
    """Global rank -> the global experts (of every MoE layer) it holds, from DeepSpeed's own
    expert-parallel groups, built rank by rank under a fake process group of `world_size`.

    NOTE: rank r owns `ep_rank * local + j` for its local expert j: the global id DeepSpeed's
    `_save_moe_checkpoint` writes into `layer_<L>_expert_<E>_...` (which worker/export.py reads).
    """
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import groups

    # NOTE: torch's own test backend (stable since torch 2.1): collectives are no-ops, so one
    # process can be any rank of any world size.
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from worker.dist import skip_shm_build

    if dist.is_initialized():
        raise RuntimeError("expert_placement needs a process without a process group")
    skip_shm_build()
    local = num_experts // ep_size
    name = f"ep_size_{ep_size}"
    placement: dict[int, list[int]] = {}
    try:
        for rank in range(world_size):
            dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
            deepspeed.init_distributed(dist_backend="fake")
            groups._create_expert_and_data_parallel(ep_size)
            ep_rank = groups._get_expert_parallel_rank(name)
            placement[rank] = [ep_rank * local + j for j in range(local)]
            groups._EXPERT_PARALLEL_GROUP.clear()
            groups._EXPERT_DATA_PARALLEL_GROUP.clear()
            dist.destroy_process_group()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        groups._EXPERT_PARALLEL_GROUP.clear()
        groups._EXPERT_DATA_PARALLEL_GROUP.clear()
    return placement
