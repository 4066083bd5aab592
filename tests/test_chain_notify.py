"""Chaining without requeue and notifications, without a cluster: the successor's submission
against a fake SLURM, the budgets that refuse one, what run.json learns from the events, the
job's own stop before its time limit, and notifications to a local HTTP server and a command."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeSlurm
from helpers import REPO, free_port
from helpers import WebhookServer as Hook

from orchestrator import notify
from orchestrator.backends.slurm import chain
from orchestrator.errors import ConfigError
from orchestrator.lifecycle import submit
from orchestrator.lifecycle.reconcile import Budgets, check_budgets, reconcile
from orchestrator.redact import redact
from orchestrator.rundir import reports, runs
from orchestrator.rundir.runs import Attempt, AttemptState, RunRecord, RunState, StopReason
from orchestrator.spec.loading import load_config
from worker.signals import SignalState

TINY_SLURM = str(REPO / "configs" / "tiny-slurm.yaml")
CHAIN = ["cluster.continue_with=chain", "cluster.requeue=false"]


@pytest.fixture
def fake() -> Iterator[FakeSlurm]:
    with FakeSlurm().context() as f:
        yield f


# --- chain --------------------------------------------------------------------------------------


def test_a_chained_run_keeps_the_script_of_a_single_submission_and_asks_no_timer_signal(
    fake: FakeSlurm, tmp_path: Path
) -> None:
    run_dir = submit.submit(TINY_SLURM, CHAIN, home=str(tmp_path), echo=lambda _: None)
    logs = run_dir / "logs"
    assert (logs / "successor.sh").read_text() == (logs / "100_submission.sh").read_text()
    assert "--signal" not in fake.jobs["100"].script, "the job stops itself before its limit"
    plain = submit.submit(TINY_SLURM, [], home=str(tmp_path), echo=lambda _: None)
    assert not (plain / "logs" / "successor.sh").exists()
    assert "#SBATCH --signal=USR2@60" in fake.jobs["101"].script


def test_chain_needs_slurm_and_the_successor_is_submitted_with_a_dependency(
    fake: FakeSlurm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="continue_with: chain submits the next job with sbatch"):
        load_config(TINY_SLURM, [*CHAIN, "cluster.executor=local", "cluster.nodes=1", "moe.ep_size=1"])
    run_dir = submit.submit(TINY_SLURM, CHAIN, home=str(tmp_path), echo=lambda _: None)
    for name, value in {
        "SLURM_ARRAY_TASK_ID": "3",
        "SLURM_JOB_ID": "100",
        "RANK": "0",
        "SLURM_CONF": "/c",
    }.items():
        monkeypatch.setenv(name, value)
    calls: list[dict[str, Any]] = []
    real_run = fake.run

    def run(command: list[str], **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_run(command, **kwargs)

    monkeypatch.setattr("subprocess.run", run)
    successor = chain.submit_successor("100", run_dir)
    assert successor == "101"
    assert fake.calls[-1][:3] == ["sbatch", "--parsable", "--dependency=afterany:100"]
    assert fake.jobs["101"].dependency == "afterany:100"
    copied = run_dir / "logs" / "101_submitted.pkl"
    assert copied.read_bytes() == (run_dir / "logs" / "100_submitted.pkl").read_bytes()
    env = calls[-1]["env"]
    assert env["SLURM_CONF"] == "/c" and not {"SLURM_ARRAY_TASK_ID", "SLURM_JOB_ID", "RANK"} & set(env)
    (run_dir / "logs" / "successor.sh").unlink()
    assert chain.submit_successor("101", run_dir) is None, "no script: no successor (logged)"


def _events(*exits: tuple[str, int], first_start: float) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for n, (reason, step) in enumerate(exits):
        out.append({"event": "start", "time": first_start + 60 * n, "job_id": str(n)})
        out.append({"event": "exit", "time": first_start + 60 * n + 50, "reason": reason, "step": step})
    return out


@pytest.mark.parametrize(
    ("exits", "step", "budgets", "refused"),
    [
        ([("timeout", 100)], 200, {}, None),
        ([("timeout", 100), ("timeout", 200)], 300, {"max_preemptions": 2}, "3 preemptions/time limits"),
        ([("timeout", 100)] * 3, 100, {}, "crash loop: 3 consecutive attempts"),
        ([("timeout", 100)], 200, {"total_time_min": 1}, "more than cluster.total_time_min=1"),
    ],
)
def test_a_successor_is_refused_by_the_budgets_reconcile_applies(
    exits: list[tuple[str, int]], step: int, budgets: dict[str, Any], refused: str | None
) -> None:
    now = time.time()
    why = chain.successor_refusal(
        _events(*exits, first_start=now - 100), now=now, step=step,
        max_preemptions=budgets.get("max_preemptions"), max_attempts_without_progress=3,
        total_time_min=budgets.get("total_time_min"),
    )  # fmt: skip
    assert (why is None) if refused is None else (why is not None and refused in why), why


def _record(tmp_path: Path) -> RunRecord:
    return RunRecord(
        run_id="r", name="r", config_hash="x", created=0.0, executor="slurm", run_dir=str(tmp_path),
        home=str(tmp_path), attempts=[Attempt(number=1, job_id="12", submitted=1000.0)],
    )  # fmt: skip


def test_run_json_learns_the_successor_from_the_exit_event_and_its_start_binds_to_it(tmp_path: Path) -> None:
    rec = _record(tmp_path)
    evs: list[dict[str, Any]] = [
        {"event": "start", "time": 1010.0, "job_id": "12", "restart": 0, "attempt_key": "12.0"},
        {
            "event": "exit",
            "time": 1060.0,
            "reason": "timeout",
            "step": 300,
            "requeued": False,
            "successor": "13",
        },
    ]
    reconcile(rec, evs, progress=None, observed=None, budgets=Budgets(), now=1061.0)
    assert [a.job_id for a in rec.attempts] == ["12", "13"]
    nxt = rec.attempts[1]
    assert (
        nxt.state == AttemptState.PENDING and nxt.note == "chained by job 12 (cluster.continue_with: chain)"
    )
    assert rec.state == RunState.PENDING
    evs.append({"event": "start", "time": 1075.0, "job_id": "13", "restart": 0, "attempt_key": "13.0"})
    reconcile(rec, evs, progress=None, observed=None, budgets=Budgets(), now=1076.0)
    assert len(rec.attempts) == 2 and rec.attempts[1].attempt_key == "13.0"
    assert str(rec.state) == "running"


def test_the_total_time_cap_fails_a_run_that_ran_too_long() -> None:
    att = [
        Attempt(number=1, job_id="1", started=0.0, ended=50.0, state=AttemptState.ENDED,
                stop_reason=StopReason.TIMEOUT, last_step=10),
        Attempt(number=2, job_id="2", started=60.0, ended=130.0, state=AttemptState.ENDED,
                stop_reason=StopReason.TIMEOUT, last_step=20),
    ]  # fmt: skip
    assert not check_budgets(att, Budgets(total_time_min=3)).exhausted
    verdict = check_budgets(att, Budgets(total_time_min=2))
    assert verdict.exhausted and "ran 2.2 min in total, more than cluster.total_time_min=2" in verdict.reason


def test_the_job_stops_itself_signal_delay_before_its_time_limit() -> None:
    class Job:
        def time_limit_end(self) -> float:
            return time.time() + 20.3

    signals = SignalState()
    at = signals.stop_before_time_limit(Job(), 20)  # type: ignore[arg-type]
    assert at is not None and signals.stop_signal is None
    time.sleep(0.6)
    assert signals.stop_signal == "USR2" and signals.received == ["time limit"]


# --- notifications ------------------------------------------------------------------------------


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.shutdown()


def _run_dir(tmp_path: Path, notify_section: dict[str, Any]) -> Path:
    run_dir = tmp_path / "run-1"
    run_dir.mkdir()
    (run_dir / "run.yaml").write_text(json.dumps({"name": "r", "notify": notify_section}))
    return run_dir


def test_the_events_a_process_writes_are_posted_to_the_webhook_in_order(hook: Hook, tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path, {"webhook": hook.url})
    notify.install("job")
    reports.append_event(run_dir, "start", job_id="7_1", restart=0, attempt_key="7_1.0", nodes=["n1", "n2"])
    reports.append_event(run_dir, "checkpoint", tag="step-000010", step=10)
    reports.append_event(
        run_dir, "exit", reason="preempted", step=12, requeued=True, error=None, ledger={"x": 1}
    )
    reports.append_event(run_dir, "start", job_id="7_1", restart=1, attempt_key="7_1.1", nodes=["n1", "n2"])
    reports.append_event(run_dir, "exit", reason="completed", step=30, requeued=False, error=None)
    assert [b["kind"] for b in hook.bodies] == ["attempt_start", "preempted", "attempt_start", "completed"]
    first = hook.bodies[1]
    assert first["text"] == "moe-orch run-1: attempt 7_1.0 stopped (preempted) at step 12, requeued"
    assert first["run_id"] == "run-1" and first["source"] == "job" and first["step"] == 12
    assert first["event"]["reason"] == "preempted" and "ledger" not in first["event"]
    logged = reports.read_jsonl(run_dir / notify.NOTIFICATIONS_FILE)
    assert [(r["kind"], r["ok"]) for r in logged][:2] == [("attempt_start", True), ("preempted", True)]


def test_a_failed_notification_is_logged_never_raised_and_its_secret_redacted(tmp_path: Path) -> None:
    secret = f"http://user:s3cr3tpass@127.0.0.1:{free_port()}/hook?token=abcdef123456"
    run_dir = _run_dir(tmp_path, {"webhook": secret, "timeout_s": 2})
    notifier = notify.notifier_for(run_dir)
    assert notifier is not None
    ok = notify.send(notifier, run_dir, notify.build(run_dir, "failed", {"error": "boom"}, source="job"))
    assert ok is False
    (logged,) = reports.read_jsonl(run_dir / notify.NOTIFICATIONS_FILE)
    assert (
        logged["ok"] is False
        and "s3cr3tpass" not in json.dumps(logged)
        and "abcdef123456" not in json.dumps(logged)
    )
    assert (
        redact("https://hooks.slack.com/services/T0/B0/XYZsecret")
        == "https://hooks.slack.com/services/<redacted>"
    )


def test_a_command_gets_the_notification_on_stdin_and_the_url_may_come_from_a_variable(
    hook: Hook, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "got.json"
    monkeypatch.setenv("MY_HOOK_URL", hook.url)
    run_dir = _run_dir(
        tmp_path, {"webhook_env": "MY_HOOK_URL", "command": f"cat > {out}", "events": ["hung"]}
    )
    listener = notify.event_listener("job")
    listener(run_dir, {"event": "exit", "reason": "completed", "step": 3})  # not in events: nothing
    listener(run_dir, {"event": "exit", "reason": "hung", "step": 4, "time": 5.0})
    assert [b["kind"] for b in hook.bodies] == ["hung"]
    assert json.loads(out.read_text())["text"] == "moe-orch run-1: attempt - hung at step 4"
    with pytest.raises(ConfigError, match="MY_HOOK_URL is not in cluster"):
        load_config(TINY_SLURM, ["notify.webhook_env=MY_HOOK_URL"])
    with pytest.raises(ConfigError, match="set either notify"):
        load_config(
            TINY_SLURM, ["notify.webhook=http://x", "notify.webhook_env=A", "cluster.env_passthrough=[A]"]
        )


def test_watch_notifies_once_an_attempt_that_ended_without_an_exit_event(hook: Hook, tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path, {"webhook": hook.url})
    rec = _record(run_dir)
    rec.attempts[0] = Attempt(
        number=1, job_id="12", attempt_key="12.0", state=AttemptState.ENDED, stop_reason=StopReason.NODE_FAIL,
        ended=9.0, last_step=40, error="SLURM state NODE_FAIL without an exit event from the worker",
    )  # fmt: skip
    rec.state, rec.state_reason = RunState.FAILED, "4 failed attempts, more than cluster.max_failures=3"
    evs = [{"event": "start", "attempt_key": "12.0", "job_id": "12"}]
    assert notify.notify_unreported(run_dir, rec, evs) == 2
    assert notify.notify_unreported(run_dir, rec, evs) == 0, "each once"
    assert [(b["kind"], b["source"]) for b in hook.bodies] == [("failed", "watch"), ("failed", "watch")]
    assert (
        hook.bodies[1]["text"]
        == "moe-orch run-1: run failed: 4 failed attempts, more than cluster.max_failures=3"
    )
    assert runs.RUN_FILE not in {p.name for p in run_dir.iterdir()}, "watch's notifications write no run.json"
