"""`moe-orch reshard` and `resume --nodes`: moving a run to another topology.

- `reshard_run`: offline, on this machine (no GPUs): a checkpoint -> its copy for the new topology
  (`<tag>-w<W>e<E>`, next to the original, which is only read). The tensor work belongs to the
  worker (`worker/reshard.py`: torch), imported only when called.
- `retarget_run`: rewrite the run's `run.yaml` for the new topology (same global batch, adapted
  accumulation) before `resume` resubmits it; the worker then reshards at start. No torch.
The rules and what a change implies are `orchestrator.spec.topology`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.rundir import runs
from orchestrator.rundir.atomic import atomic_write_text
from orchestrator.rundir.checkpoints import choose_checkpoint
from orchestrator.spec.loading import dump_config, load_resolved
from orchestrator.spec.topology import Topology, change_lines, target_topology, with_topology

if TYPE_CHECKING:
    from worker.reshard import ReshardResult


def _where(nodes: int, tasks_per_node: int) -> str:
    return f"--nodes {nodes} x --tasks-per-node {tasks_per_node}"


def reshard_run(
    run_dir: Path,
    *,
    nodes: int,
    tasks_per_node: int | None = None,
    ep_size: int | None = None,
    tag: str | None = None,
) -> ReshardResult | None:
    """Write checkpoint `tag` (default: the newest valid one) of `run_dir` for `nodes` x
    `tasks_per_node` ranks (default: the run's) and `ep_size` (default: the checkpoint's).

    None when the checkpoint already has that topology (nothing written). Refused (ConfigError,
    exit 2, nothing written) when the ep_size does not divide the experts or the world, when the
    global batch cannot be kept, or when the run's config cannot take it.
    """
    cfg = load_resolved(run_dir / "run.yaml")
    source = choose_checkpoint(run_dir, tag, "reshard")
    # NOTE: imported here: the checkpoint's files are read with torch, which the CLI never loads.
    from worker.reshard import read_topology, reshard_checkpoint

    old = read_topology(source)
    per_node = tasks_per_node if tasks_per_node is not None else cfg.cluster.tasks_per_node
    new = target_topology(old, world_size=nodes * per_node, ep_size=ep_size, where=_where(nodes, per_node))
    with_topology(cfg, new, nodes=nodes, tasks_per_node=per_node)  # the schema's rules, e.g. GPUs per node
    if old.same_layout(new):
        return None
    return reshard_checkpoint(source, new)


@dataclass(frozen=True)
class Retarget:
    old: Topology
    new: Topology

    def lines(self) -> list[str]:
        return change_lines(self.old, self.new)


def retarget_run(
    run_dir: Path, *, nodes: int, tasks_per_node: int | None = None, ep_size: int | None = None
) -> Retarget:
    """Rewrite `run.yaml` (and run.json's config hash) for `nodes` x `tasks_per_node` ranks, keeping
    the global batch; the worker reshards the checkpoint when the attempt starts."""
    run_yaml = run_dir / "run.yaml"
    cfg = load_resolved(run_yaml)
    old = Topology.of(cfg)
    per_node = tasks_per_node if tasks_per_node is not None else cfg.cluster.tasks_per_node
    new = target_topology(old, world_size=nodes * per_node, ep_size=ep_size, where=_where(nodes, per_node))
    moved = with_topology(cfg, new, nodes=nodes, tasks_per_node=per_node)
    if moved == cfg:
        return Retarget(old, new)
    text = dump_config(moved)
    atomic_write_text(run_yaml, text)
    if (run_dir / "run.json").is_file():
        digest = runs.config_hash(text)

        def _rehash(rec: runs.RunRecord) -> None:
            rec.config_hash = digest

        runs.update_run(run_dir, _rehash)
    return Retarget(old, new)


def fit_to_usable_nodes(run_dir: Path, executor: str, excluded: list[str]) -> str:
    """`cluster.min_nodes`: before a resubmission, shrink the run to the nodes the partition can
    still give (`excluded` left out) when that is fewer than `cluster.nodes` and at least
    `min_nodes`; the ep_size is kept when it divides the new world, else the largest one that
    does. Returns a sentence for the attempt's note ("" when nothing changed)."""
    from orchestrator.backends import backend_for
    from orchestrator.backends.nodelist import usable_nodes

    cluster = load_resolved(run_dir / "run.yaml").cluster
    if cluster.min_nodes is None:
        return ""
    pool = backend_for(executor).node_pool(cluster.partition)
    usable = len(usable_nodes(pool, excluded))
    if not pool or usable >= cluster.nodes:
        return ""
    if usable < cluster.min_nodes:
        return (
            f"only {usable} usable node(s) for {cluster.nodes} (cluster.min_nodes {cluster.min_nodes}): "
            "waiting in the queue for them"
        )
    old = Topology.of(load_resolved(run_dir / "run.yaml"))
    world = usable * cluster.tasks_per_node
    for ep in sorted({e for e in range(1, old.ep_size + 1) if old.ep_size % e == 0}, reverse=True):
        if world % ep == 0:
            break
    moved = retarget_run(run_dir, nodes=usable, ep_size=ep)
    return (
        f"{usable} of {cluster.nodes} nodes usable: continuing on {usable} (cluster.min_nodes "
        f"{cluster.min_nodes}); " + "; ".join(moved.lines())
    )
