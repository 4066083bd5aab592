"""Learning: does the MoE beat its dense parent, and do experts specialise by expert_label?

    python -m bench.learning                       # DEFAULT_RUN x seeds 42 43 44, 600 steps: 27 runs of
                                                   # 30-90 s on 2 shared cores, then
                                                   # bench/results/<date>-learning.{json,md}
    python -m bench.learning --only top2 dense --seeds 42
    python -m bench.learning --smoke               # 2 variants x 1 seed x 6 steps, nothing written (CI)

Each run is `configs/tiny-cpu.yaml` (tiny MPT, sample QA data, 2 ranks over gloo, fp32) with the
routing fields of `moe:` (experts, layer kind, top-k, capacity, dropping, EP, aux and label
weights) set by the variant, so a change of the shipped default never changes what a row means,
and `training.seed` = the seed, which sets the weights, the held-out split, the data order and the
routing noise alike; every variant of one seed sees the same data.

Per run (from its metrics.jsonl):
- eval loss at equal steps: the final eval (mean loss per answer token on the held-out 5%);
- eval loss at equal wall time: per seed, the budget is the fastest variant's training time; a
  run's value is its last eval at a step reached within that budget. Training time of a step is the
  logged `step_time_s` (forward, backward, optimizer, one all-reduce; not evals, not saves), so
  time at step s = s x the run's mean logged step time. The schedule (cosine to the last step) is
  the same for all variants, so a slower variant is compared mid-schedule: a fair "what would this
  many seconds buy" only up to that;
- `routing_mi_bits` (real tokens) and `routing_mi_answer_bits` (answer tokens): mean over the last
  4 logged windows (20 steps) and the MoE layers, out of `routing_mi_max_bits`.

Variants: `dense` (moe.enabled false: the parent), `top1` (capacity 1.0, tokens dropped: the old
default), `top1-nodrop` (DeepSpeed's layer, capacity grown to fit), `top2` (capacity 1.0 per
choice, tokens dropped), `dropless` (top-1, worker/moe_dropless.py, ep_size 1), and
`<base>+label<w>` (`moe.label_routing.weight` w, `auto` assignment) for the label-routing trade-off,
on `top1-nodrop` (the shipped default; run by default) or `top2` (`--only`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
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

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "tiny-cpu.yaml"
SEEDS = (42, 43, 44)
STEPS = 600
LATE_WINDOWS = 4  # logged windows (of 5 steps) averaged for the routing MI
TIMEOUT_S = 1800.0

_MOE = {"enabled": True, "num_experts": 4, "aux_loss_weight": 0.01, "label_routing": {"weight": 0.0}}
_DS = {**_MOE, "implementation": "deepspeed", "ep_size": 2, "capacity_factor": 1.0}
VARIANTS: dict[str, dict[str, Any]] = {
    "dense": {"enabled": False},
    "top1": {**_DS, "top_k": 1, "drop_tokens": True},
    "top1-nodrop": {**_DS, "top_k": 1, "drop_tokens": False},
    "top2": {**_DS, "top_k": 2, "drop_tokens": True},
    "dropless": {**_MOE, "implementation": "dropless", "ep_size": 1, "top_k": 1},
}
"""The `moe:` section of each variant (the rest of the config is tiny-cpu's)."""
MAIN = ("dense", "top1", "top1-nodrop", "top2", "dropless")
LABEL_BASE = "top1-nodrop"
"""The label-routing curve is measured on the shipped default's routing (configs/tiny-cpu.yaml)."""
LABEL_WEIGHTS = (0.01, 0.03, 0.1, 1.0)
for _base in (LABEL_BASE, "top2"):
    for _w in LABEL_WEIGHTS:
        VARIANTS[f"{_base}+label{_w:g}"] = {**VARIANTS[_base], "label_routing": {"weight": _w}}
DEFAULT_RUN = (*MAIN, *(f"{LABEL_BASE}+label{w:g}" for w in LABEL_WEIGHTS))
"""What a plain `python -m bench.learning` runs (`--only` picks any of VARIANTS)."""


def moe_sets(moe: dict[str, Any], prefix: str = "moe") -> list[str]:
    """`--set` items for a (nested) `moe:` section."""
    out: list[str] = []
    for key, value in moe.items():
        if isinstance(value, dict):
            out += moe_sets(value, f"{prefix}.{key}")
        else:
            out.append(f"{prefix}.{key}={json.dumps(value)}")
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def train_run(run_dir: Path, variant: str, seed: int, steps: int, eval_steps: int) -> dict[str, Any]:
    """One run of `variant` with `seed` through torchrun (2 ranks); its record (see the docstring)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    sets = [
        f"training.max_steps={steps}", f"training.seed={seed}", f"training.eval_steps={eval_steps}",
        "training.logging_steps=5", f"training.save_steps={steps + 1}", "training.keep_checkpoints=1",
        *moe_sets(VARIANTS[variant]),
    ]  # fmt: skip
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "-m", "worker", "--config", str(CONFIG), "--run-dir", str(run_dir),
    ]  # fmt: skip
    for item in sets:
        argv += ["--set", item]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1")  # fmt: skip
    env.pop("MOE_ORCH_FAULT", None)
    started = time.monotonic()
    with (run_dir.parent / f"{run_dir.name}.log").open("wb") as log:
        proc = subprocess.run(
            argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=TIMEOUT_S, check=False
        )
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} seed {seed} exited {proc.returncode}; see {run_dir}.log")
    rec = run_record(run_dir)
    rec.update(variant=variant, seed=seed, steps=steps, wall_s=round(time.monotonic() - started, 1))
    return rec


def run_record(run_dir: Path) -> dict[str, Any]:
    """The numbers of one finished run, from its metrics.jsonl."""
    from orchestrator.rundir.reports import read_metrics

    lines = read_metrics(run_dir, missing_ok=False)
    train = {int(r["step"]): r for r in lines if "loss" in r}  # a later line for a step wins
    evals = {int(r["step"]): float(r["eval_loss"]) for r in lines if "eval_loss" in r}
    step_times = [float(train[s]["step_time_s"]) for s in sorted(train)]
    late = [train[s] for s in sorted(train)[-LATE_WINDOWS:]]

    def late_mi(key: str) -> float | None:
        values = [float(v) for r in late for v in (r.get(key) or {}).values()]
        return round(statistics.fmean(values), 4) if values else None

    return {
        "eval": {str(k): round(v, 5) for k, v in sorted(evals.items())},
        "final_eval_loss": evals[max(evals)],
        "mean_step_s": statistics.fmean(step_times),
        "mi_bits": late_mi("routing_mi_bits"),
        "mi_answer_bits": late_mi("routing_mi_answer_bits"),
        "mi_max_bits": late[-1].get("routing_mi_max_bits") if late else None,
        "label_routing_loss": late[-1].get("label_routing_loss") if late else None,
    }


def eval_at_time(rec: dict[str, Any], budget_s: float) -> tuple[int, float]:
    """(step, eval loss) of the last eval whose step the run reached within `budget_s` of training."""
    reached = budget_s / rec["mean_step_s"] + 1e-6
    steps = [int(s) for s in rec["eval"] if int(s) <= reached]
    step = max(steps) if steps else 0
    return step, float(rec["eval"][str(step)])


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant and seed: eval loss at equal steps and at equal wall time, MI; and per variant
    whether it beats the dense parent on every seed (both ways)."""
    by: dict[str, dict[int, dict[str, Any]]] = {}
    for rec in records:
        by.setdefault(rec["variant"], {})[int(rec["seed"])] = rec
    seeds = sorted({int(r["seed"]) for r in records})
    budget = {seed: min(by[v][seed]["mean_step_s"] * by[v][seed]["steps"] for v in by if seed in by[v])
              for seed in seeds}  # fmt: skip
    table: dict[str, Any] = {}
    dense = by.get("dense", {})
    for variant, runs in by.items():
        row: dict[str, Any] = {"seeds": {}}
        for seed, rec in sorted(runs.items()):
            t_step, t_loss = eval_at_time(rec, budget[seed])
            row["seeds"][str(seed)] = {
                "eval_loss": round(rec["final_eval_loss"], 4), "eval_loss_at_time": round(t_loss, 4),
                "step_at_time": t_step, "mean_step_ms": round(1000 * rec["mean_step_s"], 1),
                "mi_bits": rec["mi_bits"], "mi_answer_bits": rec["mi_answer_bits"],
            }  # fmt: skip
        cells = list(row["seeds"].values())
        row["mean_eval_loss"] = round(statistics.fmean(c["eval_loss"] for c in cells), 4)
        row["mean_eval_loss_at_time"] = round(statistics.fmean(c["eval_loss_at_time"] for c in cells), 4)
        row["mean_step_ms"] = round(statistics.fmean(c["mean_step_ms"] for c in cells), 1)
        mis = [c["mi_bits"] for c in cells if c["mi_bits"] is not None]
        answer = [c["mi_answer_bits"] for c in cells if c["mi_answer_bits"] is not None]
        row["mean_mi_bits"] = round(statistics.fmean(mis), 3) if mis else None
        row["mean_mi_answer_bits"] = round(statistics.fmean(answer), 3) if answer else None
        if variant != "dense" and dense:
            shared = [s for s in runs if s in dense]
            row["beats_dense_steps"] = sum(
                runs[s]["final_eval_loss"] < dense[s]["final_eval_loss"] for s in shared
            )
            row["beats_dense_time"] = sum(
                row["seeds"][str(s)]["eval_loss_at_time"] < eval_at_time(dense[s], budget[s])[1]
                for s in shared
            )
            row["seeds_compared"] = len(shared)
        table[variant] = row
    return {"seeds": seeds, "budget_s": {str(k): round(v, 2) for k, v in budget.items()}, "variants": table}


def markdown(summary: dict[str, Any]) -> str:
    """The learning table: eval loss per seed at equal steps and equal time, MI, wins over dense."""
    seeds = [str(s) for s in summary["seeds"]]
    head = ["run", *[f"seed {s}" for s in seeds], "mean", "beats dense", f"@ equal time ({'/'.join(seeds)})",
            "mean @ time", "beats dense @ time", "ms/step", "MI bits (answer)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, row in summary["variants"].items():
        cells = [row["seeds"].get(s) for s in seeds]
        steps = [f"{c['eval_loss']:.3f}" if c else "-" for c in cells]
        at_time = "/".join(f"{c['eval_loss_at_time']:.3f}@{c['step_at_time']}" if c else "-" for c in cells)
        wins = f"{row['beats_dense_steps']}/{row['seeds_compared']}" if "beats_dense_steps" in row else "-"
        wins_t = f"{row['beats_dense_time']}/{row['seeds_compared']}" if "beats_dense_time" in row else "-"
        mi = "-"
        if row["mean_mi_bits"] is not None:
            mi = f"{row['mean_mi_bits']:.2f} ({row['mean_mi_answer_bits']:.2f})"
        lines.append(
            f"| {variant} | " + " | ".join(steps) + f" | {row['mean_eval_loss']:.3f} | {wins} | {at_time} | "
            f"{row['mean_eval_loss_at_time']:.3f} | {wins_t} | {row['mean_step_ms']:.0f} | {mi} |"
        )
    return "\n".join(lines)


def results(summary: dict[str, Any]) -> list[Result]:
    """One row per variant: mean eval loss at equal steps against the dense parent's."""
    dense = summary["variants"].get("dense")
    rows = []
    for variant, row in summary["variants"].items():
        note = ""
        if "beats_dense_steps" in row:
            n = row["seeds_compared"]
            note = (f"beats dense on {row['beats_dense_steps']}/{n} seeds at equal steps, "
                    f"{row['beats_dense_time']}/{n} at equal time")  # fmt: skip
        if row["mean_mi_bits"] is not None:
            note += f"; MI {row['mean_mi_bits']:.2f} bits (answer tokens {row['mean_mi_answer_bits']:.2f})"
        rows.append(
            Result(f"learning {variant} eval loss", row["mean_eval_loss"],
                   dense["mean_eval_loss"] if dense else None, unit="loss", note=note.lstrip("; "))
        )  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help="dense and top2, 1 seed, 6 steps; nothing written"
    )
    parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="variants (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds (default: 42 43 44)")
    parser.add_argument("--steps", type=int, help=f"optimizer steps per run (default: {STEPS})")
    parser.add_argument("--runs-dir", type=Path, help="keep the run folders here (default: a temp folder)")
    parser.add_argument("--merge", type=Path, nargs="*", default=[],
                        help="earlier --json-out files whose runs join this table")  # fmt: skip
    parser.add_argument("--no-run", action="store_true", help="only tabulate the --merge files' runs")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write bench/results")
    parser.add_argument("--json-out", type=Path, help="also write the records and summary to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    variants = args.only or (["dense", "top2"] if args.smoke else list(DEFAULT_RUN))
    seeds = args.seeds or ([42] if args.smoke else list(SEEDS))
    steps = args.steps or (6 if args.smoke else STEPS)
    eval_steps = 3 if args.smoke else 25
    records: list[dict[str, Any]] = []
    for path in args.merge:
        records += json.loads(path.read_text())["records"]
    with tempfile.TemporaryDirectory(prefix="bench-learning-") as tmp:
        root = args.runs_dir or Path(tmp)
        for seed in [] if args.no_run else seeds:
            for variant in variants:
                rec = train_run(root / f"{variant}-{seed}", variant, seed, steps, eval_steps)
                logger.info("%s seed %d: eval %.4f, %.0f ms/step, MI %s (answer %s), %.0f s",
                            variant, seed, rec["final_eval_loss"], 1000 * rec["mean_step_s"], rec["mi_bits"],
                            rec["mi_answer_bits"], rec["wall_s"])  # fmt: skip
                records = [r for r in records if (r["variant"], r["seed"]) != (variant, seed)] + [rec]
    summary = summarise(records)
    table = markdown(summary)
    print(table)
    print(markdown_table(results(summary)))
    meta = {"steps": max((int(r["steps"]) for r in records), default=steps), "seeds": summary["seeds"],
            "world_size": 2, "config": "configs/tiny-cpu.yaml",
            "variants": {v: VARIANTS[v] for v in sorted({r["variant"] for r in records})},
            "summary": summary}  # fmt: skip
    if args.json_out:
        args.json_out.write_text(json.dumps({"records": records, "summary": summary, "meta": meta}, indent=2))
    if not args.no_write and not args.smoke:
        path = write_results("learning", results(summary), meta=meta)
        md = path.with_suffix(".md")
        md.write_text(md.read_text() + "\n## Eval loss per seed (lower is better)\n\n" + table + "\n" + NOTES)
    return 0


NOTES = """
Eval loss: mean loss per answer token on the held-out 5% of configs/data/qa_sample.jsonl (19
examples), at the last step (equal steps) and at the last eval (every 25 steps) the run reached within
the per-seed budget = the fastest variant's training time (`@step`). ms/step: mean logged
`step_time_s` (2 ranks on a shared 2-core machine: wall time also measures the neighbours). MI:
I(expert_label; top-1 expert) over the last 20 steps' real tokens (answer tokens only), mean over
the 2 MoE layers, of log2(min(5 labels, 4 experts)) = 2 bits.
"""


if __name__ == "__main__":
    sys.exit(main())
