"""Notifications: a webhook (JSON POST) and/or a command (the notification as JSON on stdin) when an
attempt starts, is preempted (or reaches its time limit), hangs, fails, or the run completes.

Two senders, one format:
- the job itself: rank 0 (or the rank that reports a hang) writes the event to `events.jsonl`
  through `rundir/reports.append_event`, whose listener (`event_listener`, installed by the
  worker's entry point) sends the notification then, so a run chained without any login-node
  process still notifies;
- `watch` (and `submit --wait`): the same listener for the events it writes itself (a frozen job it
  ends as `hung`), and `notify_unreported` for what no event tells: an attempt that ended without
  an `exit` event (killed, node failure, lost) and a run that failed on its budgets.

A notification: `{"text": <one Slack-compatible line>, "kind", "run_id", "run_dir", "attempt_key",
"job_id", "step", "reason", "time", "source": "job"|"watch", "host", "event": {...}}`. The
webhook URL is `notify.webhook`, or the variable `notify.webhook_env` names (a secret stays out
of run.yaml). Each outcome is appended to `<run>/notifications.jsonl` (this module's file): a
failed notification is logged there and as a warning, never raised, and its error is redacted.

Standard library only: every rank may import it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.redact import redact

logger = logging.getLogger(__name__)

NOTIFICATIONS_FILE = "notifications.jsonl"
_EXIT_KINDS = {
    "completed": "completed",
    "preempted": "preempted",
    "timeout": "preempted",
    "hung": "hung",
    "failed": "failed",
    "node_fail": "failed",
    "cancelled": "cancelled",
}


@dataclass(frozen=True)
class Notifier:
    """Where a run's notifications go (its `notify` section, the webhook URL resolved)."""

    webhook: str | None
    command: str | None
    events: frozenset[str]
    timeout_s: float

    @classmethod
    def from_section(
        cls, section: Mapping[str, Any], environ: Mapping[str, str] | None = None
    ) -> Notifier | None:
        """From run.yaml's `notify` mapping; None when it sends nothing."""
        env = os.environ if environ is None else environ
        webhook = section.get("webhook")
        name = section.get("webhook_env")
        if name:
            webhook = env.get(str(name)) or None
            if webhook is None:
                logger.warning("notify.webhook_env names %s, which is not set here: no webhook", name)
        command = section.get("command")
        if not webhook and not command:
            return None
        events = section.get("events") or ["attempt_start", "preempted", "hung", "failed", "completed"]
        return cls(
            webhook=str(webhook) if webhook else None,
            command=str(command) if command else None,
            events=frozenset(str(e) for e in events),
            timeout_s=float(section.get("timeout_s") or 10.0),
        )


@functools.lru_cache(maxsize=256)
def _notifier_cached(run_yaml: str, mtime: float) -> Notifier | None:
    import yaml

    try:
        data = yaml.safe_load(Path(run_yaml).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        logger.warning("notifications: cannot read %s: %s", run_yaml, exc)
        return None
    section = data.get("notify") if isinstance(data, dict) else None
    return Notifier.from_section(section) if isinstance(section, dict) else None


def notifier_for(run_dir: Path) -> Notifier | None:
    """The run's notifier, from its run.yaml (cached while the file is unchanged)."""
    path = run_dir / "run.yaml"
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return None
    return _notifier_cached(str(path), mtime)


def kind_of(event: Mapping[str, Any]) -> str | None:
    """The notification kind of a worker event (`start`, `exit`), or None for other events."""
    if event.get("event") == "start":
        return "attempt_start"
    if event.get("event") == "exit":
        return _EXIT_KINDS.get(str(event.get("reason")), "failed")
    return None


def _text(kind: str, run_id: str, body: Mapping[str, Any]) -> str:
    key = body.get("attempt_key") or body.get("job_id") or "-"
    step = body.get("step")
    at = f" at step {step}" if step is not None else ""
    detail = {
        "attempt_start": f"attempt {key} started on {','.join(body.get('nodes') or []) or '?'}"
        + (f", resumed from {body['resumed_from']}" if body.get("resumed_from") else ""),
        "preempted": f"attempt {key} stopped ({body.get('reason')}){at}"
        + (", requeued" if body.get("requeued") else "")
        + (f", successor job {body['successor']}" if body.get("successor") else ""),
        "hung": f"attempt {key} hung{at}",
        "failed": f"attempt {key} failed{at}" + (f": {body['error']}" if body.get("error") else ""),
        "completed": f"completed{at} (attempt {key})",
        "cancelled": f"attempt {key} cancelled{at}",
    }.get(kind, kind)
    return f"moe-orch {run_id}: {detail}"


def build(run_dir: Path, kind: str, body: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """The notification for `body` (an event, or what `watch` knows of an attempt)."""
    run_id = run_dir.name
    event = {k: v for k, v in body.items() if k not in ("ledger", "topology_change")}
    return {
        "text": redact(_text(kind, run_id, body)),
        "kind": kind,
        "run_id": run_id,
        "run_dir": str(run_dir),
        "attempt_key": body.get("attempt_key"),
        "job_id": body.get("job_id"),
        "step": body.get("step", body.get("resumed_step")),
        "reason": body.get("reason"),
        "time": body.get("time", time.time()),
        "source": source,
        "host": socket.gethostname(),
        "event": json.loads(redact(json.dumps(event, default=str))),
    }


def _log(run_dir: Path, record: Mapping[str, Any]) -> None:
    try:
        with open(run_dir / NOTIFICATIONS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as exc:
        logger.warning("cannot log a notification in %s: %s", run_dir, exc)


def send(notifier: Notifier, run_dir: Path, note: Mapping[str, Any], *, attempt: int | None = None) -> bool:
    """Deliver `note` to the webhook and the command; log each outcome. Never raises."""
    ok = True
    data = json.dumps(note, default=str).encode()
    targets: list[tuple[str, Any]] = []
    if notifier.webhook:
        targets.append(("webhook", notifier.webhook))
    if notifier.command:
        targets.append(("command", notifier.command))
    for target, where in targets:
        error: str | None = None
        try:
            if target == "webhook":
                request = urllib.request.Request(
                    where, data=data, headers={"Content-Type": "application/json"}, method="POST"
                )
                with urllib.request.urlopen(request, timeout=notifier.timeout_s) as response:
                    response.read()
            else:
                res = subprocess.run(
                    where,
                    shell=True,
                    input=data,
                    capture_output=True,
                    timeout=notifier.timeout_s,
                    check=False,
                )
                if res.returncode != 0:
                    error = (
                        f"exit code {res.returncode}: {res.stderr.decode(errors='replace').strip()[-300:]}"
                    )
        except (OSError, ValueError, subprocess.SubprocessError, urllib.error.URLError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # a notification never fails the run
            error = f"{type(exc).__name__}: {exc}"
        if error is not None:
            ok = False
            logger.warning("notification %s to the %s failed: %s", note.get("kind"), target, redact(error))
        _log(
            run_dir,
            {
                "time": time.time(), "kind": note.get("kind"), "attempt_key": note.get("attempt_key"),
                "attempt": attempt, "source": note.get("source"), "target": target, "ok": error is None,
                "error": redact(error) if error else None,
            },
        )  # fmt: skip
    return ok


def event_listener(source: str) -> Any:
    """A listener for `rundir/reports.add_event_listener`: notify on each `start` and `exit` event
    written in this process, for runs whose run.yaml asks for notifications."""

    def on_event(run_dir: Path, event: Mapping[str, Any]) -> None:
        kind = kind_of(event)
        if kind is None:
            return
        notifier = notifier_for(run_dir)
        if notifier is None or kind not in notifier.events:
            return
        body = dict(event)
        if "attempt_key" not in body:  # an `exit` belongs to the attempt of the last `start`
            from orchestrator.rundir.reports import read_events

            starts = [e for e in read_events(run_dir) if e.get("event") == "start"]
            start: Mapping[str, Any] = starts[-1] if starts else {}
            body.update({k: start.get(k) for k in ("attempt_key", "job_id")})
        send(notifier, run_dir, build(run_dir, kind, body, source=source))

    on_event.__name__ = f"notify_{source}"
    return on_event


def install(source: str) -> None:
    """Notify from this process on every event it writes (the worker: `job`; `watch`)."""
    from orchestrator.rundir import reports

    reports.add_event_listener(f"notify-{source}", event_listener(source))


# --- what `watch` tells that no event does --------------------------------------------------------


def _exited_keys(events: Sequence[Mapping[str, Any]]) -> set[str]:
    keys: set[str] = set()
    current: str | None = None
    for ev in events:
        if ev.get("event") == "start":
            current = str(ev.get("attempt_key"))
        elif ev.get("event") == "exit" and current is not None:
            keys.add(current)
    return keys


def _logged(run_dir: Path) -> list[dict[str, Any]]:
    try:
        lines = (run_dir / NOTIFICATIONS_FILE).read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def notify_unreported(run_dir: Path, record: Any, events: Sequence[Mapping[str, Any]]) -> int:
    """`watch`: notify, once each, the attempts of `record` (a `runs.RunRecord`) that ended without
    an `exit` event, and a run that failed on its budgets; returns how many were sent."""
    notifier = notifier_for(run_dir)
    if notifier is None:
        return 0
    exited = _exited_keys(events)
    done = {(e.get("attempt"), e.get("kind")) for e in _logged(run_dir) if e.get("source") == "watch"}
    sent = 0
    for att in record.attempts:
        if str(att.state) != "ended" or att.stop_reason is None or (att.attempt_key or "") in exited:
            continue
        kind = _EXIT_KINDS.get(str(att.stop_reason), "failed")
        if kind not in notifier.events or (att.number, kind) in done:
            continue
        body = {
            "attempt_key": att.attempt_key, "job_id": att.job_id, "step": att.last_step,
            "reason": str(att.stop_reason), "error": att.error, "requeued": att.requeued,
            "slurm_state": att.slurm_state, "time": att.ended,
        }  # fmt: skip
        send(notifier, run_dir, build(run_dir, kind, body, source="watch"), attempt=att.number)
        sent += 1
    budget_failed = str(record.state) == "failed" and not str(record.state_reason or "").startswith("attempt")
    if budget_failed and "failed" in notifier.events and (0, "failed") not in done:
        body = {"reason": "failed", "error": record.state_reason, "time": time.time()}
        note = build(run_dir, "failed", body, source="watch")
        note["text"] = redact(f"moe-orch {run_dir.name}: run failed: {record.state_reason}")
        send(notifier, run_dir, note, attempt=0)
        sent += 1
    return sent
