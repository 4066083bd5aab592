"""Hangs, stragglers and goodput without a cluster (issue 11): the heartbeat files and what is read
from them, the `hang` event in the run record and its budget, `watch` ending a frozen attempt, and
the goodput split on constructed events. The same paths on the real cluster:
tests/test_hangs_slurm.py."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeSlurm
from helpers import REPO, write_event, write_start

from orchestrator.backends.nodelist import plan_exclusion
from orchestrator.lifecycle import status, submit
from orchestrator.lifecycle.poll import poll
from orchestrator.lifecycle.watch import watch_once
from orchestrator.rundir import goodput, heartbeats, runs
from orchestrator.rundir.runs import RunState, StopReason

TINY_SLURM = str(REPO / "configs" / "tiny-slurm.yaml")
NOW = 1_800_000_000.0


def beat(rank: int, *, step: int | None = 10, phase: str = "collective", position: int = 100,
         idle: float = 5.0, silent: float = 1.0, compute: list[float] | None = None, host: str | None = None,
         **extra: Any) -> dict[str, Any]:  # fmt: skip
    return {
        "rank": rank, "host": host or f"n{rank + 1}", "pid": 1000 + rank, "step": step, "phase": phase,
        "position": position, "last_progress": NOW - idle, "written": NOW - silent, "stall_limit_s": 30.0,
        "heartbeat_s": 2.0, "compute_s": compute or [], **extra,
    }  # fmt: skip


# --- who is stuck, who waits -------------------------------------------------------------------


def test_the_rank_behind_the_others_is_the_suspect_and_the_others_wait_for_it() -> None:
    beats = {0: beat(0, position=120), 1: beat(1, phase="data", position=118), 2: beat(2, position=120)}
    diag = heartbeats.diagnose(beats, NOW, heartbeat_s=2.0)
    assert [r.rank for r in diag.suspects] == [1]
    assert [r.rank for r in diag.waiting] == [0, 2]
    expected = "suspect rank 1 on n2 (data, step 10): behind the others; waiting: rank 0"
    assert diag.summary().startswith(expected)


def test_a_silent_rank_is_the_suspect_even_when_it_is_not_behind() -> None:
    beats = {0: beat(0, position=120), 1: beat(1, position=120, silent=60.0)}
    diag = heartbeats.diagnose(beats, NOW, heartbeat_s=2.0)
    assert [r.rank for r in diag.suspects] == [1] and [r.rank for r in diag.silent] == [1]
    assert "silent" in diag.summary()


def test_ranks_stopped_at_the_same_point_have_no_single_suspect() -> None:
    beats = {0: beat(0), 1: beat(1)}
    diag = heartbeats.diagnose(beats, NOW, heartbeat_s=2.0)
    assert diag.suspects == []
    assert diag.summary().startswith("no single suspect: every rank stopped at step 10, collective")


def test_before_the_first_step_a_rank_without_a_heartbeat_is_the_suspect_on_its_node() -> None:
    beats = {0: beat(0, step=None, phase="rendezvous", position=1, idle=12.0)}
    diag = heartbeats.diagnose(beats, NOW, heartbeat_s=2.0, expected={0: "n1", 1: "n2"})
    assert [(r.rank, r.host, r.heartbeat) for r in diag.suspects] == [(1, "n2", False)]
    assert [r.rank for r in diag.waiting] == [0] and [r.rank for r in diag.missing] == [1]
    expected = "suspect rank 1 on n2 (no heartbeat, step None): no heartbeat; waiting: rank 0"
    assert diag.summary().startswith(expected)
    suspect = diag.to_dict()["suspects"][0]
    assert suspect["host"] == "n2" and suspect["idle_s"] is None and diag.to_dict()["missing"] == [1]


def test_a_rank_still_starting_while_the_others_wait_in_the_rendezvous_is_the_suspect() -> None:
    beats = {
        0: beat(0, step=None, phase="rendezvous", position=1),
        1: beat(1, step=None, phase="startup", position=0),
    }
    diag = heartbeats.diagnose(beats, NOW, heartbeat_s=2.0, expected={0: "n1", 1: "n1"})
    assert [(r.rank, r.phase) for r in diag.suspects] == [(1, "startup")]
    assert [r.rank for r in diag.waiting] == [0]


def test_ranks_that_all_wait_in_the_rendezvous_have_no_suspect_and_all_wait() -> None:
    beats = {r: beat(r, step=None, phase="rendezvous", position=1) for r in range(3)}
    diag = heartbeats.diagnose(beats, NOW, heartbeat_s=2.0, expected={r: "n1" for r in range(3)})
    assert diag.suspects == [] and [r.rank for r in diag.waiting] == [0, 1, 2]
    assert diag.summary().startswith("no single suspect: every rank stopped at step None, rendezvous")


def test_a_job_is_frozen_from_outside_only_when_every_heartbeat_is_silent_past_the_limit() -> None:
    fresh = {0: beat(0, silent=1.0, idle=100.0), 1: beat(1, silent=1.0, idle=100.0)}
    assert not heartbeats.frozen(fresh, NOW, heartbeat_s=2.0, limit_s=30.0), "the watchdogs still run"
    one_silent = {0: beat(0, silent=1.0), 1: beat(1, silent=100.0)}
    assert not heartbeats.frozen(one_silent, NOW, heartbeat_s=2.0, limit_s=30.0), "rank 0's watchdog acts"
    all_silent = {0: beat(0, silent=40.0, idle=40.0), 1: beat(1, silent=40.0, idle=40.0)}
    assert heartbeats.frozen(all_silent, NOW, heartbeat_s=2.0, limit_s=30.0)
    assert not heartbeats.frozen(all_silent, NOW, heartbeat_s=2.0, limit_s=60.0)
    stuck_long = {0: beat(0, silent=1.0, idle=200.0), 1: beat(1, silent=1.0, idle=200.0)}
    assert heartbeats.frozen(stuck_long, NOW, heartbeat_s=2.0, limit_s=30.0), "their watchdogs cannot run"


def test_heartbeat_files_round_trip_per_attempt(tmp_path: Path) -> None:
    heartbeats.write_heartbeat(heartbeats.heartbeat_path(tmp_path, "7.0", 1), beat(1))
    heartbeats.write_heartbeat(heartbeats.heartbeat_path(tmp_path, "7.1", 0), beat(0))
    assert set(heartbeats.read_heartbeats(tmp_path, "7.0")) == {1}
    assert heartbeats.read_heartbeats(tmp_path, "7.0")[1]["phase"] == "collective"
    assert (tmp_path / "attempts" / "7.1" / "heartbeats" / "rank-0.json").is_file()
    assert heartbeats.read_heartbeats(tmp_path, "8.0") == {}


# --- stragglers and the first failure ----------------------------------------------------------


def test_a_rank_computing_three_times_as_long_is_a_straggler_with_its_host_and_factor() -> None:
    beats = {0: beat(0, compute=[0.1] * 50), 1: beat(1, compute=[0.3] * 50, host="n7")}
    (slow,) = heartbeats.stragglers(beats, 1.5)
    assert (slow.rank, slow.host, round(slow.factor, 2)) == (1, "n7", 3.0)


def test_ranks_within_the_factor_and_too_few_steps_are_not_stragglers() -> None:
    within = {0: beat(0, compute=[0.1] * 50), 1: beat(1, compute=[0.14] * 50)}
    assert heartbeats.stragglers(within, 1.5) == []
    assert heartbeats.stragglers({0: beat(0, compute=[0.1] * 3), 1: beat(1, compute=[0.9] * 3)}, 1.5) == []


def test_the_first_failure_is_the_earliest_error_and_the_others_are_its_consequences() -> None:
    beats = {
        0: beat(0, error="RuntimeError: Connection reset by peer", failed_at=NOW + 0.4),
        1: beat(1, error="InjectedFault: boom", failed_at=NOW),
        2: beat(2),
    }
    first = heartbeats.first_failure(beats)
    assert first is not None and (first["rank"], first["error"]) == (1, "InjectedFault: boom")
    assert [(c["rank"], c["after_s"]) for c in first["consequences"]] == [(0, 0.4)]
    assert heartbeats.first_failure({0: beat(0)}) is None


# --- which nodes the next attempt avoids -------------------------------------------------------


def test_a_suspect_node_is_excluded_only_when_enough_other_nodes_remain() -> None:
    two = {"n1": "idle", "n2": "mixed"}
    new, why = plan_exclusion(["n2"], two, [], 2)
    assert new is None
    assert why == (
        "retrying on the same nodes: excluding n2 would leave 1 usable node(s) in the partition, "
        "and the job needs 2"
    )
    new, why = plan_exclusion(["n2"], {**two, "n3": "idle", "n4": "down*"}, [], 2)
    assert new == ["n2"] and why.startswith("excluded n2 from the next run (2 other usable node(s)")


# --- the run record: the hang event, the stop reason and the budget ------------------------------


@pytest.fixture
def fake() -> Iterator[FakeSlurm]:
    with FakeSlurm().context() as f:
        yield f


def _hang(run_dir: Path, job: str, requeued: bool) -> None:
    suspect = {"rank": 1, "host": "n2", "phase": "data", "step": 11}
    write_event(run_dir, event="hang", attempt_key=f"{job}.0", step=11, detected_by="rank 0", hang_s=14.0,
           stall_limit_s=10.0, summary="suspect rank 1 on n2 (data, step 11): behind the others",
           suspects=[suspect], waiting=[], note="hang 1 of cluster.max_hangs=2")  # fmt: skip
    write_event(run_dir, event="exit", reason="hung", step=11, requeued=requeued,
                error="hung: suspect rank 1")  # fmt: skip


def test_a_hang_event_ends_the_attempt_hung_and_watch_resubmits_on_the_same_two_nodes(
    fake: FakeSlurm, tmp_path: Path
) -> None:
    run_dir = submit.submit(TINY_SLURM, [], home=str(tmp_path), echo=lambda _: None)
    write_start(run_dir, "100")
    _hang(run_dir, "100", requeued=False)
    fake.set_state("100", None)
    fake.add_acct("100", "FAILED", "76:0")
    fake.node_states = {"n1": "idle", "n2": "idle"}
    watch_once([run_dir], lambda _: None)
    rec = runs.read_run(run_dir)
    first = rec.attempts[0]
    assert first.stop_reason == StopReason.HUNG and first.hang is not None
    assert first.hang["suspects"][0]["host"] == "n2"
    assert [a.job_id for a in rec.attempts] == ["100", "101"], "resubmitted within max_hangs"
    assert "retrying on the same nodes" in (rec.attempts[1].note or ""), rec.attempts[1].note
    assert "--exclude" not in fake.jobs["101"].script
    shown = "\n".join(status.detail_lines(status.run_detail(poll([run_dir])[0])))
    assert "stop hung" in shown and "hang: detected by rank 0 14.0 s after the last progress" in shown


@pytest.mark.parametrize("policy", [True, False])
def test_a_straggler_node_is_excluded_at_the_next_attempt_only_with_exclude_stragglers(
    fake: FakeSlurm, tmp_path: Path, policy: bool
) -> None:
    sets = [f"cluster.exclude_stragglers={str(policy).lower()}"]
    run_dir = submit.submit(TINY_SLURM, sets, home=str(tmp_path), echo=lambda _: None)
    write_start(run_dir, "100")
    write_event(run_dir, event="straggler", attempt_key="100.0", step=40, rank=1, host="n2", factor=3.1)
    write_event(run_dir, event="exit", reason="failed", step=50, requeued=False, error="RuntimeError: boom")
    fake.set_state("100", None)
    fake.add_acct("100", "FAILED", "1:0")
    fake.node_states = {"n1": "idle", "n2": "idle", "n3": "idle"}
    watch_once([run_dir], lambda _: None)
    rec = runs.read_run(run_dir)
    assert rec.attempts[0].stragglers == [{"rank": 1, "host": "n2", "factor": 3.1, "step": 40}]
    assert [a.job_id for a in rec.attempts] == ["100", "101"]
    if policy:
        assert rec.excluded_nodes == ["n2"] and "#SBATCH --exclude=n2" in fake.jobs["101"].script
        assert "excluded n2 from the next run" in (rec.attempts[1].note or "")
    else:
        assert rec.excluded_nodes == [] and "--exclude" not in fake.jobs["101"].script


def test_hangs_beyond_max_hangs_fail_the_run(fake: FakeSlurm, tmp_path: Path) -> None:
    run_dir = submit.submit(TINY_SLURM, ["cluster.max_hangs=0"], home=str(tmp_path), echo=lambda _: None)
    write_start(run_dir, "100")
    _hang(run_dir, "100", requeued=False)
    fake.set_state("100", None)
    fake.add_acct("100", "FAILED", "76:0")
    watch_once([run_dir], lambda _: None)
    rec = runs.read_run(run_dir)
    assert rec.state == RunState.FAILED and len(rec.attempts) == 1
    assert rec.state_reason == "1 hung attempts, more than cluster.max_hangs=0"


def test_watch_kills_a_frozen_attempt_records_it_hung_and_resubmits(fake: FakeSlurm, tmp_path: Path) -> None:
    run_dir = submit.submit(TINY_SLURM, [], home=str(tmp_path), echo=lambda _: None)
    write_start(run_dir, "100")
    fake.set_state("100", "RUNNING")
    stale = time.time() - 120.0
    for rank in (0, 1):
        record = {**beat(rank, phase="forward", position=50), "written": stale, "last_progress": stale - 5,
                  "ledger": {"startup": 10.0, "forward": 20.0}, "train_s": 15.0}  # fmt: skip
        heartbeats.write_heartbeat(heartbeats.heartbeat_path(run_dir, "100.0", rank), record)
    lines: list[str] = []
    watch_once([run_dir], lines.append)
    assert any("hung" in line and "killed job 100" in line for line in lines), lines
    assert ["/fake/bin/scancel", "--signal=KILL", "--full", "100"] in fake.calls or [
        "scancel", "--signal=KILL", "--full", "100"
    ] in fake.calls, fake.calls
    kinds = [json.loads(line)["event"] for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert kinds[-2:] == ["hang", "exit"]
    watch_once([run_dir], lines.append)  # the next poll sees the run stopped and resubmits it
    rec = runs.read_run(run_dir)
    assert rec.attempts[0].stop_reason == StopReason.HUNG
    assert rec.attempts[0].hang and rec.attempts[0].hang["detected_by"] == "watch"
    assert [a.job_id for a in rec.attempts] == ["100", "101"]


# --- goodput --------------------------------------------------------------------------------------


def _goodput_events() -> list[dict[str, Any]]:
    """Three attempts of 2 ranks: preempted at step 130 (saved there), failed at 180 (last save at
    150: 30 steps redone), completed at 300. 0.1 s per step; times in seconds from T."""
    t = 1000.0

    def ledger(startup: float, steps: float, ckpt: float, ev: float, **other: float) -> dict[str, float]:
        return {"startup": startup, "forward": steps * 0.6, "backward": steps * 0.3,
                "collective": steps * 0.1, "checkpoint": ckpt, "eval": ev, **other}  # fmt: skip

    return [
        {"event": "start", "time": t + 10, "attempt_key": "5.0", "world_size": 2, "resumed_step": 0,
         "launched": t},
        {"event": "checkpoint", "time": t + 21, "step": 100, "train_s": 10.0},
        {"event": "checkpoint", "time": t + 25, "step": 130, "train_s": 13.0},
        {"event": "exit", "time": t + 26, "reason": "preempted", "step": 130,
         "ledger": ledger(10.0, 13.0, 2.0, 1.0, stopping=0.0), "train_s": 13.0},
        {"event": "start", "time": t + 50, "attempt_key": "5.1", "world_size": 2, "resumed_step": 130,
         "launched": t + 40},
        {"event": "checkpoint", "time": t + 53, "step": 150, "train_s": 2.0},
        {"event": "exit", "time": t + 57.5, "reason": "failed", "step": 180,
         "ledger": ledger(10.0, 5.5, 1.0, 1.0), "train_s": 5.0},
        {"event": "start", "time": t + 80, "attempt_key": "6.0", "world_size": 2, "resumed_step": 150,
         "launched": t + 70},
        {"event": "checkpoint", "time": t + 96, "step": 300, "train_s": 15.0},
        {"event": "exit", "time": t + 97, "reason": "completed", "step": 300,
         "ledger": ledger(10.0, 15.0, 1.0, 0.0, export=1.0), "train_s": 15.0},
    ]  # fmt: skip


def test_goodput_splits_every_allocated_second_and_counts_the_redone_steps() -> None:
    total, per = goodput.compute(_goodput_events(), {}, submitted={"5.0": 990.0, "6.0": 1065.0})
    assert [key for key, _ in per] == ["5.0", "5.1", "6.0"]
    assert total.allocated_s == pytest.approx(2 * (26 + 17.5 + 27))
    assert total.steps_redone == 30
    assert total.redone_s == pytest.approx(2 * 3.0), "30 steps of 0.1 s on 2 ranks, thrown away"
    assert total.productive_s == pytest.approx(2 * 30.0), "300 steps of 0.1 s kept"
    assert total.lost_s == pytest.approx(2 * 0.5), "the step the failure interrupted"
    assert total.queue_s == pytest.approx(10 + 14.0 + 5.0)
    parts = sum(getattr(total, p) for p in goodput.PARTS if p != "unattributed_s")
    assert abs(total.allocated_s - parts) <= 0.02 * total.allocated_s
    assert total.goodput == pytest.approx(60.0 / 141.0)
    line = goodput.summary_lines(total)[0]
    assert line.startswith("goodput 42.6% of 141.0 rank-s allocated: startup 60.0, productive 60.0, ")
    assert "redone 6.0" in line and line.endswith("(30 steps redone)")


def test_goodput_of_a_run_that_ended_failed_counts_the_work_after_its_last_checkpoint_as_lost() -> None:
    events = _goodput_events()[:7]
    total, _ = goodput.compute(events, {}, run_ended_incomplete=True)
    assert total.lost_s == pytest.approx(2 * (0.5 + 3.0)), "partial step, and steps 151-180 not saved"
    assert total.productive_s == pytest.approx(2 * (13.0 + 2.0))


# --- the worker's side, without ranks ------------------------------------------------------------


def test_fault_hooks_for_hangs_and_stragglers_parse() -> None:
    from worker.signals import Faults

    outside = Faults.parse("hang_at_step:12:1")
    assert (outside.hang_at_step, outside.hang_rank, outside.hang_in_collective) == (12, 1, False)
    inside = Faults.parse("hang_at_step:5:0:collective,slow_rank:1:3")
    assert (inside.hang_at_step, inside.hang_rank, inside.hang_in_collective) == (5, 0, True)
    assert (inside.slow_rank, inside.slow_factor) == (1, 3.0)
    with pytest.raises(ValueError, match="hang_at_step:N:R"):
        Faults.parse("hang_forever")
    startup = Faults.parse("hang_at_startup:1")
    assert startup.hang_at_startup == 1 and startup.hang_at_step is None
    startup.after_a_hang()
    assert startup.hang_at_startup is None, "once per run: the resumed attempt starts"


def test_the_derived_stall_limit_follows_the_slowest_step_save_or_eval_with_a_floor() -> None:
    from worker.heartbeat import BEFORE_FIRST_STEP_S, DERIVED_FLOOR_S, Pulse

    pulse = Pulse(rank=0, attempt_key="1.0", configured_limit_s=None)
    assert pulse.limit_s() == BEFORE_FIRST_STEP_S, "model loading and the first step take long"
    pulse.step_done(1, 0.5, 0.1)
    assert pulse.limit_s() == DERIVED_FLOOR_S
    pulse.saved(45.0)
    assert pulse.limit_s() == 450.0, "10x the slowest save"
    configured = Pulse(rank=0, attempt_key="1.0", configured_limit_s=20.0)
    configured.step_done(1, 0.5, 0.1)
    assert configured.limit_s() == 20.0


def test_the_startup_limit_applies_from_the_workers_start_until_the_first_step() -> None:
    from orchestrator.spec.schema import ClusterConfig
    from worker.heartbeat import BEFORE_FIRST_STEP_S, Pulse

    assert ClusterConfig().startup_timeout_s == BEFORE_FIRST_STEP_S
    pulse = Pulse(rank=0, attempt_key="1.0", configured_limit_s=20.0, startup_limit_s=600.0)
    assert pulse.armed and pulse.starting and pulse.limit_s() == 600.0, "armed before the rendezvous"
    assert pulse.record()["stall_limit_s"] == 600.0, "watch reads the startup limit from the heartbeat"
    started = pulse.last_progress
    pulse.enter("rendezvous")
    pulse.enter("model")
    pulse.training_starts(0)
    assert pulse.last_progress == started and pulse.step == 0, "training starting is not progress"
    pulse.evaluated(2.0)
    assert pulse.last_progress > started, "the eval at step 0 is progress"
    pulse.step_done(1, 0.5, 0.1)
    assert not pulse.starting and pulse.limit_s() == 20.0, "then the stall limit, unchanged"


def test_the_watchdog_fires_on_a_rank_stuck_before_its_first_step(tmp_path: Path) -> None:
    from worker.heartbeat import Pulse, Watchdog

    pulse = Pulse(rank=1, attempt_key="1.0", configured_limit_s=None, startup_limit_s=0.3)
    pulse.enter("rendezvous")
    stalled: list[str] = []
    dog = Watchdog(pulse, tmp_path, heartbeat_s=0.05, on_stall=lambda p: stalled.append(p.phase))
    dog.start()
    deadline = time.time() + 5.0
    while not stalled and time.time() < deadline:
        time.sleep(0.05)
    dog.stop()
    assert stalled == ["rendezvous"] and dog.fired
    beat_file = heartbeats.read_heartbeats(tmp_path, "1.0")[1]
    assert (beat_file["phase"], beat_file["stall_limit_s"], beat_file["step"]) == ("rendezvous", 0.3, None)


def test_the_startup_limit_must_be_positive() -> None:
    from pydantic import ValidationError

    from orchestrator.spec.schema import ClusterConfig

    assert ClusterConfig(startup_timeout_s=15).startup_timeout_s == 15.0
    with pytest.raises(ValidationError, match="startup_timeout_s"):
        ClusterConfig(startup_timeout_s=0)


def test_every_rank_is_placed_on_its_node_in_blocks_for_the_hang_report() -> None:
    from worker.dist import DistInfo
    from worker.hang import rank_hosts

    def info(world: int, nodes: list[str]) -> DistInfo:
        return DistInfo(rank=0, world_size=world, local_rank=0, master_addr="n1", master_port=1,
                        source="srun", job_id="7", nodes=nodes)  # fmt: skip

    assert rank_hosts(info(4, ["n1", "n2"])) == {0: "n1", 1: "n1", 2: "n2", 3: "n2"}
    assert rank_hosts(info(3, ["n1", "n2"])) == {0: "?", 1: "?", 2: "?"}, "a layout nobody can tell"


def test_goodput_counts_the_phases_before_training_as_startup() -> None:
    from worker.heartbeat import PHASES

    assert PHASES[: len(heartbeats.STARTUP_PHASES)] == heartbeats.STARTUP_PHASES
    events = _goodput_events()[:4]
    split = {"startup": 4.0, "rendezvous": 3.0, "model": 2.0, "resume": 1.0}
    events[3] = {**events[3], "ledger": {**events[3]["ledger"], **split}}
    total, _ = goodput.compute(events, {})
    assert total.startup_s == pytest.approx(2 * 10.0), "rendezvous, model and resume are startup too"


def test_the_ledger_counts_each_phase_and_the_straggler_window_leaves_out_the_wait() -> None:
    from worker.heartbeat import Pulse

    pulse = Pulse(rank=0, attempt_key="1.0", configured_limit_s=None)
    pulse.enter("forward")
    time.sleep(0.05)
    pulse.enter("collective")
    time.sleep(0.02)
    pulse.step_done(1, 0.5, 0.2)
    ledger = pulse.ledger_now()
    assert ledger["forward"] >= 0.05 and ledger["collective"] >= 0.02 and ledger["startup"] > 0
    record = pulse.record()
    assert record["compute_s"] == [0.3] and record["position"] == 2 and record["phase"] == "collective"
    assert record["step"] == 1 and record["train_s"] == 0.5


# --- what `status RUN` shows ----------------------------------------------------------------------


def test_status_shows_each_running_rank_its_stragglers_and_the_goodput(
    fake: FakeSlurm, tmp_path: Path
) -> None:
    run_dir = submit.submit(TINY_SLURM, [], home=str(tmp_path), echo=lambda _: None)
    now = time.time()
    write_event(run_dir, event="start", job_id="100", restart=0, attempt_key="100.0", nodes=["n1", "n2"],
           world_size=2, resumed_step=0, launched=now - 16)  # fmt: skip
    fake.set_state("100", "RUNNING")
    for rank, step_s in ((0, 0.1), (1, 0.35)):
        record = {**beat(rank, phase="forward", compute=[step_s] * 20), "written": now - 1,
                  "last_progress": now - 2, "ledger": {"startup": 10.0, "forward": 5.0},
                  "train_s": 4.0}  # fmt: skip
        heartbeats.write_heartbeat(heartbeats.heartbeat_path(run_dir, "100.0", rank), record)
    detail = status.run_detail(poll([run_dir])[0])
    shown = "\n".join(status.detail_lines(detail))
    assert "rank 1 on n2: step 10, forward, 2 s since progress, heartbeat 1 s ago" in shown, shown
    assert "straggler now: rank 1 on n2: 3.5x the others' compute per step" in shown, shown
    assert [s["rank"] for s in detail["stragglers"]] == [1]
    good = detail["goodput"]
    assert good["allocated_s"] == pytest.approx(2 * 15.0, abs=0.5), "launch -> rank 0's last heartbeat"
    assert good["startup_s"] == 20.0 and good["productive_s"] == 8.0


def test_status_names_the_rank_that_failed_first_from_the_heartbeats(fake: FakeSlurm, tmp_path: Path) -> None:
    run_dir = submit.submit(TINY_SLURM, [], home=str(tmp_path), echo=lambda _: None)
    write_start(run_dir, "100")
    write_event(run_dir, event="exit", reason="failed", step=7, requeued=False,
                error="RuntimeError: peer closed")  # fmt: skip
    errors = {
        1: ("InjectedFault: MOE_ORCH_FAULT crash_at_step:7", NOW),
        0: ("RuntimeError: peer closed", NOW + 0.2),
    }
    for rank, (error, at) in errors.items():
        heartbeats.write_heartbeat(
            heartbeats.heartbeat_path(run_dir, "100.0", rank), beat(rank, error=error, failed_at=at)
        )
    fake.set_state("100", None)
    fake.add_acct("100", "FAILED", "1:0")
    shown = "\n".join(status.detail_lines(status.run_detail(poll([run_dir])[0])))
    expected = (
        "first failure: rank 1 on n2: InjectedFault: MOE_ORCH_FAULT crash_at_step:7; "
        "then rank 0 (+0.2 s): RuntimeError: peer closed"
    )
    assert expected in shown, shown
