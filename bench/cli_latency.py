"""CLI latency: `moe-orch --help`, `validate`, and `status` over 1,000 runs, against `python -c pass`.

    python -m bench.cli_latency            # 1,000 runs, 7 timed repeats per command
    python -m bench.cli_latency --smoke    # 40 runs, 2 repeats (CI)
    git archive <rev> | tar -x -C /tmp/before
    python -m bench.cli_latency --before-tree /tmp/before   # + the same commands from that tree

`--before-tree DIR` times the same commands from another source tree (a `git archive` of an earlier
commit), in the same round-robin, each against its own generated home of the same runs: rows
`... [before]`, so a change is read side by side with what it replaced.

Bytecode: the commands run with Python's bytecode cache on (into a private `PYTHONPYCACHEPREFIX`,
filled by the warm-up round), as an installed package runs; `PYTHONDONTWRITEBYTECODE` in the
caller's environment would otherwise make every call compile moe-orch's sources again (about 70 ms
of `validate`).

Every command runs as a user runs it: a fresh process of the installed console script
(`<venv>/bin/moe-orch`), timed wall-clock from spawn to exit, round-robin with the floor
(`<venv>/bin/python -c pass`, the interpreter's own start) so a busy phase of the shared machine
hits all of them alike. Rows report the median and the ratio to the floor's median.

The `status` home is generated: `--runs` realistic run directories (run.json written through
`orchestrator.rundir.runs`, events.jsonl, progress.json, metrics.jsonl, run.yaml), half of them SLURM runs
that are still running (so `status` must ask the scheduler about them), the rest finished SLURM and
local runs. A fake `squeue` and `sacct` first on PATH (bash + awk, about as fast to start as the
real C clients) print plausible rows for the requested job ids and append one line per call to
a counter file: the row's note gives the scheduler calls per `status` invocation, which the design
requires to be one `squeue` and one `sacct` whatever the number of runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Result, markdown_table, write_results

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
VALIDATE_CONFIG = REPO / "configs" / "mpt7b-moe-4x8.yaml"
FIRST_JOB_ID = 700_000

# The fake scheduler clients. `$BENCH_FAKE_SLURM` holds jobs.psv (id|submit|start|node) and calls.log.
FAKE_SQUEUE = r"""#!/bin/bash
# Fake squeue for bench/cli_latency.py: prints RUNNING rows for the -j ids found in jobs.psv.
echo "squeue $*" >> "$BENCH_FAKE_SLURM/calls.log"
ids=""
while [ $# -gt 0 ]; do
  case "$1" in -j) ids="$2"; shift 2;; -j*) ids="${1#-j}"; shift;; *) shift;; esac
done
awk -F'|' -v ids="$ids" 'BEGIN{n=split(ids,a,","); for(i=1;i<=n;i++) want[a[i]]=1}
  ($1 in want){print $1 "|RUNNING|None|" $4 "|" $2 "|" $3}' "$BENCH_FAKE_SLURM/jobs.psv"
"""
FAKE_SACCT = r"""#!/bin/bash
# Fake sacct for bench/cli_latency.py: one RUNNING row per -j id found in jobs.psv.
echo "sacct $*" >> "$BENCH_FAKE_SLURM/calls.log"
ids=""
while [ $# -gt 0 ]; do
  case "$1" in -j) ids="$2"; shift 2;; -j*) ids="${1#-j}"; shift;; *) shift;; esac
done
awk -F'|' -v ids="$ids" 'BEGIN{n=split(ids,a,","); for(i=1;i<=n;i++) want[a[i]]=1}
  ($1 in want){print $1 "|RUNNING|0:0|" $2 "|" $3 "|Unknown|" $4}' "$BENCH_FAKE_SLURM/jobs.psv"
"""


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def make_home(home: Path, n_runs: int, fake_dir: Path, now: float | None = None) -> dict[str, int]:
    """Write `n_runs` run directories under `home` and the fake scheduler's job table in `fake_dir`.

    Even-numbered runs are SLURM runs still running (attempt open, recent progress); odd ones are
    finished long ago (completed SLURM runs, and every fourth a completed local run).
    Returns counts per kind."""
    from orchestrator.rundir import runs

    stamp = now if now is not None else time.time()
    home.mkdir(parents=True, exist_ok=True)
    fake_dir.mkdir(parents=True, exist_ok=True)
    jobs: list[str] = []
    counts = {"running_slurm": 0, "completed_slurm": 0, "completed_local": 0}
    for i in range(n_runs):
        running = i % 2 == 0
        local = not running and i % 4 == 1
        created = stamp - (3600 if running else 86400 * 2) - 7 * i
        name = f"bench-{'local' if local else 'slurm'}-{i:04d}"
        run_id = runs.new_run_id(name, now=created)
        run_dir = home / run_id
        run_dir.mkdir()
        job_id = str(os.getpid() + 100_000 + i) if local else str(FIRST_JOB_ID + i)
        submitted, started = created + 2, created + 5
        total = 600
        step = 240 + i % 100 if running else total
        last_time = stamp - 1 if running else started + total * 0.5
        attempt = runs.Attempt(
            number=1,
            job_id=job_id,
            attempt_key=f"{job_id}.0",
            submitted=submitted,
            started=started,
            nodes=["n1", "n2"],
            slurm_state="RUNNING" if running else ("COMPLETED" if not local else None),
            state=runs.AttemptState.RUNNING if running else runs.AttemptState.ENDED,
            stop_reason=None if running else runs.StopReason.COMPLETED,
            exit_code=None if running else "0:0",
            first_step=1,
            last_step=step,
            ended=None if running else last_time,
            last_seen_alive=stamp - 5 if running else None,
        )
        record = runs.RunRecord(
            run_id=run_id,
            name=name,
            config_hash="0" * 64,
            created=created,
            executor="local" if local else "slurm",
            run_dir=str(run_dir),
            home=str(home),
            config_source=str(REPO / "configs" / ("tiny-cpu.yaml" if local else "tiny-slurm.yaml")),
            state=runs.RunState.RUNNING if running else runs.RunState.COMPLETED,
            budgets={"max_failures": 3, "max_preemptions": None, "max_attempts_without_progress": 3},
            attempts=[attempt],
        )
        key = attempt.attempt_key
        events: list[dict[str, Any]] = [
            {
                "event": "start", "time": started + 8, "job_id": job_id, "restart": 0, "attempt_key": key,
                "nodes": ["n1", "n2"], "world_size": 2, "resumed_from": None, "resumed_step": 0,
                "steps_redone": 0,
            },
            {"event": "first_step", "time": started + 10, "step": 1},
        ]  # fmt: skip
        for s in range(50, step + 1, 50):
            events.append(
                {"event": "checkpoint", "time": started + 10 + s * 0.5, "tag": f"step-{s:06d}", "step": s,
                 "save_s": 0.4, "bytes": 9_000_000}
            )  # fmt: skip
        if not running:
            events.append(
                {"event": "exit", "time": last_time, "reason": "completed", "step": step, "requeued": False,
                 "error": None}
            )  # fmt: skip
        _write_jsonl(run_dir / "events.jsonl", events)
        metrics = [
            {"step": s, "loss": 6.0 - s / 200, "lr": 3e-3, "time": started + s * 0.5}
            for s in range(5, step + 1, 5)
        ]
        _write_jsonl(run_dir / "metrics.jsonl", metrics)
        progress = {
            "step": step, "total_steps": total, "epoch": 0, "loss": 4.2, "tokens_per_s": 5400.0,
            "step_time_s": 0.5, "time": last_time, "attempt_key": key,
        }  # fmt: skip
        (run_dir / "progress.json").write_text(json.dumps(progress), encoding="utf-8")
        (run_dir / "run.yaml").write_text(f"name: {name}\n", encoding="utf-8")
        runs.write_run(run_dir, record)
        # NOTE: written after run.json so `updated` is newer than events.jsonl, as after a real poll.
        os.utime(run_dir / "events.jsonl", (last_time, last_time))
        if not local:
            jobs.append(f"{job_id}|{_iso(submitted)}|{_iso(started)}|n[1-2]")
        counts["completed_local" if local else ("running_slurm" if running else "completed_slurm")] += 1
    (fake_dir / "jobs.psv").write_text("\n".join(jobs) + "\n", encoding="utf-8")
    for name, text in (("squeue", FAKE_SQUEUE), ("sacct", FAKE_SACCT)):
        path = fake_dir / "bin" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        path.chmod(0o755)
    return counts


def count_calls(fake_dir: Path) -> dict[str, int]:
    """Calls of each fake client logged so far."""
    try:
        lines = (fake_dir / "calls.log").read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return {"squeue": 0, "sacct": 0}
    return {name: sum(1 for ln in lines if ln.split(" ", 1)[0] == name) for name in ("squeue", "sacct")}


def _venv_bin() -> Path:
    return Path(sys.executable).parent


def _timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    res = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {res.returncode}: {res.stderr[-2000:]}")
    return elapsed


def _launcher(folder: Path, tree: Path) -> Path:
    """A console script like `<venv>/bin/moe-orch` that runs the moe-orch of source tree `tree`."""
    script = folder / "moe-orch-before"
    script.write_text(
        f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(tree)!r})\n"
        "from orchestrator.cli import main\nsys.exit(main())\n",
        encoding="utf-8",
    )
    script.chmod(0o755)
    return script


def _commands(moe_orch: str, configs: Path, suffix: str) -> dict[str, list[str]]:
    return {
        f"help{suffix}": [moe_orch, "--help"],
        f"validate{suffix}": [moe_orch, "validate", str(configs / VALIDATE_CONFIG.name)],
        f"status{suffix}": [moe_orch, "status"],
        # Before `--all` existed, `status` showed every run.
        f"status --all{suffix}": [moe_orch, "status", *(["--all"] if not suffix else [])],
    }


def measure(
    n_runs: int, repeats: int, warmup: int = 1, before_tree: Path | None = None
) -> tuple[list[Result], dict[str, Any]]:
    """Time the commands and the floor round-robin (and the same commands of `before_tree`);
    returns the rows and the raw samples."""
    moe_orch = shutil.which("moe-orch", path=str(_venv_bin())) or str(_venv_bin() / "moe-orch")
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        home, fake = Path(tmp) / "home", Path(tmp) / "fake-slurm"
        t0 = time.perf_counter()
        kinds = make_home(home, n_runs, fake)
        make_s = time.perf_counter() - t0
        env = dict(os.environ)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env.update(
            PATH=f"{fake / 'bin'}{os.pathsep}{env.get('PATH', '')}",
            BENCH_FAKE_SLURM=str(fake),
            MOE_ORCH_HOME=str(home),
            COLUMNS="200",
            PYTHONPYCACHEPREFIX=str(Path(tmp) / "pycache"),
        )
        envs: dict[str, dict[str, str]] = {}
        commands = {"floor": [sys.executable, "-c", "pass"]}
        commands.update(_commands(moe_orch, VALIDATE_CONFIG.parent, ""))
        if before_tree is not None:
            old_home, old_fake = Path(tmp) / "home-before", Path(tmp) / "fake-slurm-before"
            make_home(old_home, n_runs, old_fake)
            old = _commands(str(_launcher(Path(tmp), before_tree)), before_tree / "configs", " [before]")
            commands.update(old)
            envs = {name: {**env, "MOE_ORCH_HOME": str(old_home), "BENCH_FAKE_SLURM": str(old_fake),
                           "PATH": f"{old_fake / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
                    for name in old}  # fmt: skip
        samples: dict[str, list[float]] = {name: [] for name in commands}
        status_calls: list[dict[str, int]] = []
        for i in range(warmup + repeats):
            for name, argv in commands.items():
                before = count_calls(fake)
                t = _timed(argv, envs.get(name, env))
                if name in ("status", "status --all"):
                    after = count_calls(fake)
                    status_calls.append({k: after[k] - before[k] for k in after})
                if i >= warmup:
                    samples[name].append(t)
        other_calls = count_calls(fake)
        total_status = {k: sum(c[k] for c in status_calls) for k in other_calls}
        stray = {k: other_calls[k] - total_status[k] for k in other_calls}
    med = {name: statistics.median(values) for name, values in samples.items()}
    per_call = {k: max(c[k] for c in status_calls) for k in ("squeue", "sacct")}
    floor_ms = 1e3 * med["floor"]
    spread = {name: (1e3 * min(v), 1e3 * max(v)) for name, v in samples.items()}

    def note(name: str) -> str:
        lo, hi = spread[name]
        return f"min {lo:.0f}, max {hi:.0f} ms over {repeats}"

    results = [Result("cli python -c pass (floor)", ours=floor_ms, unit="ms wall", note=note("floor"))]
    for suffix in ("", " [before]") if before_tree is not None else ("",):
        results += [
            Result(f"cli moe-orch --help{suffix}", ours=1e3 * med[f"help{suffix}"], baseline=floor_ms,
                   unit="ms wall", note=note(f"help{suffix}")),
            Result(f"cli moe-orch validate mpt7b-moe-4x8{suffix}", ours=1e3 * med[f"validate{suffix}"],
                   baseline=floor_ms, unit="ms wall", note=note(f"validate{suffix}")),
            Result(
                f"cli moe-orch status ({n_runs} runs){suffix}", ours=1e3 * med[f"status{suffix}"],
                baseline=floor_ms, unit="ms wall",
                note=f"{note(f'status{suffix}')}; {kinds['running_slurm']} running slurm runs"
                + (f"; scheduler calls per status: squeue {per_call['squeue']}, sacct {per_call['sacct']}"
                   if not suffix else ""),
            ),
            Result(f"cli moe-orch status --all ({n_runs} runs){suffix}",
                   ours=1e3 * med[f"status --all{suffix}"], baseline=floor_ms, unit="ms wall",
                   note=note(f"status --all{suffix}") + ("; the same as status before --all existed"
                                                        if suffix else "")),
        ]  # fmt: skip
    raw = {
        "samples_s": samples,
        "medians_s": med,
        "runs": n_runs,
        "run_kinds": kinds,
        "make_home_s": round(make_s, 2),
        "scheduler_calls_per_status": status_calls,
        "scheduler_calls_outside_status": stray,
        "repeats": repeats,
        "warmup": warmup,
        "before_tree": str(before_tree) if before_tree else None,
    }
    return results, raw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="40 runs, 2 repeats, nothing written (CI)")
    parser.add_argument("--runs", type=int, default=None, help="run directories in the status home (1000)")
    parser.add_argument("--repeats", type=int, default=None, help="timed invocations per command (7)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write bench/results")
    parser.add_argument("--json-out", type=Path, help="also write the rows and raw samples to this file")
    parser.add_argument(
        "--before-tree", type=Path, help="also time the commands of this source tree (rows `[before]`)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    n_runs = args.runs or (40 if args.smoke else 1000)
    repeats = args.repeats or (2 if args.smoke else 7)
    before = args.before_tree.resolve() if args.before_tree else None
    results, raw = measure(n_runs, repeats, warmup=0 if args.smoke else 1, before_tree=before)
    print(markdown_table(results))
    if args.json_out:
        doc = {"results": [r.to_dict() for r in results], "raw": raw}
        args.json_out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if not args.no_write and not args.smoke:
        print(f"wrote {write_results('cli-latency', results, {**raw, 'timing': 'wall, fresh process'})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
