"""Checkpoint writes that hash as they go, the CPU snapshot of a background save, and a kill -9
during a background save (2 ranks over gloo, torchrun, the tiny MoE).

The bitwise resume with `training.async_save` is in tests/test_worker_e2e.py (the `async` case of
`crashed_then_resumed`), as is the stop on USR2 with background saves.
"""

from __future__ import annotations

import hashlib
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


def test_a_file_written_through_the_hashing_writer_loads_and_its_entry_is_the_files_sha256(
    tmp_path: Path,
) -> None:
    import torch

    from worker.checkpoint import _write_hashed

    weights = torch.arange(100_000, dtype=torch.float32)
    state = {"w": weights, "meta": {"step": 3}}
    path = tmp_path / "states.pt"
    entry = _write_hashed(state, path).close()
    data = path.read_bytes()
    assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    loaded = torch.load(path, weights_only=False)
    assert torch.equal(loaded["w"], weights) and loaded["meta"] == {"step": 3}


def test_the_snapshot_is_a_cpu_copy_that_later_steps_do_not_change_and_keeps_shared_objects() -> None:
    import torch

    from worker.checkpoint import _cpu_snapshot

    Pair = namedtuple("Pair", "a b")
    weight = torch.ones(4)
    shapes = OrderedDict(w=torch.Size([4]))
    lr = [0.1]
    state = {"module": OrderedDict(w=weight), "pair": Pair(weight, 2), "shapes": [shapes, shapes], "lr": lr}
    snap = _cpu_snapshot(state)
    weight.add_(1.0)  # the next optimizer step, in place
    lr[0] = 0.2
    assert torch.equal(snap["module"]["w"], torch.ones(4)) and snap["lr"] == [0.1]
    assert type(snap["module"]) is OrderedDict and type(snap["pair"]) is Pair
    assert snap["pair"].a is snap["module"]["w"]  # one tensor met twice: one copy
    assert snap["shapes"][0] is snap["shapes"][1]


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
