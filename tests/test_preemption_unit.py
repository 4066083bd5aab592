"""Preemption pieces that need no cluster: `validate --home/--run` (signal_delay_s against the
checkpoint saves earlier runs measured), and how the worker reads `scontrol requeue` answers and
the job's time limit (a preemption must not read as a timeout)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO

from orchestrator.backends.slurm import injob
from orchestrator.lifecycle.validate import measured_save, runs_with_layout, validate
from orchestrator.spec.loading import dump_config, load_config
from worker import signals

CONFIG = REPO / "configs" / "tiny-slurm.yaml"  # signal_delay_s: 60


def make_run(home: Path, name: str, save_times: list[float], *overrides: str) -> Path:
    """A finished run folder: its run.yaml and events.jsonl with one checkpoint event per save."""
    run_dir = home / name
    run_dir.mkdir(parents=True)
    (run_dir / "run.yaml").write_text(dump_config(load_config(CONFIG, list(overrides))))
    (run_dir / "run.json").write_text("{}\n")  # `--run` finds a run by its run.json
    lines = [{"event": "start", "time": 1.0, "attempt_key": "7.0"}]
    lines += [
        {"event": "checkpoint", "time": 2.0 + i, "tag": f"step-{100 * (i + 1):06d}", "step": 100 * (i + 1),
         "save_s": s, "bytes": 10}
        for i, s in enumerate(save_times)
    ]  # fmt: skip
    text = "\n".join(json.dumps(line) for line in lines) + '\n{"event": "checkp'  # a torn last line
    (run_dir / "events.jsonl").write_text(text)
    return run_dir


def warnings_for(*overrides: str, history: list[Path]) -> list[str]:
    return [w for w in validate(load_config(CONFIG, list(overrides)), history=history).warnings
            if "signal_delay_s" in w and "checkpoint save" in w]  # fmt: skip


def test_a_signal_delay_under_twice_the_longest_measured_save_warns_with_the_value_to_set(
    tmp_path: Path,
) -> None:
    run = make_run(tmp_path, "tiny-slurm-a", [12.0, 41.5, 30.0])
    (warning,) = warnings_for(history=[run])
    assert "cluster.signal_delay_s 60 is less than twice the longest measured checkpoint save" in warning
    assert "41.5 s, step-000200 of run tiny-slurm-a, 3 save(s)" in warning
    assert warning.endswith("set cluster.signal_delay_s >= 83")


def test_a_signal_delay_of_at_least_twice_the_save_time_does_not_warn(tmp_path: Path) -> None:
    run = make_run(tmp_path, "tiny-slurm-a", [30.0])
    assert warnings_for(history=[run]) == []
    assert warnings_for("cluster.signal_delay_s=59", history=[run])


def test_without_measured_saves_there_is_nothing_to_compare(tmp_path: Path) -> None:
    run = make_run(tmp_path, "tiny-slurm-a", [])
    assert measured_save([run]) is None
    assert warnings_for(history=[run]) == []
    assert warnings_for(history=[]) == []


def test_only_runs_with_the_same_model_and_moe_layout_count(tmp_path: Path) -> None:
    same = make_run(tmp_path, "same", [40.0], "training.max_steps=5", "cluster.signal_delay_s=10")
    make_run(tmp_path, "more-experts", [99.0], "moe.num_experts=8")
    make_run(tmp_path, "other-model", [99.0], "model.tiny.d_model=128")
    (tmp_path / "not-a-run").mkdir()
    cfg = load_config(CONFIG)
    assert runs_with_layout(cfg, tmp_path) == [same], "training and cluster settings do not matter"
    measured = measured_save(runs_with_layout(cfg, tmp_path))
    assert measured is not None and measured.save_s == 40.0


def moe_orch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args], cwd=REPO, capture_output=True, text=True,
        env=env or {k: v for k, v in os.environ.items() if k != "MOE_ORCH_HOME"}, check=False,
    )  # fmt: skip


def test_validate_home_and_run_options_show_the_warning(tmp_path: Path) -> None:
    run = make_run(tmp_path, "tiny-slurm-20261128-120000-abcd", [45.0])
    by_home = moe_orch("validate", str(CONFIG), "--home", str(tmp_path))
    assert by_home.returncode == 0, by_home.stderr
    assert "warning: cluster.signal_delay_s 60 is less than twice" in by_home.stderr
    by_run = moe_orch("validate", str(CONFIG), "--set", "moe.num_experts=8", "--run", str(run))
    assert by_run.returncode == 0 and ">= 90" in by_run.stderr, "--run: that run's saves, whatever its layout"
    plain = moe_orch("validate", str(CONFIG), env=dict(os.environ, MOE_ORCH_HOME=str(tmp_path)))
    assert "checkpoint save" not in plain.stderr, "no implicit scan of the runs folder"
    missing = moe_orch("validate", str(CONFIG), "--home", str(tmp_path), "--run", "nope")
    assert missing.returncode != 0 and "no run 'nope'" in missing.stderr


@pytest.mark.parametrize(
    ("returncode", "stderr", "requeued"),
    [
        (0, "", True),
        (1, "scontrol: error: Job is pending execution for job 46", True),  # SLURM requeued it already
        (1, "scontrol: error: Invalid job id specified for job 46", False),
    ],
)
def test_the_worker_reads_scontrol_requeue_answers(
    monkeypatch: pytest.MonkeyPatch, returncode: int, stderr: str, requeued: bool
) -> None:
    calls: list[list[str]] = []

    def fake_run(args: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        calls.append(args)
        return subprocess.CompletedProcess(args, returncode, "", stderr)

    monkeypatch.setattr("orchestrator.backends.slurm.injob.subprocess.run", fake_run)
    assert injob.requeue_job("46") is requeued
    assert calls == [["scontrol", "requeue", "46"]]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10:00", 600.0), ("1:00:00", 3600.0), ("30", 1800.0), ("2-00:00:00", 172800.0),
        ("1-02", 93600.0), ("1-02:03", 93780.0), ("UNLIMITED", None), ("NOT_SET", None), ("", None),
    ],
)  # fmt: skip
def test_slurm_time_limits_parse_to_seconds(text: str, seconds: float | None) -> None:
    assert injob.parse_duration(text) == seconds


def test_the_time_limit_is_the_start_plus_the_limit_not_the_end_slurm_moves_on_preemption(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fake_run(args: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        assert args == ["squeue", "-h", "-j", "48", "-o", "%S|%l"], "not %e (now + GraceTime when preempted)"
        return subprocess.CompletedProcess(args, 0, "2026-11-28T16:08:31|1:00:00\n", "")

    monkeypatch.setattr("orchestrator.backends.slurm.injob.subprocess.run", fake_run)
    start = injob.parse_time("2026-11-28T16:08:31")
    assert start is not None
    end = injob.SlurmRunningJob("48").time_limit_end()
    assert end == start + 3600
    # A partition preemption 11 s into a 60-minute job is a preemption, not a time limit.
    assert signals.stop_reason(end_time=end, signal_delay_s=60, now=start + 11) == "preempted"


def test_a_node_set_down_while_completing_its_dead_job_counts_as_unhealthy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from orchestrator.backends.slurm import scheduler

    # sinfo right after `scontrol update State=DOWN` of a node whose slurmd died holding a job.
    answer = (
        "n1|completing|moe-orch-test-node-failure\nn2|idle|none\nn3|down*|Not responding\nn4|mixed|none\n"
    )

    def fake_run(args: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        assert args[:2] == ["sinfo", "-h"] and args[-1] == "%N|%T|%E"
        return subprocess.CompletedProcess(args, 0, answer, "")

    monkeypatch.setattr(scheduler, "_run", fake_run)
    assert scheduler.unhealthy_nodes(["n1", "n2", "n3", "n4"]) == ["n1", "n3"]


# --- SIGTERM: cancellation or requeue? (scontrol show job -o, SLURM 22.05, as measured) ----------
SCANCELLED = "JobId=145 JobName=trap.sh Restarts=0 BatchFlag=1 JobState=COMPLETING PreemptTime=None"
REQUEUED = "JobId=146 JobName=trap.sh Restarts=1 BatchFlag=1 JobState=COMPLETING PreemptTime=None"
PREEMPTED = "JobId=147 Restarts=0 JobState=COMPLETING PreemptTime=2026-11-28T17:20:00"


@pytest.mark.parametrize(
    ("line", "restart_count", "cancelled"),
    [(SCANCELLED, 0, True), (REQUEUED, 0, False), (PREEMPTED, 0, False), (REQUEUED, 1, True)],
)
def test_a_sigterm_is_a_cancellation_only_when_slurm_neither_requeued_nor_preempted_the_job(
    line: str, restart_count: int, cancelled: bool
) -> None:
    job = injob.parse_scontrol_job(line)
    assert injob.term_is_cancellation(job, restart_count) is cancelled


def test_moe_orch_cancel_is_seen_through_run_json(tmp_path: Path) -> None:
    assert not signals.cancel_requested(tmp_path)
    (tmp_path / "run.json").write_text('{"cancel_requested": true}')
    assert signals.cancel_requested(tmp_path)
