"""The benchmarks' smoke modes (bench/): each runs in seconds and produces a well-formed record.

No test here asserts a timing: the machine is shared, and the numbers belong in bench/results.
What is asserted is what the benchmarks rely on to mean anything (one scheduler call per status,
a resumed attempt really resumed, the bytes per parameter of an fp32 ZeRO-2 checkpoint, ...).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO

from bench import cli_latency, preemption, run_all
from bench.common import Result


def _rows(path: Path) -> list[Result]:
    return [Result(**row) for row in json.loads(path.read_text())["results"]]


def test_cli_latency_smoke_compares_each_command_with_the_python_floor_and_status_asks_the_scheduler_once(
    tmp_path: Path,
) -> None:
    out = tmp_path / "cli.json"
    assert cli_latency.main(["--smoke", "--json-out", str(out)]) == 0
    rows = _rows(out)
    assert [r.name for r in rows] == [
        "cli python -c pass (floor)",
        "cli moe-orch --help",
        "cli moe-orch validate mpt7b-moe-4x8",
        "cli moe-orch status (40 runs)",
        "cli moe-orch status --all (40 runs)",
    ]
    floor = rows[0].ours
    assert all(r.baseline == floor and r.ratio == r.ours / floor for r in rows[1:])
    raw = json.loads(out.read_text())["raw"]
    assert raw["run_kinds"] == {"running_slurm": 20, "completed_slurm": 10, "completed_local": 10}
    assert raw["scheduler_calls_per_status"] == [{"squeue": 1, "sacct": 1}] * 4  # status, status --all
    assert raw["scheduler_calls_outside_status"] == {"squeue": 0, "sacct": 0}


def test_generated_home_shows_half_the_runs_running_through_the_fake_scheduler(tmp_path: Path) -> None:
    kinds = cli_latency.make_home(tmp_path / "home", 8, tmp_path / "fake")
    env = dict(os.environ, PATH=f"{tmp_path / 'fake' / 'bin'}{os.pathsep}{os.environ['PATH']}",
               BENCH_FAKE_SLURM=str(tmp_path / "fake"), MOE_ORCH_HOME=str(tmp_path / "home"))  # fmt: skip
    res = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "status", "--json"], cwd=REPO, env=env,
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    states = sorted(run["state"] for run in json.loads(res.stdout))
    assert kinds == {"running_slurm": 4, "completed_slurm": 2, "completed_local": 2}
    assert states == ["completed"] * 4 + ["running"] * 4
    calls = (tmp_path / "fake" / "calls.log").read_text().splitlines()
    assert [c.split()[0] for c in calls] == ["squeue", "sacct"]
    assert "700000,700002,700004,700006" in calls[0]


def test_preemption_smoke_reads_the_stop_timeline_from_events_and_sacct(tmp_path: Path) -> None:
    out = tmp_path / "pre.json"
    assert preemption.main(["--smoke", "--json-out", str(out)]) == 0
    rec = json.loads(out.read_text())["record"]
    assert rec["stop_step"] == 131 and rec["steps_lost"] == 0 and rec["next_first_step"] == 132
    assert rec["resumed_from"] == "step-000131" and rec["slurm_state"] == "REQUEUED"
    timeline = ("signal_event_s", "checkpoint_durable_s", "worker_exit_s", "next_first_step_s")
    assert 0 < rec[timeline[0]] and [rec[k] for k in timeline] == sorted(rec[k] for k in timeline)
    assert rec["job_exited_sacct_s"] == pytest.approx(2.0)
    assert rec["first_attempt_start_to_first_step_s"] == pytest.approx(6.0)
    names = [r.name for r in _rows(out)]
    assert names[-1] == "preemption steps lost" and len(names) == 4


def test_run_all_skips_the_slurm_benchmark_when_no_cluster_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_CONF", raising=False)
    bench = next(b for b in run_all.BENCHES if b.name == "preemption")
    rec = run_all.run_one(bench, smoke=True)
    assert rec["status"] == "skipped" and "slurm-local" in rec["reason"]


def test_run_all_runs_every_issue_row_in_order() -> None:
    assert run_all.NAMES == [
        "cli-latency", "train-step", "moe-layer", "checkpoint", "resume", "preemption", "heartbeat",
    ]


def test_gpu_model_flops_count_the_routed_experts_not_all_experts() -> None:
    from bench.gpu_train import GPU, model_flops_per_token

    dense, moe = model_flops_per_token(GPU, "dense"), model_flops_per_token(GPU, "dropless")
    assert moe == model_flops_per_token(GPU, "stock")
    ffn_flops = 6 * GPU.n_layers * 2 * GPU.d_model * 4 * GPU.d_model
    router = 6 * GPU.n_layers * GPU.d_model * GPU.experts
    assert moe - dense == pytest.approx((GPU.top_k - 1) * ffn_flops + router)


def test_gpu_scripts_parse() -> None:
    for script in ("bench/gpu.sh", "bench/gpu_wheels.sh"):
        subprocess.run(["bash", "-n", script], cwd=REPO, check=True)


@pytest.mark.slow
def test_gpu_train_dry_trains_the_dense_parent_and_the_dropless_moe_on_cpu(tmp_path: Path) -> None:
    # NOTE: the stock layer's path (the same code with implementation "deepspeed") is left to
    # bench/gpu.sh --dry: each variant is a fresh process with DeepSpeed's ~10 s import.
    out, tmp = tmp_path / "gpu.json", tmp_path / "tmp"
    tmp.mkdir()
    res = subprocess.run(
        [sys.executable, "-m", "bench.gpu_train", "--dry", "--variants", "dense", "dropless",
         "--json-out", str(out)], cwd=REPO, env={**os.environ, "TMPDIR": str(tmp)},
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line.split(": ", 1) for line in res.stdout.splitlines()]
    records = [json.loads(parts[1]) for parts in lines if parts[0] in ("dense", "dropless")]
    assert [r["variant"] for r in records] == ["dense", "dropless"]
    assert records[0]["params"] < records[1]["params"]
    assert all(r["mfu"] is None and math.isfinite(r["last_loss"]) for r in records)
    assert "| gpu train dropless |" in res.stdout
    # The worker's checkpoint paths, twice each (the second background save reuses the buffers).
    for rec in records:
        ck = rec["ckpt"]
        assert ck["skipped"] == [] and Path(ck["dir"]).parent.parent == tmp
        timings = ("save_s", "dd_s", "cat_s", "load_s", "async_stall_s", "async_save_s")
        assert all(len(ck[k]) == 2 for k in timings)
        # fp32 ZeRO-2 Adam: 4 weights + 4 master + 8 moments per parameter, and DeepSpeed's overhead.
        assert ck["bytes"] >= 16 * rec["params"] and ck["files"] > 2
    rows = {r.name: r for r in _rows(out)}
    for variant in ("dense", "dropless"):
        for kind, unit in (("save", "MB/s"), ("async stall", "ms wall"), ("load", "ms wall")):
            row = rows[f"gpu checkpoint {kind} {variant}"]
            assert row.unit == unit and row.ours > 0 and row.baseline and row.baseline > 0, row
    # the checkpoints and the records went with the benchmark's temporary folder (torch keeps its caches)
    assert list(tmp.glob("bench-gpu-*")) == []


@pytest.mark.slow
def test_checkpoint_smoke_saves_through_the_worker_and_counts_bytes_per_parameter(tmp_path: Path) -> None:
    from bench import checkpoint

    out = tmp_path / "ckpt.json"
    assert checkpoint.main(["--smoke", "--json-out", str(out)]) == 0
    (rec,) = json.loads(out.read_text())["records"]
    assert "manifest.json" in rec["files"] and "client_state.json" in rec["files"]
    assert rec["bytes"] == sum(rec["files"].values()) - rec["files"]["manifest.json"]
    # fp32 ZeRO-2 Adam: 4 weights + 4 master + 8 moments, plus DeepSpeed's small per-file overhead.
    assert 15.5 < rec["bytes_per_param"] < 20
    # ours, the pre-issue-14 save alternating with it, the async stall, the load, bytes/param
    assert [r.unit for r in _rows(out)] == ["MB/s", "MB/s", "ms wall", "ms wall", "B/param"]


@pytest.mark.slow
def test_resume_smoke_times_a_real_resume_against_a_fresh_start(tmp_path: Path) -> None:
    from bench import resume

    out = tmp_path / "resume.json"
    assert resume.main(["--smoke", "--json-out", str(out)]) == 0
    samples = json.loads(out.read_text())["record"]["samples"]
    (fresh,), (resumed,) = samples["fresh"], samples["resume"]
    assert (fresh["resumed_from"], fresh["first_step"]) == (None, 1)
    assert (resumed["resumed_from"], resumed["first_step"]) == ("step-000010", 11)
    for rec in (fresh, resumed):
        assert 0 < rec["ranks_up_s"] < rec["start_s"] <= rec["first_step_s"]
    # Each attempt's ranks were killed after their first step (torchrun puts them in their own
    # sessions): none trains on after the benchmark.
    leftovers = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"bench-resume-" in (proc / "cmdline").read_bytes():
                leftovers.append(proc.name)
        except OSError:
            continue
    assert leftovers == []


def _learning_record(
    variant: str, seed: int, final: float, step_s: float, mi: float | None
) -> dict[str, Any]:
    evals = {"0": 6.0, "300": final + 0.5, "600": final}
    return {"variant": variant, "seed": seed, "steps": 600, "eval": evals, "final_eval_loss": final,
            "mean_step_s": step_s, "mi_bits": mi, "mi_answer_bits": mi}  # fmt: skip


def test_learning_summary_compares_with_dense_at_equal_steps_and_at_equal_time() -> None:
    from bench import learning

    records = [
        _learning_record("dense", 42, 2.4, 0.03, None), _learning_record("dense", 43, 2.5, 0.03, None),
        _learning_record("top2", 42, 2.2, 0.06, 1.0), _learning_record("top2", 43, 2.6, 0.06, 0.5),
    ]  # fmt: skip
    summary = learning.summarise(records)
    assert summary["budget_s"] == {"42": 18.0, "43": 18.0}  # the dense parent's 600 steps
    top2 = summary["variants"]["top2"]
    assert (top2["beats_dense_steps"], top2["seeds_compared"]) == (1, 2)
    # 18 s buy top2 300 steps: its eval there (2.7 / 3.1) against dense's final (2.4 / 2.5)
    assert top2["seeds"]["42"]["step_at_time"] == 300 and top2["beats_dense_time"] == 0
    assert top2["mean_mi_bits"] == 0.75
    table = learning.markdown(summary)
    assert "| top2 | 2.200 | 2.600 | 2.400 | 1/2 | 2.700@300/3.100@300 |" in table


def test_learning_variants_set_the_whole_moe_section() -> None:
    from bench import learning

    assert learning.moe_sets(learning.VARIANTS["top2+label0.1"]) == [
        "moe.enabled=true", "moe.num_experts=4", "moe.aux_loss_weight=0.01", "moe.label_routing.weight=0.1",
        "moe.implementation=\"deepspeed\"", "moe.ep_size=2", "moe.capacity_factor=1.0", "moe.top_k=2",
        "moe.drop_tokens=true",
    ]  # fmt: skip


@pytest.mark.slow
def test_learning_smoke_trains_dense_and_top2_through_the_worker(tmp_path: Path) -> None:
    from bench import learning

    out = tmp_path / "learning.json"
    assert learning.main(["--smoke", "--json-out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [(r["variant"], r["seed"]) for r in doc["records"]] == [("dense", 42), ("top2", 42)]
    dense, top2 = doc["records"]
    assert dense["mi_bits"] is None and 0 <= top2["mi_bits"] <= top2["mi_max_bits"] == 2.0
    assert sorted(int(s) for s in top2["eval"]) == [0, 3, 6]
    assert all(math.isfinite(r["final_eval_loss"]) and r["mean_step_s"] > 0 for r in doc["records"])


def test_heartbeat_smoke_times_steps_with_and_without_the_watchdog_and_its_file_is_written(
    tmp_path: Path,
) -> None:
    from bench import heartbeat

    out = tmp_path / "heartbeat.json"
    assert heartbeat.main(["--smoke", "--json-out", str(out)]) == 0
    rows = _rows(out)
    assert [r.name for r in rows] == [
        "heartbeat step CPU time (pulse + watchdog)",
        "heartbeat step time (pulse + watchdog)",
        "heartbeat Pulse.enter",
    ]
    assert all(r.baseline and r.ratio == r.ours / r.baseline for r in rows[:2])
    last = json.loads(out.read_text())["raw"]["last_heartbeat"]
    assert last["step"] == 20 and len(last["compute_s"]) == 20, "the watchdog wrote the pulse's state"
