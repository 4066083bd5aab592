"""Checkpoint writes that hash as they go, the CPU snapshot of a background save, and a kill -9
during a background save (2 ranks over gloo, torchrun, the tiny MoE).

The bitwise resume with `training.async_save` is in tests/test_worker_e2e.py (the `async` case of
`crashed_then_resumed`), as is the stop on USR2 with background saves.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import OrderedDict, namedtuple
from pathlib import Path

import pytest
from helpers import REPO
from test_worker_e2e import TINY, config_launch, cpu_env, events, torchrun

from orchestrator.rundir import checkpoints as ckpt
from orchestrator.rundir.reports import read_progress


def test_a_file_written_through_the_hashing_writer_loads_and_its_entry_is_the_files_digest(
    tmp_path: Path,
) -> None:
    import torch
    import xxhash

    from worker.checkpoint_engine import write_hashed

    weights = torch.arange(100_000, dtype=torch.float32)
    state = {"w": weights, "meta": {"step": 3}}
    path = tmp_path / "states.pt"
    entry = write_hashed(state, path).close()
    data = path.read_bytes()
    assert entry == {"xxh3_128": xxhash.xxh3_128(data).hexdigest(), "size": len(data)}
    loaded = torch.load(path, weights_only=False)
    assert torch.equal(loaded["w"], weights) and loaded["meta"] == {"step": 3}


def test_the_snapshot_is_a_cpu_copy_that_later_steps_do_not_change_and_keeps_shared_objects() -> None:
    import torch

    from worker.checkpoint_engine import cpu_snapshot

    Pair = namedtuple("Pair", "a b")
    weight = torch.ones(4)
    shapes = OrderedDict(w=torch.Size([4]))
    lr = [0.1]
    state = {"module": OrderedDict(w=weight), "pair": Pair(weight, 2), "shapes": [shapes, shapes], "lr": lr}
    snap = cpu_snapshot(state)
    weight.add_(1.0)  # the next optimizer step, in place
    lr[0] = 0.2
    assert torch.equal(snap["module"]["w"], torch.ones(4)) and snap["lr"] == [0.1]
    assert type(snap["module"]) is OrderedDict and type(snap["pair"]) is Pair
    assert snap["pair"].a is snap["module"]["w"]  # one tensor met twice: one copy
    assert snap["shapes"][0] is snap["shapes"][1]


def test_the_next_snapshot_copies_into_the_previous_ones_buffers_and_a_new_shape_gets_a_new_one() -> None:
    import torch

    from worker.checkpoint_engine import SnapshotBuffers, cpu_snapshot

    buffers = SnapshotBuffers()
    moments = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    state = {"exp_avg": moments, "step": 1, "view": moments.t()}
    buffers.start_file("optim_states.pt")
    first = cpu_snapshot(state, buffers=buffers)
    pointers = {key: first[key].data_ptr() for key in ("exp_avg", "view")}
    assert buffers.nbytes() == 2 * 6 * 4
    assert first["view"].stride() == moments.t().stride()  # a dense view keeps its strides, as clone()

    moments.mul_(10.0)  # the next optimizer step
    assert torch.equal(first["exp_avg"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    buffers.start_file("optim_states.pt")  # the next save, once the first is written
    second = cpu_snapshot(state, buffers=buffers)
    assert {key: second[key].data_ptr() for key in ("exp_avg", "view")} == pointers  # no new memory
    assert torch.equal(second["exp_avg"], moments) and torch.equal(second["view"], moments.t())

    state["exp_avg"] = torch.zeros(4)
    buffers.start_file("optim_states.pt")
    third = cpu_snapshot(state, buffers=buffers)
    assert third["exp_avg"].shape == (4,) and third["exp_avg"].data_ptr() != pointers["exp_avg"]


def test_a_mapped_load_leaves_no_optimizer_state_backed_by_the_file(tmp_path: Path) -> None:
    """torch's Optimizer.load_state_dict adopts the loaded moments as they are: after a mapped
    load they are copied into the moments the optimizer had (or cloned when it had none)."""
    import torch

    from worker.checkpoint_engine import HashingCheckpointEngine, optimizer_tensors, own_loaded_state

    def trained(seed: int) -> torch.optim.Optimizer:
        torch.manual_seed(seed)
        weight = torch.nn.Parameter(torch.randn(64))
        optimizer = torch.optim.AdamW([weight], lr=0.1)
        weight.grad = torch.randn(64)
        optimizer.step()
        return optimizer

    saved = trained(0)
    path = tmp_path / "optim_states.pt"
    torch.save({"optimizer": saved.state_dict()}, path)
    for optimizer in (trained(1), torch.optim.AdamW([torch.nn.Parameter(torch.zeros(64))], lr=0.1)):
        engine = HashingCheckpointEngine(inner=None)
        engine.mapped = set()
        before = optimizer_tensors(optimizer)
        optimizer.load_state_dict(engine.load(str(path), map_location="cpu")["optimizer"])
        state = next(iter(optimizer.state.values()))
        assert state["exp_avg"].untyped_storage().data_ptr() in engine.mapped  # file-backed
        own_loaded_state(optimizer, engine.mapped, before)
        for (param_id, key), value in optimizer_tensors(optimizer).items():
            assert value.untyped_storage().data_ptr() not in engine.mapped
            if before:  # the moments it had, now holding the loaded values
                assert value is before[(param_id, key)]
        expected = next(iter(saved.state.values()))
        assert all(torch.equal(state[key], expected[key]) for key in ("exp_avg", "exp_avg_sq", "step"))


@pytest.mark.slow
def test_kill_9_during_a_background_save_leaves_the_previous_checkpoint_valid(tmp_path: Path) -> None:
    """Every background save holds 6 s between its files and the manifest (hold_save, in the save
    thread) while training goes on; rank 0 is killed while the step-20 save is held. The step-10
    checkpoint stays the newest valid one, and a new launch resumes from it."""
    run_dir = tmp_path / "killed"
    sets = ["training.max_steps=24", "training.save_steps=10", "training.async_save=true"]
    overrides = [a for x in sets for a in ("--set", x)]
    env = cpu_env("hold_save:6")
    launcher = subprocess.Popen(
        torchrun(["--config", str(TINY), "--run-dir", str(run_dir), *overrides]),
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    partial = run_dir / "checkpoints" / ".partial-step-000020"
    try:
        deadline = time.monotonic() + 300
        # Training went past step 20 while the step-20 save is still being written: that is async.
        while not (partial.is_dir() and ((read_progress(run_dir) or {}).get("step") or 0) > 20):
            assert launcher.poll() is None and time.monotonic() < deadline, "never reached the held save"
            time.sleep(0.1)
        children = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True)
        ranks = children.stdout.split()
        assert len(ranks) == 2
        os.kill(int(ranks[0]), signal.SIGKILL)  # rank 0 (the first child): it would publish the save
        launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode != 0
    assert not (run_dir / "checkpoints" / "step-000020").exists()
    assert ckpt.latest_valid_checkpoint(run_dir) == run_dir / "checkpoints" / "step-000010"
    assert [e["step"] for e in events(run_dir, "checkpoint")] == [10]

    resumed = config_launch(run_dir, sets)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    start = events(run_dir, "start")[-1]
    assert start["resumed_from"] == "step-000010"
    assert ckpt.latest_valid_checkpoint(run_dir) == run_dir / "checkpoints" / "step-000024"
    assert not list((run_dir / "checkpoints").glob(".partial-*"))
