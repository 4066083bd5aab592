"""Run every CPU benchmark, one after the other, and write one summary table.

    python -m bench.run_all                       # all of them (about 10-15 minutes on 2 cores)
    python -m bench.run_all --only cli-latency checkpoint
    python -m bench.run_all --smoke               # each benchmark's --smoke mode (nothing written)
    git archive REV | tar -x -C /tmp/before
    python -m bench.run_all --before-tree /tmp/before   # + that tree's rows `[before]`, same run

Each benchmark runs as its own process (`python -m bench.<module>`), exactly as when run alone,
so one crash or one leaked process group cannot spoil the others; each writes
`bench/results/<date>-<name>.{json,md}` itself. This script then reads those JSON files back and
writes `bench/results/<date>-summary.{json,md}`: every row of every benchmark, the machine, and
per benchmark its exit status, wall time and result file. A benchmark left out with `--only` or
`--skip` keeps today's earlier rows (`--summary-only` runs nothing). A benchmark that fails (or is
skipped: the preemption benchmark needs the localhost SLURM, `source /tmp/slurm-local/env.sh`) is
listed with its reason and the others still run. The GPU benchmark (`bench/gpu.sh`) runs elsewhere.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS_DIR, Result, markdown_table, write_results

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Bench:
    name: str  # the results file's name: <date>-<name>.json
    module: str  # python -m bench.<module>
    needs_slurm: bool = False
    before_tree: bool = False  # takes --before-tree DIR (rows `[before]`: that tree, in the same run)


# In the row order: CLI latency, training step, MoE layer, checkpoint, resume, preemption.
BENCHES = (
    Bench("cli-latency", "cli_latency", before_tree=True),
    Bench("train-step", "train_step", before_tree=True),
    Bench("moe-layer", "moe_layer"),
    Bench("checkpoint", "checkpoint", before_tree=True),
    Bench("resume", "resume"),
    Bench("preemption", "preemption", needs_slurm=True),
    Bench("heartbeat", "heartbeat"),
)
NAMES = [b.name for b in BENCHES]


def _today() -> str:
    return _dt.datetime.now(_dt.timezone.utc).date().isoformat()


def run_one(
    bench: Bench, smoke: bool, results_dir: Path = RESULTS_DIR, before_tree: Path | None = None
) -> dict[str, Any]:
    """Run one benchmark process; returns its status record (and its rows when it wrote them).
    `before_tree`: passed to the benchmarks that time an earlier source tree side by side."""
    from bench.preemption import cluster_up

    if bench.needs_slurm and not cluster_up():
        return {"status": "skipped", "reason": "localhost SLURM not up (source /tmp/slurm-local/env.sh)"}
    argv = [sys.executable, "-m", f"bench.{bench.module}", *(["--smoke"] if smoke else [])]
    if before_tree is not None and bench.before_tree and not smoke:
        argv += ["--before-tree", str(before_tree)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), DS_ACCELERATOR="cpu")
    started_at = time.time()
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    sys.stdout.write(proc.stdout)
    rec: dict[str, Any] = {"command": " ".join(argv[1:]), "wall_s": round(wall, 1), "rc": proc.returncode}
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-5:]
        rec.update(status="failed", reason=" | ".join(tail))
        return rec
    rec["status"] = "ok"
    if smoke:
        return rec
    path = results_dir / f"{_today()}-{bench.name}.json"
    if not path.exists() or path.stat().st_mtime < started_at:
        rec.update(status="failed", reason=f"{path.name} was not written")
        return rec
    doc = json.loads(path.read_text(encoding="utf-8"))
    rec["file"] = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
    rec["rows"] = doc["results"]
    return rec


def earlier(bench: Bench, results_dir: Path = RESULTS_DIR) -> dict[str, Any] | None:
    """Today's results file of a benchmark not run this time, as a status record (None: none)."""
    path = results_dir / f"{_today()}-{bench.name}.json"
    if not path.exists():
        return None
    doc = json.loads(path.read_text(encoding="utf-8"))
    stamp = time.strftime("%H:%M:%S", time.localtime(path.stat().st_mtime))
    return {"status": f"earlier ({stamp})", "file": str(path.relative_to(REPO)), "rows": doc["results"]}


def summarize(records: dict[str, dict[str, Any]]) -> list[Result]:
    rows: list[Result] = []
    for rec in records.values():
        for row in rec.get("rows", []):
            rows.append(Result(**row))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="each benchmark's --smoke mode; writes nothing")
    parser.add_argument("--only", nargs="+", choices=NAMES, help="run only these")
    parser.add_argument("--skip", nargs="+", choices=NAMES, default=[], help="do not run these")
    parser.add_argument(
        "--summary-only", action="store_true", help="run nothing; summarize today's results files"
    )
    parser.add_argument(
        "--before-tree", type=Path, default=None,
        help="an earlier source tree (`git archive REV | tar -x -C DIR`): the cli-latency, train-step "
        "and checkpoint benchmarks also time it, in the same run (rows `[before]`)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    chosen = [b for b in BENCHES if (not args.only or b.name in args.only) and b.name not in args.skip]
    if args.summary_only:
        chosen = []
    records: dict[str, dict[str, Any]] = {}
    for bench in BENCHES:
        if bench not in chosen:
            # NOTE: the summary always covers every benchmark: one not run now keeps today's rows.
            found = None if args.smoke else earlier(bench)
            if found:
                records[bench.name] = found
            continue
        print(f"== {bench.name} ({'smoke' if args.smoke else 'full'})", flush=True)
        records[bench.name] = run_one(bench, args.smoke, before_tree=args.before_tree)
        rec = records[bench.name]
        status = f"{rec['status']} {rec.get('wall_s', '')} s {rec.get('reason', '')}"
        print(f"== {bench.name}: {status}", flush=True)
    failed = [name for name, rec in records.items() if rec["status"] == "failed"]
    if args.smoke:
        return 1 if failed else 0
    rows = summarize(records)
    print(markdown_table(rows))
    meta = {
        "benchmarks": {name: {k: v for k, v in rec.items() if k != "rows"} for name, rec in records.items()},
        "status": ", ".join(f"{name} {rec['status']}" for name, rec in records.items()),
    }
    print(f"wrote {write_results('summary', rows, meta)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
