"""A run's parallel topology (ranks, expert parallelism, accumulation) and moving it elsewhere.

An elastic resume continues a checkpoint on another number of ranks or another `moe.ep_size`.
The rules live here, next to the numbers they relate, and every side reads them: `moe-orch
reshard` and `resume --nodes` (what they refuse), `validate` (what a change implies) and the worker
(which reshards its checkpoint at start). No torch here.

The global batch (micro x accumulation x ranks) is what keeps the trajectory: the same optimizer
steps see the same examples in the same micro-batches. So a new topology keeps the micro-batch
size and the global batch, and the gradient accumulation adapts; a world size that cannot keep the
global batch is refused with the sizes that can.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrator.errors import ConfigError, ConfigIssue
from orchestrator.spec.schema import RunConfig


@dataclass(frozen=True)
class Topology:
    """How a run is laid out over ranks; the part of a config a checkpoint's files depend on."""

    world_size: int
    ep_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    num_experts: int  # per MoE layer; 0 for a dense run

    @classmethod
    def of(cls, cfg: RunConfig) -> Topology:
        return cls(
            world_size=cfg.world_size,
            ep_size=cfg.ep_size,
            micro_batch_size=cfg.training.micro_batch_size,
            gradient_accumulation_steps=cfg.training.gradient_accumulation_steps,
            num_experts=cfg.moe.num_experts if cfg.moe.enabled else 0,
        )

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.world_size

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.ep_size if self.num_experts else 0

    @property
    def suffix(self) -> str:
        """`w4e2`: the part of a resharded checkpoint's tag that names its topology."""
        return f"w{self.world_size}e{self.ep_size}"

    def same_layout(self, other: Topology) -> bool:
        """Whether a checkpoint written at `other` loads here as it is (same ranks, same EP)."""
        return (self.world_size, self.ep_size) == (other.world_size, other.ep_size)

    def describe(self) -> str:
        """`4 ranks, ep_size 2 (2 experts per rank per MoE layer), accumulation 1, global batch 8`."""
        ranks = _ranks(self.world_size)
        experts = ""
        if self.num_experts:
            experts = f", ep_size {self.ep_size} ({self.experts_per_rank} experts per rank per MoE layer)"
        return (
            f"{ranks}{experts}, accumulation {self.gradient_accumulation_steps} x micro "
            f"{self.micro_batch_size}, global batch {self.global_batch_size}"
        )

    def to_json(self) -> dict[str, int]:
        return {
            "world_size": self.world_size,
            "ep_size": self.ep_size,
            "micro_batch_size": self.micro_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "num_experts": self.num_experts,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Topology:
        return cls(**{key: int(data[key]) for key in cls.__dataclass_fields__})


def _ranks(n: int) -> str:
    return "1 rank" if n == 1 else f"{n} ranks"


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _words(values: list[int]) -> str:
    text = [str(v) for v in values]
    return text[0] if len(text) == 1 else ", ".join(text[:-1]) + " or " + text[-1]


def target_topology(
    old: Topology, *, world_size: int, ep_size: int | None = None, where: str = "--nodes x --tasks-per-node"
) -> Topology:
    """The topology for `world_size` ranks that keeps `old`'s global batch and micro-batch size.

    `ep_size` None keeps the old one. Raises ConfigError (exit 2) with the fix when the ep_size does
    not divide the experts or the world, or when the global batch cannot be kept.
    """
    ep = old.ep_size if ep_size is None else ep_size
    issues: list[ConfigIssue] = []
    if old.num_experts:
        if old.num_experts % ep:
            issues.append(
                ConfigIssue(
                    "moe.ep_size",
                    f"ep_size {ep} does not divide the {old.num_experts} experts of each MoE layer; use "
                    f"--ep-size {_words(_divisors(old.num_experts))}",
                )
            )
        elif world_size % ep:
            fits = [k for k in _divisors(old.num_experts) if world_size % k == 0]
            kept = "" if ep_size is not None else f" (the checkpoint's ep_size {ep} is kept unless told)"
            issues.append(
                ConfigIssue(
                    "moe.ep_size",
                    f"ep_size {ep} does not divide the world size {world_size} ({where}){kept}; use "
                    f"--ep-size {_words(fits)}, or a world size that is a multiple of {ep}",
                )
            )
    elif ep != 1:
        issues.append(
            ConfigIssue("moe.ep_size", f"a dense run has no experts to spread; use --ep-size 1, not {ep}")
        )
    batch = old.global_batch_size
    per_step = old.micro_batch_size * world_size
    if batch % per_step:
        worlds = _divisors(batch // old.micro_batch_size)
        issues.append(
            ConfigIssue(
                "training.gradient_accumulation_steps",
                f"the global batch {batch} ({old.micro_batch_size} micro x "
                f"{old.gradient_accumulation_steps} accumulation x {_ranks(old.world_size)}) cannot be kept "
                f"on {_ranks(world_size)}: it is not a multiple of micro_batch_size {old.micro_batch_size} x "
                f"{world_size}; use a world size of {_words(worlds)} ranks",
            )
        )
    if issues:
        raise ConfigError(issues)
    return Topology(
        world_size=world_size,
        ep_size=ep,
        micro_batch_size=old.micro_batch_size,
        gradient_accumulation_steps=batch // per_step,
        num_experts=old.num_experts,
    )


def with_topology(cfg: RunConfig, new: Topology, *, nodes: int, tasks_per_node: int) -> RunConfig:
    """`cfg` moved to `new` (nodes, ranks per node, ep_size, accumulation), validated again."""
    from orchestrator.spec.loading import validate_data

    if nodes * tasks_per_node != new.world_size:
        raise ValueError(f"{nodes} x {tasks_per_node} ranks is not the world size {new.world_size}")
    data = cfg.model_dump(mode="json")
    data["cluster"].update(nodes=nodes, tasks_per_node=tasks_per_node)
    if data["cluster"].get("min_nodes") is not None and data["cluster"]["min_nodes"] > nodes:
        data["cluster"]["min_nodes"] = nodes
    data["moe"]["ep_size"] = new.ep_size
    data["training"]["gradient_accumulation_steps"] = new.gradient_accumulation_steps
    return validate_data(data)


def change_lines(old: Topology, new: Topology) -> list[str]:
    """What moving a checkpoint from `old` to `new` implies, one line each (validate, reshard)."""
    if old == new:
        return [f"same topology as the checkpoint ({new.describe()}): it loads as it is"]
    lines = [f"from {old.describe()}", f"to   {new.describe()}"]
    if old.num_experts and old.ep_size != new.ep_size:
        lines.append(
            f"experts move: each rank holds {new.experts_per_rank} instead of {old.experts_per_rank} "
            f"experts per MoE layer (rank r holds experts k*{new.experts_per_rank} to "
            f"k*{new.experts_per_rank}+{new.experts_per_rank - 1}, k = r mod {new.ep_size})"
        )
    if old.gradient_accumulation_steps != new.gradient_accumulation_steps:
        lines.append(
            f"accumulation {old.gradient_accumulation_steps} -> {new.gradient_accumulation_steps} keeps "
            f"the global batch {new.global_batch_size}"
        )
    if not old.same_layout(new):
        lines.append(
            f"the checkpoint is resharded for {new.world_size} ranks (tag suffix -{new.suffix}); the "
            "original is kept"
        )
    return lines
