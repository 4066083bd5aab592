"""What the worker reports in the run directory: `events.jsonl`, `progress.json`, `metrics.jsonl`.

The one module that reads and writes these files (formats: docs/design.md). The worker's global
rank 0 writes them through `worker.metrics.Reporter`; `status`, `watch`, `plot`, `validate`, the
benchmarks and the tests read them here. No torch here.

- `events.jsonl`: one JSON object per line (`start`, `first_step`, `signal`, `checkpoint`,
  `exit`), each line appended and fsynced, so an event survives the kill that follows it;
- `progress.json`: rewritten atomically after every optimizer step;
- `metrics.jsonl`: one line per logged step and one `{"step", "eval_loss"}` line per evaluation.

Readers skip a torn last line (the worker may be writing it) and lines that are not JSON objects.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.rundir.atomic import atomic_write_text

EVENTS = "events.jsonl"
PROGRESS = "progress.json"
METRICS = "metrics.jsonl"


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(record, sort_keys=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | Path, *, missing_ok: bool = True) -> list[dict[str, Any]]:
    """Every complete JSON object line of a file (a torn last line is skipped); [] for a missing
    file unless not `missing_ok` (then FileNotFoundError)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        if missing_ok:
            return []
        raise
    records: list[dict[str, Any]] = []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            records.append(value)
    return records


# --- events.jsonl ----------------------------------------------------------------------------


def events_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / EVENTS


EventListener = Callable[[Path, dict[str, Any]], None]
_listeners: dict[str, EventListener] = {}


def add_event_listener(name: str, listener: EventListener) -> None:
    """Call `listener(run_dir, event)` after each event this process appends (once per `name`):
    how notifications (orchestrator/notify.py) follow the events without a second writer."""
    _listeners[name] = listener


def append_event(run_dir: str | Path, name: str, **fields: Any) -> None:
    """Append `{"event": name, "time": <now>, **fields}` and fsync it; then tell the listeners."""
    record = {"event": name, "time": time.time(), **fields}
    _append_jsonl(events_path(run_dir), record)
    for key, listener in list(_listeners.items()):
        try:
            listener(Path(run_dir), record)
        except Exception:  # a listener (a notification) never fails the writer
            logging.getLogger(__name__).exception("event listener %s failed", key)


def read_events(run_dir: str | Path) -> list[dict[str, Any]]:
    """The events of `events.jsonl`, in file order ([] when the worker has written none)."""
    return [record for record in read_jsonl(events_path(run_dir)) if "event" in record]


# --- progress.json ---------------------------------------------------------------------------


def write_progress(
    run_dir: str | Path,
    *,
    step: int,
    total_steps: int,
    epoch: int,
    loss: float,
    tokens_per_s: float,
    step_time_s: float,
    attempt_key: str,
) -> None:
    """Replace `progress.json` (atomically) with the run's position after an optimizer step."""
    record = {
        "step": step,
        "total_steps": total_steps,
        "epoch": epoch,
        "loss": loss,
        "tokens_per_s": tokens_per_s,
        "step_time_s": step_time_s,
        "time": time.time(),
        "attempt_key": attempt_key,
    }
    atomic_write_text(Path(run_dir) / PROGRESS, json.dumps(record) + "\n")


def read_progress(run_dir: str | Path) -> dict[str, Any] | None:
    """`progress.json`, or None when it is missing or unreadable."""
    try:
        data = json.loads((Path(run_dir) / PROGRESS).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --- metrics.jsonl ---------------------------------------------------------------------------


def metrics_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / METRICS


def append_metrics(run_dir: str | Path, record: dict[str, Any]) -> None:
    """One training line (step, epoch, loss, lm_loss, aux_loss, lr, grad_norm, tokens_per_s,
    step_time_s, expert_load, label_routing, routing_mi_bits, routing_mi_answer_bits,
    routing_mi_max_bits, label_routing_loss when label routing is on, max_rss_mb), as the worker
    built it (docs/design.md)."""
    _append_jsonl(metrics_path(run_dir), record)


def append_eval(run_dir: str | Path, step: int, eval_loss: float) -> None:
    """One evaluation line: `{"step", "eval_loss"}`."""
    _append_jsonl(metrics_path(run_dir), {"step": step, "eval_loss": eval_loss})


def read_metrics(run_dir: str | Path, *, missing_ok: bool = True) -> list[dict[str, Any]]:
    """Every line of `metrics.jsonl` in file order (training and eval lines; a step redone after a
    resume appears again, later). A missing file is [] unless not `missing_ok`."""
    return read_jsonl(metrics_path(run_dir), missing_ok=missing_ok)
