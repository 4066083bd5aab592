"""The worker's side of an elastic resume: the checkpoint to load at THIS topology.

Before the engine is built (its accumulation depends on it), every rank calls `plan_resume`:
1. the ranks choose the newest valid checkpoint together (`worker.checkpoint.select_resume_checkpoint`);
2. rank 0 reads the topology it was written at (`worker.reshard.read_topology`); when the world size
   or `moe.ep_size` differs from this job's, the config keeps the checkpoint's global batch
   (accumulation adapts; `orchestrator.spec.topology`, which refuses what cannot be kept) and rank 0
   reshards the checkpoint (or reuses a valid `<tag>-w<W>e<E>` copy), while the others wait;
3. rank 0 broadcasts the plan (or the error every rank then raises).
After `engine.load_checkpoint`, `verify_loaded` checks on every rank that it holds its own experts
(bitwise the expert files of its global ids) and that every fp32 master fragment matches its
weights: DeepSpeed issue 6589 was every EP rank loading the first experts.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from orchestrator.errors import CheckpointError, ConfigError, ConfigIssue
from orchestrator.spec.schema import RunConfig
from orchestrator.spec.topology import Topology, change_lines, target_topology, with_topology
from worker.dist import DistInfo

logger = logging.getLogger(__name__)


@dataclass
class ResumePlan:
    """What this attempt loads: `path` (None: a fresh start), and the topology change, if any."""

    cfg: RunConfig
    path: Path | None = None  # the folder DeepSpeed loads (a resharded copy after a change)
    source: Path | None = None  # the checkpoint chosen (the original, before any reshard)
    old: Topology | None = None
    new: Topology | None = None
    reshard_s: float = 0.0
    reused: bool = False
    experts_by_rank: list[list[int]] | None = None  # after the load: each rank's experts (verified)

    @property
    def changed(self) -> bool:
        return self.old is not None and self.new is not None and not self.old.same_layout(self.new)

    def event(self) -> dict[str, Any] | None:
        """The `start` event's `topology_change` (None when the checkpoint loads as it is)."""
        if not self.changed or self.old is None or self.new is None or self.path is None:
            return None
        return {
            "from": self.old.to_json(),
            "to": self.new.to_json(),
            "source": self.source.name if self.source else None,
            "tag": self.path.name,
            "reshard_s": round(self.reshard_s, 3),
            "reused": self.reused,
            "experts_by_rank": self.experts_by_rank,
        }


def _decide(cfg: RunConfig, source: Path, info: DistInfo) -> ResumePlan:
    """Rank 0: the plan for checkpoint `source` (reshards when the topology changed)."""
    from worker.reshard import read_topology, reshard_checkpoint

    try:
        old = read_topology(source)
    except CheckpointError as exc:  # e.g. ZeRO stage 0: no partitioned files; DeepSpeed loads it as is
        logger.warning(
            "cannot read the topology of checkpoint %s (%s); loading it as it is", source.name, exc
        )
        return ResumePlan(cfg=cfg, path=source, source=source)
    here = Topology.of(cfg)
    if old.same_layout(here):
        return ResumePlan(cfg=cfg, path=source, source=source, old=old, new=here)
    where = f"the job's {info.world_size} ranks"
    new = target_topology(old, world_size=info.world_size, ep_size=cfg.ep_size, where=where)
    if new.gradient_accumulation_steps != here.gradient_accumulation_steps:
        logger.warning(
            "checkpoint %s was trained with global batch %d; gradient_accumulation_steps %d -> %d keeps it "
            "on %d ranks",
            source.name,
            old.global_batch_size,
            here.gradient_accumulation_steps,
            new.gradient_accumulation_steps,
            info.world_size,
        )
        cfg = with_topology(cfg, new, nodes=cfg.cluster.nodes, tasks_per_node=cfg.cluster.tasks_per_node)
    for line in change_lines(old, new):
        logger.info("elastic resume: %s", line)
    result = reshard_checkpoint(source, new)
    return ResumePlan(
        cfg=cfg,
        path=result.path,
        source=source,
        old=old,
        new=new,
        reshard_s=result.seconds,
        reused=result.written_bytes == 0,
    )


def plan_resume(cfg: RunConfig, run_dir: Path, info: DistInfo) -> ResumePlan:
    """Every rank: the checkpoint to load at this job's topology (see the module docstring)."""
    import torch.distributed as dist

    from worker.checkpoint import select_resume_checkpoint

    source = select_resume_checkpoint(run_dir, info.rank, info.world_size)
    if source is None:
        return ResumePlan(cfg=cfg)
    answer: list[Any] = [None]
    if info.is_main:
        try:
            plan = _decide(cfg, source, info)
            answer[0] = ("ok", plan.cfg.model_dump(mode="json"), replace(plan, cfg=cfg))
        except ConfigError as exc:
            answer[0] = ("config", [(i.path, i.message) for i in exc.issues], None)
        except Exception as exc:  # every rank must leave, not wait for a broadcast that never comes
            answer[0] = ("error", f"{type(exc).__name__}: {exc}", None)
    if info.world_size > 1 and dist.is_initialized():
        dist.broadcast_object_list(answer, src=0)
    kind, payload, plan = answer[0]
    if kind == "config":
        raise ConfigError([ConfigIssue(path, message) for path, message in payload])
    if kind == "error":
        raise RuntimeError(f"resharding checkpoint {source.name} failed on rank 0: {payload}")
    from orchestrator.spec.loading import validate_data

    if not isinstance(plan, ResumePlan):
        raise RuntimeError(f"rank 0 sent no resume plan for {source.name}")
    return replace(plan, cfg=validate_data(payload))


_EXPERT_KEY_RE = re.compile(r"\.deepspeed_experts\.(\d+)\.")


def verify_loaded(engine: Any, checkpoint: Path) -> list[int]:
    """After a load at a new topology: this rank's experts are, bitwise, the checkpoint's expert
    files of ITS global ids, and every fp32 master fragment equals its weights. Returns the global
    ids of the experts this rank holds (per MoE layer); raises RuntimeError on any difference."""
    import torch
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups

    held: list[int] = []
    layer = 0
    for prefix, module in engine.module.named_modules():
        if not isinstance(module, MoE):
            continue
        n_local = module.num_local_experts
        ep_rank = groups._get_expert_parallel_rank(module.expert_group_name)
        params = dict(module.named_parameters(prefix=prefix))
        for local in range(n_local):
            global_id = ep_rank * n_local + local
            path = checkpoint / f"layer_{layer}_expert_{global_id}_mp_rank_00_model_states.pt"
            saved = torch.load(path, map_location="cpu", weights_only=False)
            for key, tensor in saved.items():
                mine = _EXPERT_KEY_RE.sub(f".deepspeed_experts.{local}.", key)
                if mine not in params or not torch.equal(params[mine].detach().cpu(), tensor):
                    raise RuntimeError(
                        f"after loading {checkpoint.name}, {mine} is not expert {global_id} of {path.name}"
                    )
            if layer == 0:
                held.append(global_id)
        layer += 1
    fragments = 0
    for name, param in engine.module.named_parameters():
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            continue
        lp, hp = mapping.lp_fragment, mapping.hp_fragment
        if not torch.equal(hp.detach().to(lp.dtype), lp.detach()):
            raise RuntimeError(
                f"after loading {checkpoint.name}, the fp32 master of {name} does not match it"
            )
        fragments += 1
    logger.debug("%d fp32 master fragments match their weights", fragments)
    return held
