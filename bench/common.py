"""Shared helpers for the benchmarks in `bench/`: timing, result records, the machine, output files.

A benchmark script builds a list of `Result`s and hands them to `write_results`, which writes
`bench/results/<YYYY-mm-dd>-<name>.json` (records + machine description) and a `.md` table next to
it. Keep this module free of torch imports: the CLI-latency benchmark must not pay for them.

    from bench.common import Result, median_time, write_results

    t = median_time(lambda: step(), repeats=5, warmup=1)          # wall seconds
    ts = interleaved_medians({"ours": f, "stock": g}, clock=CPU_CLOCK)  # CPU seconds, round-robin
    results = [Result("moe_layer/top1/S=4096", ours=t, baseline=t_stock, unit="ms")]
    print(markdown_table(results))
    write_results("moe-layer", results, meta={"threads": 1})

Run scripts from the repository root as modules (`python -m bench.moe_layer`) or as files
(`python bench/moe_layer.py`; each script puts the root on `sys.path` itself).
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


Clock = Callable[[], float]

#: CPU seconds of this process: on a shared machine (other jobs on the same cores) wall time
#: measures the neighbours as much as the code; CPU time of a 1-thread computation does not.
CPU_CLOCK: Clock = time.process_time
WALL_CLOCK: Clock = time.perf_counter


def time_samples(
    fn: Callable[[], object], repeats: int = 5, warmup: int = 1, clock: Clock = WALL_CLOCK
) -> list[float]:
    """Seconds (by `clock`) of `repeats` calls of `fn`, after `warmup` untimed calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    for _ in range(repeats):
        # NOTE: collect garbage outside the timed region so one call's frees do not land in the next.
        gc.collect()
        start = clock()
        fn()
        samples.append(clock() - start)
    return samples


def median_time(
    fn: Callable[[], object], repeats: int = 5, warmup: int = 1, clock: Clock = WALL_CLOCK
) -> float:
    """Median seconds of one call of `fn` (the median resists the odd slow run)."""
    return statistics.median(time_samples(fn, repeats, warmup, clock))


def interleaved_medians(
    fns: Mapping[str, Callable[[], object]], repeats: int = 5, warmup: int = 1, clock: Clock = WALL_CLOCK
) -> dict[str, float]:
    """Median seconds per named function, timed round-robin (a, b, c, a, b, c, ...) so that a
    slow phase of the machine hits every contender alike; use it for A-versus-B comparisons."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name] += time_samples(fn, repeats=1, warmup=0, clock=clock)
    return {name: statistics.median(values) for name, values in samples.items()}


@dataclass
class Result:
    """One measured comparison: `ours` against `baseline` in `unit` (lower is better unless `note`
    says otherwise). `ratio` is ours / baseline, filled in when both are known."""

    name: str
    ours: float
    baseline: float | None = None
    unit: str = "ms"
    ratio: float | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if self.ratio is None and self.baseline:
            self.ratio = self.ours / self.baseline

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (no torch import: versions come from package metadata)."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "memory_gb": _memory_gb(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "deepspeed": _version("deepspeed"),
        "transformers": _version("transformers"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0 or 0.01 <= abs(value) < 100000:
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return f"{value:.3e}"


def _is_plain(value: object) -> bool:
    """A scalar, or a flat list of scalars: worth a place in the markdown settings line."""
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, (str, int, float, bool)) for v in value)
    return isinstance(value, (str, int, float, bool))


def markdown_table(results: Sequence[Result]) -> str:
    """The records as a GitHub markdown table (also what the scripts print)."""
    lines = ["| name | ours | baseline | unit | ratio | note |", "|---|---:|---:|---|---:|---|"]
    for r in results:
        lines.append(
            f"| {r.name} | {_fmt(r.ours)} | {_fmt(r.baseline)} | {r.unit} | {_fmt(r.ratio)} | {r.note} |"
        )
    return "\n".join(lines)


def write_results(
    name: str,
    results: Sequence[Result],
    meta: dict[str, Any] | None = None,
    out_dir: Path = RESULTS_DIR,
    date: _dt.date | None = None,
) -> Path:
    """Write `<out_dir>/<YYYY-mm-dd>-<name>.json` and `.md`; returns the JSON path.

    `meta` holds what a reader needs to reproduce the run (sizes, repeats, threads, command); its
    scalar and list entries are also shown above the markdown table, nested records only in JSON.
    """
    day = (date or _dt.datetime.now(_dt.timezone.utc).date()).isoformat()
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{day}-{name}"
    machine = machine_info()
    doc = {
        "name": name,
        "date": day,
        "machine": machine,
        "meta": meta or {},
        "results": [r.to_dict() for r in results],
    }
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    md = [
        f"# {name} ({day})",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GB; "
        f"torch {machine['torch']}, deepspeed {machine['deepspeed']}.",
    ]
    scalars = {k: v for k, v in (meta or {}).items() if _is_plain(v)}
    if scalars:
        md.append("")
        md.append("Settings: " + ", ".join(f"{k}={v}" for k, v in scalars.items()))
    md += ["", markdown_table(results), ""]
    stem.with_suffix(".md").write_text("\n".join(md), encoding="utf-8")
    logger.info("wrote %s", json_path)
    return json_path


def tiny_model_config(
    name: str,
    *,
    d_model: int,
    n_layers: int,
    n_heads: int,
    vocab: int,
    seq: int,
    micro_batch: int,
    moe: dict[str, Any],
    tasks_per_node: int = 1,
    gpus_per_node: int = 0,
) -> Any:
    """The `RunConfig` of a benchmark model: a random `tiny` MPT of this shape, one local node,
    no gradient accumulation, ZeRO-2, bf16 on GPUs and fp32 on CPU. `moe` is the config's `moe:`
    section (enabled, num_experts, top_k, ep_size, implementation)."""
    from orchestrator.spec.schema import RunConfig

    return RunConfig.model_validate(
        {
            "name": name,
            "cluster": {
                "executor": "local", "nodes": 1, "tasks_per_node": tasks_per_node,
                "gpus_per_node": gpus_per_node, "cpus_per_task": 1,
            },
            "model": {
                "name_or_path": "tiny",
                "tiny": {
                    "d_model": d_model, "n_layers": n_layers, "n_heads": n_heads, "expansion_ratio": 4,
                    "vocab_size": vocab, "max_seq_len": seq,
                },
            },
            "moe": moe,
            "data": {"max_seq_length": seq, "max_target_length": seq // 2},
            "training": {
                "precision": "bf16" if gpus_per_node else "fp32",
                "micro_batch_size": micro_batch,
                "gradient_accumulation_steps": 1,
                "zero_stage": 2,
                "learning_rate": 1e-4,
                "warmup_steps": 0,
                "max_grad_norm": 1.0,
            },
        }
    )  # fmt: skip
