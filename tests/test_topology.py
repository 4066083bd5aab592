"""The rules of moving a run to another topology (orchestrator/spec/topology.py), what `validate
--run` says about it, and `cluster.min_nodes`. No torch: the files themselves are
tests/test_reshard.py's."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.errors import ConfigError
from orchestrator.lifecycle.validate import summary_rows, validate_file
from orchestrator.spec.loading import dump_config, load_config
from orchestrator.spec.topology import Topology, change_lines, target_topology, with_topology

TINY = Topology(world_size=2, ep_size=2, micro_batch_size=2, gradient_accumulation_steps=2, num_experts=4)


@pytest.mark.parametrize(
    ("world", "ep", "expected"),
    [(1, 1, (1, 1, 4)), (4, 2, (4, 2, 1)), (4, None, (4, 2, 1)), (2, 1, (2, 1, 2)), (4, 4, (4, 4, 1))],
)
def test_a_new_topology_keeps_the_global_batch_and_adapts_accumulation(
    world: int, ep: int | None, expected: tuple[int, int, int]
) -> None:
    new = target_topology(TINY, world_size=world, ep_size=ep)
    assert (new.world_size, new.ep_size, new.gradient_accumulation_steps) == expected
    assert new.global_batch_size == TINY.global_batch_size == 8
    assert new.micro_batch_size == TINY.micro_batch_size


@pytest.mark.parametrize(
    ("world", "ep", "message"),
    [
        (4, 3, "ep_size 3 does not divide the 4 experts of each MoE layer; use --ep-size 1, 2 or 4"),
        (1, None, "ep_size 2 does not divide the world size 1 (here) (the checkpoint's ep_size 2 is kept"),
        (2, 4, "ep_size 4 does not divide the world size 2 (here); use --ep-size 1 or 2"),
        (8, 2, "cannot be kept on 8 ranks: it is not a multiple of micro_batch_size 2 x 8; use a world size "
               "of 1, 2 or 4 ranks"),
    ],
)  # fmt: skip
def test_a_topology_that_cannot_work_is_refused_with_the_fix(
    world: int, ep: int | None, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        target_topology(TINY, world_size=world, ep_size=ep, where="here")
    assert message in str(info.value)


def test_change_lines_say_where_experts_go_and_the_accumulation() -> None:
    new = target_topology(TINY, world_size=4, ep_size=4)
    text = "\n".join(change_lines(TINY, new))
    assert "each rank holds 1 instead of 2 experts per MoE layer" in text
    assert "accumulation 2 -> 1 keeps the global batch 8" in text
    assert "-w4e4" in text
    assert change_lines(TINY, TINY)[0].startswith("same topology")


def test_with_topology_rewrites_the_config_and_its_rules_still_apply() -> None:
    cfg = load_config(
        "configs/tiny-cpu.yaml", ["training.micro_batch_size=2", "training.gradient_accumulation_steps=2"]
    )
    new = target_topology(Topology.of(cfg), world_size=4, ep_size=None)
    moved = with_topology(cfg, new, nodes=1, tasks_per_node=4)
    assert (moved.world_size, moved.ep_size, moved.training.gradient_accumulation_steps) == (4, 2, 1)
    assert moved.global_batch_size == cfg.global_batch_size
    with pytest.raises(ConfigError, match="the local executor runs one node"):
        with_topology(cfg, new, nodes=2, tasks_per_node=2)


def test_validate_run_explains_a_topology_change(tmp_path: Path) -> None:
    cfg = load_config(
        "configs/tiny-cpu.yaml", ["training.micro_batch_size=2", "training.gradient_accumulation_steps=2"]
    )
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.yaml").write_text(dump_config(cfg))
    sets = [
        "training.micro_batch_size=2",
        "cluster.tasks_per_node=4",
        "training.gradient_accumulation_steps=2",
    ]
    summary = validate_file("configs/tiny-cpu.yaml", sets, home=tmp_path, run_dir=run)
    rows = summary_rows(summary)
    at = [label for label, _ in rows].index("topology change")
    assert rows[at][1].startswith("from 2 ranks, ep_size 2 (2 experts per rank")
    assert any("accumulation 2 -> 1 keeps the global batch 8" in value for _, value in rows[at:])
    assert any("sets it to 1 when it resumes" in w for w in summary.warnings)
    with pytest.raises(ConfigError, match="cannot be kept on 3 ranks"):
        validate_file("configs/tiny-cpu.yaml", [*sets[:1], "cluster.tasks_per_node=3", "moe.ep_size=1"],
                      home=tmp_path, run_dir=run)  # fmt: skip


def test_min_nodes_is_at_most_nodes() -> None:
    with pytest.raises(ConfigError, match="min_nodes 3 is more than nodes 2"):
        load_config(
            "configs/tiny-cpu.yaml", ["cluster.executor=slurm", "cluster.nodes=2", "cluster.min_nodes=3"]
        )
    cfg = load_config(
        "configs/tiny-cpu.yaml", ["cluster.executor=slurm", "cluster.nodes=2", "cluster.min_nodes=1"]
    )
    assert cfg.cluster.min_nodes == 1
