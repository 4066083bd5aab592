"""What heartbeats cost a training step: the step time with the pulse and the watchdog thread against
the same steps without them, in one run (issue 11: under 1 % of step time).

A step here is what a rank's main thread does between phase changes: work that releases the GIL
(sha256 over a buffer, as torch's kernels release it) in the same phases as worker.loop (data,
forward, backward, optimizer, collective: 8 `Pulse.enter` calls per step with one micro-batch),
with `step_done` at the end. The watchdog runs as in a job, writing its heartbeat file every
`--heartbeat-s` seconds (1 s here, ten times the default rate) and checking for a stall every
second. Runs alternate (A/B/A/B...) so drift on a shared machine hits both.

    python -m bench.heartbeat            # 5 pairs of 300 steps of ~20 ms
    python -m bench.heartbeat --smoke    # seconds (CI)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Result, markdown_table, write_results
from worker.heartbeat import Pulse, Watchdog

PHASES = ("data", "forward", "backward", "optimizer", "collective")


def run_steps(steps: int, buffer: bytes, chunks: int, pulse: Pulse | None) -> tuple[float, float]:
    """Wall and process CPU seconds per step over `steps` steps (each `chunks` sha256 passes over
    `buffer`); CPU time counts the watchdog thread too and little of the neighbours' load."""
    started, cpu = time.perf_counter(), time.process_time()
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        for n in range(chunks):
            if pulse is not None and n % max(1, chunks // len(PHASES)) == 0:
                pulse.enter(PHASES[min(len(PHASES) - 1, n * len(PHASES) // chunks)])
            hashlib.sha256(buffer).digest()
        if pulse is not None:
            pulse.enter("collective")
            pulse.enter("data")
            pulse.enter("collective")
            pulse.step_done(step, time.perf_counter() - t0, 0.0)
    return (time.perf_counter() - started) / steps, (time.process_time() - cpu) / steps


def measure(
    pairs: int, steps: int, heartbeat_s: float, chunk_mb: int, chunks: int
) -> tuple[list[Result], dict[str, Any]]:
    buffer = b"\x01" * (chunk_mb << 20)
    base: list[tuple[float, float]] = []
    ours: list[tuple[float, float]] = []
    enter_ns: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-heartbeat-") as tmp:
        for i in range(pairs):
            base.append(run_steps(steps, buffer, chunks, None))
            pulse = Pulse(rank=0, attempt_key=f"bench.{i}", configured_limit_s=None)
            dog = Watchdog(pulse, Path(tmp), heartbeat_s=heartbeat_s, on_stall=lambda p: None)
            dog.start()
            pulse.training_starts(0)
            ours.append(run_steps(steps, buffer, chunks, pulse))
            dog.stop()
            n = 100_000
            t0 = time.perf_counter()
            for _ in range(n):
                pulse.enter("forward")
            enter_ns.append(1e9 * (time.perf_counter() - t0) / n)
        beats = sorted(Path(tmp).rglob("rank-0.json"))
        written = json.loads(beats[-1].read_text()) if beats else {}
    med_base, med_ours = statistics.median(b[0] for b in base), statistics.median(o[0] for o in ours)
    cpu_base, cpu_ours = statistics.median(b[1] for b in base), statistics.median(o[1] for o in ours)
    results = [
        Result(
            "heartbeat step CPU time (pulse + watchdog)", ours=1e3 * cpu_ours, baseline=1e3 * cpu_base,
            unit="CPU ms/step",
            note="process CPU time, watchdog thread included; overhead "
            f"{100 * (cpu_ours / cpu_base - 1):+.2f} %",
        ),
        Result(
            "heartbeat step time (pulse + watchdog)", ours=1e3 * med_ours, baseline=1e3 * med_base,
            unit="ms/step",
            note=f"{pairs} A/B pairs of {steps} steps, heartbeat every {heartbeat_s:g} s; overhead "
            f"{100 * (med_ours / med_base - 1):+.2f} %",
        ),
        Result("heartbeat Pulse.enter", ours=statistics.median(enter_ns), unit="ns/call",
               note="8 calls per step with one micro-batch (2 more per extra micro-batch)"),
    ]  # fmt: skip
    raw = {"base_s": base, "ours_s": ours, "enter_ns": enter_ns, "last_heartbeat": written}
    return results, raw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="1 pair of 20 short steps, nothing written (CI)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write bench/results")
    parser.add_argument("--json-out", type=Path, help="also write the rows and raw samples to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.smoke:
        results, raw = measure(pairs=1, steps=20, heartbeat_s=0.05, chunk_mb=1, chunks=5)
    else:
        results, raw = measure(pairs=5, steps=300, heartbeat_s=1.0, chunk_mb=4, chunks=5)
    print(markdown_table(results))
    if args.json_out:
        args.json_out.write_text(
            json.dumps({"results": [r.to_dict() for r in results], "raw": raw}, indent=2) + "\n"
        )
    if not args.no_write and not args.smoke:
        write_results("heartbeat", results, {"command": "python -m bench.heartbeat"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
