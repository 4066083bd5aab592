"""Preemption on the localhost SLURM: USR2 -> checkpoint durable -> job exited -> next first step.

    source /tmp/slurm-local/env.sh       # tools/slurm-local/start.sh first
    python -m bench.preemption           # 1 preempted run of configs/tiny-slurm.yaml
    python -m bench.preemption --smoke   # analysis only, on a built-in event log (no cluster, CI)

A run of `configs/tiny-slurm.yaml` (2 nodes x 1 CPU rank, 300 steps, a save every 100) is
submitted with `moe-orch submit`; once it passed step 130 the benchmark sends
`scancel --signal=USR2 <job>` and notes the time (T0). The worker's ranks agree to stop at the next
step, save, write `signal`/`checkpoint`/`exit` events and `scontrol requeue` the job; SLURM starts
the same job again (attempt 2), which resumes from that checkpoint. From events.jsonl and sacct,
in seconds after T0:
- signal event (the ranks agreed at a step boundary), checkpoint durable (its `checkpoint` event),
  worker exit (its `exit` event), job exited (sacct `End` of the REQUEUED row, 1 s resolution),
  next attempt's `start` and `first_step` events;
- steps lost: the next attempt's `steps_redone` (steps after the last durable checkpoint).
Comparisons in the same run: the stop's save against the periodic save at step 100 (`save_s`), and
the requeue's time to first step (T0 -> first step) against the first attempt's (job start ->
first step). The run is cancelled (`moe-orch cancel`) once attempt 2 has made its first step.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Result, markdown_table, write_results
from orchestrator.errors import RunNotFoundError
from orchestrator.rundir import runs
from orchestrator.rundir.reports import read_events, read_progress

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
SETS = (
    "training.max_steps=300", "training.save_steps=100", "training.logging_steps=1", "cluster.time_min=60"
)  # fmt: skip
SIGNAL_AT_STEP = 130
T = TypeVar("T")


class ClusterUnavailable(RuntimeError):
    """The localhost SLURM does not answer."""


def cluster_up() -> bool:
    if shutil.which("scontrol") is None or not os.environ.get("SLURM_CONF"):
        return False
    try:
        res = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0 and "UP" in res.stdout


def _moe_orch(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MOE_ORCH_HOME=str(home), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip


def _wait(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def _progress_step(run_dir: Path) -> int:
    step = (read_progress(run_dir) or {}).get("step")
    return step if isinstance(step, int) else 0


def sacct_text(job_id: str) -> str:
    from orchestrator.backends.slurm.scheduler import SACCT_FIELDS

    res = subprocess.run(
        ["sacct", "-D", "-X", "-P", "-n", "-j", job_id, f"--format={SACCT_FIELDS}"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    return res.stdout


def watch_queue_state(job_id: str, timeout: float = 120.0) -> dict[str, float]:
    """Poll `squeue` (every 0.1 s) from now on: Unix times the job first left RUNNING and first was
    PENDING again (a requeue). sacct's End has 1 s resolution; this has about 0.1 s."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and "pending_again" not in seen:
        argv = ["squeue", "-h", "-j", job_id, "-o", "%T"]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        now, state = time.time(), res.stdout.strip()
        if state and state != "RUNNING":
            seen.setdefault("left_running", now)
        if state == "PENDING":
            seen["pending_again"] = now
        time.sleep(0.1)
    return seen


def ensure_gone(job_id: str, timeout: float = 120.0) -> None:
    """Wait until SLURM no longer runs `job_id`, cancelling it again whenever it is pending.

    NOTE: `moe-orch cancel` of a running job is not final here: scancel's SIGTERM reaches the
    worker as a stop signal, which saves and runs `scontrol requeue`, so the job starts again (seen
    2026-11-28). A pending job cancels cleanly; the run folder must outlive the job."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        argv = ["squeue", "-h", "-j", job_id, "-o", "%T"]
        state = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False).stdout.strip()
        if state in ("", "COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED"):
            return
        if state == "PENDING":
            subprocess.run(["scancel", job_id], capture_output=True, timeout=30, check=False)
        time.sleep(0.5)
    logger.warning("job %s still %s after %.0f s; cancel it by hand", job_id, state, timeout)


def analyze(
    events: list[dict[str, Any]], sacct: str, signalled: float, queue: dict[str, float] | None = None
) -> dict[str, Any]:
    """The preemption timeline from a run's events and its job's sacct rows (no cluster needed)."""
    from orchestrator.backends.slurm.scheduler import parse_sacct

    queue = queue or {}
    starts = [e for e in events if e["event"] == "start"]
    firsts = [e for e in events if e["event"] == "first_step"]
    sig = next(e for e in events if e["event"] == "signal" and e["time"] >= signalled - 1)
    stop_step = int(sig["step"])
    saved = next(e for e in events if e["event"] == "checkpoint" and e["step"] == stop_step)
    periodic = [e for e in events if e["event"] == "checkpoint" and e["time"] < signalled]
    exited = next(e for e in events if e["event"] == "exit" and e["time"] >= sig["time"])
    rows = next(iter(parse_sacct(sacct).values()), [])
    requeued = next((r for r in rows if r.state in ("REQUEUED", "PREEMPTED")), None)
    restarted = rows[rows.index(requeued) + 1] if requeued and rows.index(requeued) + 1 < len(rows) else None
    if len(starts) < 2 or len(firsts) < 2:
        raise ValueError(f"no second attempt in the events ({len(starts)} start, {len(firsts)} first_step)")
    first_job_start = rows[0].start if rows and rows[0].start else None
    return {
        "stop_step": stop_step,
        "signal_event_s": sig["time"] - signalled,
        "checkpoint_durable_s": saved["time"] - signalled,
        "stop_save_s": saved["save_s"],
        "periodic_save_s": periodic[-1]["save_s"] if periodic else None,
        "checkpoint_bytes": saved["bytes"],
        "worker_exit_s": exited["time"] - signalled,
        "exit_reason": exited["reason"],
        "requeued": exited.get("requeued"),
        "job_exited_sacct_s": (requeued.end - signalled) if requeued and requeued.end else None,
        "job_left_running_s": (queue["left_running"] - signalled) if "left_running" in queue else None,
        "job_pending_again_s": (queue["pending_again"] - signalled) if "pending_again" in queue else None,
        "slurm_state": requeued.state if requeued else None,
        "job_restarted_s": (restarted.start - signalled) if restarted and restarted.start else None,
        "next_start_s": starts[1]["time"] - signalled,
        "next_first_step_s": firsts[1]["time"] - signalled,
        "next_first_step": firsts[1]["step"],
        "resumed_from": starts[1].get("resumed_from"),
        "steps_lost": starts[1].get("steps_redone"),
        "first_attempt_start_to_first_step_s": (
            firsts[0]["time"] - first_job_start if first_job_start else None
        ),
    }


def measure(keep: Path | None = None) -> dict[str, Any]:
    """Submit, signal, wait for attempt 2's first step, cancel; returns `analyze`'s record + ids."""
    if not cluster_up():
        raise ClusterUnavailable(
            "the localhost SLURM does not answer: run tools/slurm-local/start.sh, then "
            "`source /tmp/slurm-local/env.sh`"
        )
    with tempfile.TemporaryDirectory(prefix="bench-preempt-") as tmp:
        home = keep or Path(tmp)
        args = ["submit", "configs/tiny-slurm.yaml"]
        for s in SETS:
            args += ["--set", s]
        res = _moe_orch(home, *args)
        if res.returncode != 0:
            raise RuntimeError(f"moe-orch submit failed: {res.stdout}{res.stderr}")
        run_id = res.stdout.splitlines()[0].strip()
        run_dir = home / run_id
        job: str | None = None
        try:

            def job_id() -> str | None:
                try:
                    attempts = runs.read_run(run_dir).attempts
                except (RunNotFoundError, OSError, ValueError):
                    return None
                return attempts[0].job_id if attempts and attempts[0].job_id else None

            job = _wait("the job id", job_id, 60)
            _wait(f"step {SIGNAL_AT_STEP}", lambda: _progress_step(run_dir) >= SIGNAL_AT_STEP, 300)
            signalled = time.time()
            subprocess.run(["scancel", "--signal=USR2", job], check=True)
            queue = watch_queue_state(job)

            def second_first_step() -> bool:
                return sum(1 for e in read_events(run_dir) if e["event"] == "first_step") >= 2

            _wait("attempt 2's first step", second_first_step, 300)
            # sacct's REQUEUED row is written when the job ended; it is there by now.
            record = analyze(read_events(run_dir), sacct_text(job), signalled, queue)
        finally:
            _moe_orch(home, "cancel", run_id)
            if job is not None:
                ensure_gone(job)
    record.update(run_id=run_id, job_id=job)
    return record


# A preemption as the worker logs it (times relative to the signal at t=1000), for --smoke.
SAMPLE_EVENTS: list[dict[str, Any]] = [
    {"event": "start", "time": 940.0, "attempt_key": "7.0", "resumed_from": None, "steps_redone": 0},
    {"event": "first_step", "time": 941.0, "step": 1},
    {"event": "checkpoint", "time": 980.0, "tag": "step-000100", "step": 100, "save_s": 0.2,
     "bytes": 4_000_000},
    {"event": "signal", "time": 1000.1, "signal": "USR2", "step": 131},
    {"event": "checkpoint", "time": 1000.4, "tag": "step-000131", "step": 131, "save_s": 0.25,
     "bytes": 4_000_000},
    {"event": "exit", "time": 1000.5, "reason": "preempted", "step": 131, "requeued": True, "error": None},
    {"event": "start", "time": 1020.0, "attempt_key": "7.1", "resumed_from": "step-000131",
     "steps_redone": 0},
    {"event": "first_step", "time": 1020.2, "step": 132},
]  # fmt: skip


def sample_sacct(base: float) -> str:
    def iso(t: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(base + t))

    return (
        f"7|REQUEUED|0:0|{iso(930)}|{iso(935)}|{iso(1002)}|n[1-2]\n"
        f"7|RUNNING|0:0|{iso(1003)}|{iso(1015)}|Unknown|n[1-2]\n"
    )


def smoke_record() -> dict[str, Any]:
    base = float(int(time.time()) - 2000)
    events = [dict(e, time=base + e["time"]) for e in SAMPLE_EVENTS]
    queue = {"left_running": base + 1000.6, "pending_again": base + 1000.7}
    return dict(analyze(events, sample_sacct(base), base + 1000.0, queue), run_id="sample", job_id="7")


def results_from_record(rec: dict[str, Any]) -> list[Result]:
    def s(key: str) -> float:
        return float(rec[key]) if rec.get(key) is not None else float("nan")

    return [
        Result(
            "preemption signal->checkpoint durable", ours=s("checkpoint_durable_s"), unit="s",
            baseline=rec.get("periodic_save_s"),
            note=f"baseline: the periodic save's save_s; signal seen at a step boundary after "
            f"{s('signal_event_s'):.2f} s, stop save_s {s('stop_save_s'):.2f}, step {rec['stop_step']}",
        ),
        Result(
            "preemption signal->job exited", ours=s("job_left_running_s"), unit="s",
            baseline=rec.get("worker_exit_s"),
            note=f"squeue left RUNNING (0.1 s polls), PENDING again at {s('job_pending_again_s'):.2f} s, "
            f"sacct End of the {rec.get('slurm_state')} row {s('job_exited_sacct_s'):.0f} s (whole seconds); "
            f"baseline: the worker's exit event ({rec.get('exit_reason')}, requeued {rec.get('requeued')})",
        ),
        Result(
            "preemption signal->next first step", ours=s("next_first_step_s"), unit="s",
            baseline=rec.get("first_attempt_start_to_first_step_s"),
            note=f"job running again at {s('job_restarted_s'):.0f} s (sacct Start; requeue delay), start "
            f"event at {s('next_start_s'):.1f} s, resumed from {rec.get('resumed_from')}; baseline: "
            "attempt 1's job start (sacct) -> first step",
        ),
        Result(
            "preemption steps lost", ours=s("steps_lost"), unit="steps",
            note=f"steps_redone of attempt 2 (first step {rec.get('next_first_step')})",
        ),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="analyse a built-in event log; no cluster (CI)")
    parser.add_argument("--keep", type=Path, help="use this folder as the runs home and keep it")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write bench/results")
    parser.add_argument("--json-out", type=Path, help="also write the rows and the record to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        rec = smoke_record() if args.smoke else measure(args.keep)
    except ClusterUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = results_from_record(rec)
    print(markdown_table(results))
    if args.json_out:
        doc = {"results": [r.to_dict() for r in results], "record": rec}
        args.json_out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if not args.no_write and not args.smoke:
        meta = {"config": "configs/tiny-slurm.yaml", "sets": list(SETS), "signal_at_step": SIGNAL_AT_STEP,
                "record": rec}  # fmt: skip
        print(f"wrote {write_results('preemption', results, meta)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
