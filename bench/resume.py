"""Resume: process start to first optimizer step, resuming from a checkpoint against a fresh start.

    python -m bench.resume            # tiny-cpu, 2 ranks (torchrun), 3 attempts of each kind
    python -m bench.resume --smoke    # 1 attempt of each (CI)

An attempt is `torchrun --nproc_per_node 2 -m worker --config run.yaml --run-dir DIR` (the local
launch path; SLURM adds its own scheduling delay on top). Times, all from the same clock
(`time.time()`; events.jsonl times come from rank 0):
- launch: the benchmark's clock just before it spawns torchrun (what a requeued job's start is);
- ranks up: the newer start time of the two rank processes (/proc/<pid>/stat; torchrun's start
  and its spawn included);
- `start` event: after imports, process group, tokenizer, data, model, DeepSpeed engine and, when
  resuming, `select_resume_checkpoint` (xxh3_128 of every file) + `load_checkpoint`;
- `first_step` event: written when the first optimizer step has ended.
The compared number is launch -> first_step. A fresh start also runs the step-0 evaluation before
its first step (the worker's baseline eval), a resume does not: the note shows both parts.

Setup (untimed): one run of `configs/tiny-cpu.yaml` with `training.max_steps` = `save_steps` = 10
completes and leaves `checkpoints/step-000010`. Each resumed attempt gets a copy of that run
directory and `max_steps` 20 (it resumes at step 10, its first step is 11); each fresh attempt gets
an empty directory and the same config. Attempts alternate (fresh, resume, fresh, ...); each is
killed (SIGKILL to its process group) once its first_step event is there.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Result, markdown_table, write_results
from orchestrator.rundir.reports import read_events

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "tiny-cpu.yaml"
WORLD = 2
SAVED_STEP = 10
TIMEOUT_S = 300.0


def write_config(path: Path, max_steps: int) -> Path:
    """tiny-cpu with `max_steps`, a save every SAVED_STEP steps, resolved (absolute data path)."""
    from orchestrator.spec.loading import dump_config, load_config

    sets = [f"training.max_steps={max_steps}", f"training.save_steps={SAVED_STEP}"]
    cfg = load_config(CONFIG, [*sets, "training.logging_steps=1"])
    path.write_text(dump_config(cfg), encoding="utf-8")
    return path


def _boot_time() -> float:
    with open("/proc/stat", encoding="utf-8") as f:
        for line in f:
            if line.startswith("btime"):
                return float(line.split()[1])
    raise RuntimeError("no btime in /proc/stat")


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, start time in Unix seconds) of `pid`, from /proc/<pid>/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[1]), _boot_time() + int(fields[19]) / ticks


def descendants(root: int) -> dict[int, tuple[int, float]]:
    """Every live descendant of `root`: pid -> (parent pid, start time in Unix seconds)."""
    table: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat:
                table[int(entry)] = stat
    found: dict[int, tuple[int, float]] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, started) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = (ppid, started)
                frontier.append(pid)
    return found


def _alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except OSError:
        return False
    return text[text.rindex(")") + 2 :].split()[0] not in ("Z", "X")


def kill_tree(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGKILL torchrun and every rank, and wait until none is left running.

    NOTE: torchrun starts each rank in its own session (elastic's subprocess handler), so killing
    torchrun's process group leaves the ranks training on; they are killed one by one."""
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes still alive after SIGKILL: {[p for p in pids if _alive(p)]}")
        time.sleep(0.05)


def attempt(run_dir: Path, config: Path, port: int) -> dict[str, Any]:
    """Launch 2 ranks on `run_dir`, wait for the first_step event, kill them; returns the times."""
    before = len(read_events(run_dir))
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1")  # fmt: skip
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(WORLD),
        "--master_addr", "127.0.0.1", "--master_port", str(port),
        "-m", "worker", "--config", str(config), "--run-dir", str(run_dir),
    ]  # fmt: skip
    log = (run_dir.parent / f"{run_dir.name}.log").open("ab")
    launch = time.time()
    proc = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    ranks: dict[int, tuple[int, float]] = {}
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            if len(ranks) < WORLD + 1:  # torchrun's ranks (and their own helpers) once they exist
                ranks.update(descendants(proc.pid))
            new = read_events(run_dir)[before:]
            first = next((e for e in new if e.get("event") == "first_step"), None)
            if first is not None:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited {proc.returncode} before a first step; see {log.name}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no first_step event after {TIMEOUT_S:.0f} s; see {log.name}")
            time.sleep(0.05)
    finally:
        kill_tree(proc)
        log.close()
    start = next(e for e in new if e.get("event") == "start")
    # NOTE: the rank processes are torchrun's direct children (their own helpers start later).
    direct = sorted(started for ppid, started in ranks.values() if ppid == proc.pid)
    ranks_up = max(direct[:WORLD]) if len(direct) >= WORLD else None
    return {
        "launch": launch,
        "ranks_up_s": None if ranks_up is None else ranks_up - launch,
        "start_s": start["time"] - launch,
        "first_step_s": first["time"] - launch,
        "resumed_from": start.get("resumed_from"),
        "first_step": first.get("step"),
    }


def measure(repeats: int) -> dict[str, Any]:
    from bench.train_step import _free_port

    with tempfile.TemporaryDirectory(prefix="bench-resume-") as tmp:
        root = Path(tmp)
        short = write_config(root / "short.yaml", SAVED_STEP)
        long = write_config(root / "long.yaml", 2 * SAVED_STEP)
        template = root / "template"
        t0 = time.perf_counter()
        res = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(WORLD),
             "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
             "-m", "worker", "--config", str(short), "--run-dir", str(template)],
            cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu"),
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if res.returncode != 0:
            raise RuntimeError(f"the setup run failed ({res.returncode}): {res.stderr[-3000:]}")
        setup_s = time.perf_counter() - t0
        ckpt_bytes = sum(p.stat().st_size for p in (template / "checkpoints").rglob("*") if p.is_file())
        samples: dict[str, list[dict[str, Any]]] = {"fresh": [], "resume": []}
        for i in range(repeats):
            for kind in ("fresh", "resume"):
                run_dir = root / f"{kind}-{i}"
                if kind == "resume":
                    shutil.copytree(template, run_dir)
                else:
                    run_dir.mkdir()
                rec = attempt(run_dir, long, _free_port())
                expected = (f"step-{SAVED_STEP:06d}", SAVED_STEP + 1) if kind == "resume" else (None, 1)
                if (rec["resumed_from"], rec["first_step"]) != expected:
                    raise RuntimeError(f"{kind} attempt: resumed_from/first step {rec} != {expected}")
                samples[kind].append(rec)
    med = {
        kind: {
            key: statistics.median(r[key] for r in recs if r[key] is not None)
            for key in ("ranks_up_s", "start_s", "first_step_s")
            if any(r[key] is not None for r in recs)
        }
        for kind, recs in samples.items()
    }
    return {"medians": med, "samples": samples, "repeats": repeats, "setup_s": round(setup_s, 1),
            "checkpoint_bytes": ckpt_bytes}  # fmt: skip


def results_from_record(rec: dict[str, Any]) -> list[Result]:
    med = rec["medians"]

    def parts(kind: str) -> str:
        m = med[kind]
        up = f"ranks up {m['ranks_up_s']:.1f}, " if "ranks_up_s" in m else ""
        return f"{up}start event {m['start_s']:.1f}, first step {m['first_step_s']:.1f} s"

    return [
        Result(
            "resume launch->first step (vs fresh)", ours=med["resume"]["first_step_s"],
            baseline=med["fresh"]["first_step_s"], unit="s wall",
            note=f"resume: {parts('resume')}; fresh: {parts('fresh')} (fresh includes the step-0 eval); "
            f"checkpoint {rec['checkpoint_bytes'] / 1e6:.1f} MB; median of {rec['repeats']}, 2 ranks, "
            "torchrun",
        ),
        Result(
            "resume launch->start event (vs fresh)", ours=med["resume"]["start_s"],
            baseline=med["fresh"]["start_s"], unit="s wall",
            note="setup incl. checkpoint verify + load (resume) vs none (fresh)",
        ),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="1 attempt of each kind, nothing written (CI)")
    parser.add_argument("--repeats", type=int, help="attempts of each kind (3)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write bench/results")
    parser.add_argument("--json-out", type=Path, help="also write the rows and samples to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rec = measure(args.repeats or (1 if args.smoke else 3))
    results = results_from_record(rec)
    print(markdown_table(results))
    if args.json_out:
        doc = {"results": [r.to_dict() for r in results], "record": rec}
        args.json_out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if not args.no_write and not args.smoke:
        meta = {"world": WORLD, "config": "configs/tiny-cpu.yaml", "launcher": "torchrun", "record": rec}
        print(f"wrote {write_results('resume', results, meta)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
