"""`moe-orch validate`: every check that can run before the queue wait, and the numbers of the run.

`validate(cfg)` checks what the schema cannot see (data files, values SLURM cannot take) and
returns a `Summary`: world and parallel sizes, the global batch as its product, tokens per step,
parameter counts and the ZeRO model-state memory per GPU. `summary_rows` turns it into plain
(label, value) text; the CLI draws it with rich.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.backends import backend_for
from orchestrator.errors import DataFileError
from orchestrator.rundir import access, reports
from orchestrator.rundir.access import HomeMode
from orchestrator.rundir.runs import runs_home
from orchestrator.spec.estimate import MemoryEstimate, ParamCounts, architecture, estimate_memory
from orchestrator.spec.loading import load_config
from orchestrator.spec.qa_format import check_data_files
from orchestrator.spec.schema import RunConfig
from orchestrator.spec.secrets import missing_names

logger = logging.getLogger(__name__)

WarningCheck = Callable[[RunConfig], list[str]]


@dataclass
class Summary:
    """The numbers `validate` reports for a valid config."""

    name: str
    executor: str
    nodes: int
    tasks_per_node: int
    world_size: int
    data_parallel_size: int
    ep_size: int
    expert_parallel_groups: int  # world / ep_size: how many full copies of every expert exist
    experts_per_rank: int  # per MoE layer; 0 for a dense layout
    moe_layers: int | None  # None when the architecture is unknown offline
    micro_batch_size: int
    gradient_accumulation_steps: int
    global_batch_size: int
    tokens_per_step: int
    precision: str
    zero_stage: int
    params: ParamCounts | None
    active_params_per_token: int | None
    memory: MemoryEstimate | None
    gpu_mem_gb: float | None
    warnings: list[str] = field(default_factory=list)
    env_passthrough: list[str] = field(default_factory=list)  # names only, never values
    topology_change: list[str] = field(default_factory=list)  # vs `--run`'s checkpoints (spec/topology.py)


def _warn_unknown_architecture(cfg: RunConfig) -> list[str]:
    if architecture(cfg) is not None:
        return []
    return [
        f"model {cfg.model.name_or_path!r} is not a known MPT and has no local config.json, so there "
        "is no parameter count or memory estimate (and cluster.gpu_mem_gb is not checked)"
    ]


def _warn_gpu_mem_unset(cfg: RunConfig) -> list[str]:
    if cfg.cpu_only or cfg.cluster.gpu_mem_gb is not None:
        return []
    return ["cluster.gpu_mem_gb is unset, so the memory estimate is not checked against the GPUs"]


def _warn_memory_tight(cfg: RunConfig) -> list[str]:
    gpu = cfg.cluster.gpu_mem_gb
    est = estimate_memory(cfg) if gpu is not None else None
    if gpu is None or est is None or est.total_gb <= 0.9 * gpu:
        return []
    return [
        f"model states take {est.total_gb:.1f} of {gpu:g} GB per GPU, leaving little for activations; "
        "consider model.gradient_checkpointing, a larger moe.ep_size or more ranks"
    ]


def _warn_bf16_on_cpu(cfg: RunConfig) -> list[str]:
    if not (cfg.cpu_only and cfg.training.precision == "bf16"):
        return []
    return [
        "training.bf16_on_cpu trains bf16 on CPUs, 2-4x slower than fp32: meant for tests of the bf16 "
        "path, not for real runs"
    ]


def _warn_passthrough_unset(cfg: RunConfig) -> list[str]:
    missing = missing_names(cfg.cluster.env_passthrough, os.environ)
    if not missing:
        return []
    return [
        f"cluster.env_passthrough: {', '.join(missing)} not set in this shell; `submit` refuses "
        f"until it is exported (`export {missing[0]}=...`)"
    ]


def _warn_scheduler(cfg: RunConfig) -> list[str]:
    """The backend's own advice (SLURM: signal_delay_s against time_min, no partition)."""
    return backend_for(cfg.cluster.executor).config_warnings(cfg)


WARNING_CHECKS: list[WarningCheck] = [
    _warn_unknown_architecture,
    _warn_gpu_mem_unset,
    _warn_memory_tight,
    _warn_bf16_on_cpu,
    _warn_passthrough_unset,
    _warn_scheduler,
]
"""Advice that does not stop a run. Append a check here (e.g. signal_delay_s against a measured
save time) and `validate`, `submit` and the CLI show it."""


# --- signal lead time against measured checkpoint saves ------------------------------------------

SAVE_MARGIN = 2.0
"""`cluster.signal_delay_s` should be at least this many times the longest measured save."""


@dataclass(frozen=True)
class MeasuredSave:
    """The longest checkpoint save seen in earlier runs (events.jsonl `checkpoint` events)."""

    save_s: float
    tag: str
    run_dir: Path
    saves: int  # how many saves were looked at


def layout_key(model: Any, moe: Any) -> tuple[Any, ...]:
    """What makes two runs' checkpoints alike: the model and the MoE layout (plain dicts, as in a
    run.yaml, so other runs' files need no validation)."""
    model = model if isinstance(model, dict) else {}
    moe = moe if isinstance(moe, dict) else {}
    tiny = json.dumps(model.get("tiny"), sort_keys=True) if model.get("name_or_path") == "tiny" else None
    fields = ("enabled", "num_experts", "ep_size", "layers", "implementation")
    return (model.get("name_or_path"), model.get("revision"), tiny, *(json.dumps(moe.get(f)) for f in fields))


def _cfg_layout(cfg: RunConfig) -> tuple[Any, ...]:
    data = cfg.model_dump(mode="json")
    return layout_key(data.get("model"), data.get("moe"))


def runs_with_layout(cfg: RunConfig, home: Path) -> list[Path]:
    """Run directories under `home` that saved checkpoints for the same model and MoE layout."""
    found: list[Path] = []
    if not home.is_dir():
        return found
    for run_dir in sorted(home.iterdir()):
        if not reports.events_path(run_dir).is_file():
            continue
        try:
            data = yaml.safe_load((run_dir / "run.yaml").read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(data, dict) and layout_key(data.get("model"), data.get("moe")) == _cfg_layout(cfg):
            found.append(run_dir)
    return found


def measured_save(run_dirs: Iterable[Path]) -> MeasuredSave | None:
    """The longest `save_s` of the `checkpoint` events of `run_dirs` (None when there is none)."""
    best: MeasuredSave | None = None
    count = 0
    for run_dir in run_dirs:
        try:
            events = reports.read_events(run_dir)
        except OSError:
            continue  # unreadable (e.g. permissions): skip that run
        for ev in events:
            if ev.get("event") != "checkpoint":
                continue
            save_s = ev.get("save_s")
            if not isinstance(save_s, (int, float)):
                continue
            count += 1
            if best is None or save_s > best.save_s:
                best = MeasuredSave(float(save_s), str(ev.get("tag")), run_dir, 0)
    if best is None:
        return None
    return MeasuredSave(best.save_s, best.tag, best.run_dir, count)


def signal_vs_save_check(run_dirs: Sequence[Path]) -> WarningCheck:
    """A warning check: `signal_delay_s` against the saves measured in `run_dirs`."""

    def check(cfg: RunConfig) -> list[str]:
        measured = measured_save(run_dirs)
        delay = cfg.cluster.signal_delay_s
        if measured is None or delay >= SAVE_MARGIN * measured.save_s:
            return []
        need = math.ceil(SAVE_MARGIN * measured.save_s)
        return [
            f"cluster.signal_delay_s {delay} is less than twice the longest measured checkpoint save "
            f"({measured.save_s:.1f} s, {measured.tag} of run {measured.run_dir.name}, {measured.saves} "
            f"save(s) looked at): a stop signal may not leave time to save; set cluster.signal_delay_s "
            f">= {need}"
        ]

    return check


def history_runs(cfg: RunConfig, *, home: Path | None = None, run_dir: Path | None = None) -> list[Path]:
    """Where to look for measured saves: the run `run_dir`, else runs under `home` with the same
    model and MoE layout as `cfg`."""
    if run_dir is not None:
        return [run_dir]
    if home is not None:
        return runs_with_layout(cfg, home)
    return []


def collect_warnings(cfg: RunConfig, checks: Iterable[WarningCheck] = ()) -> list[str]:
    """Every warning for `cfg`: the registered checks, then `checks`."""
    out: list[str] = []
    for check in [*WARNING_CHECKS, *checks]:
        out.extend(check(cfg))
    return out


def check_files(cfg: RunConfig) -> None:
    """Raise DataFileError when a data file is missing or has bad lines (each issue at file:line)."""
    issues = check_data_files(cfg)
    if issues:
        raise DataFileError(issues)


def summarize(cfg: RunConfig, warnings: list[str] | None = None) -> Summary:
    """The numbers of a (valid) config, with no file access beyond a local model's config.json."""
    arch = architecture(cfg)
    params = estimate = None
    moe_layers = None
    if arch is not None:
        estimate = estimate_memory(cfg)
        params = estimate.params if estimate is not None else None
        moe_layers = len(cfg.moe.moe_layer_indices(arch.n_layers))
    active = params.active_per_token(cfg.moe.top_k, cfg.moe.num_experts) if params is not None else None
    return Summary(
        name=cfg.name,
        executor=cfg.cluster.executor,
        nodes=cfg.cluster.nodes,
        tasks_per_node=cfg.cluster.tasks_per_node,
        world_size=cfg.world_size,
        data_parallel_size=cfg.data_parallel_size,
        ep_size=cfg.ep_size,
        expert_parallel_groups=cfg.expert_data_parallel_size,
        experts_per_rank=cfg.moe.num_experts // cfg.ep_size if cfg.moe.enabled else 0,
        moe_layers=moe_layers,
        micro_batch_size=cfg.training.micro_batch_size,
        gradient_accumulation_steps=cfg.training.gradient_accumulation_steps,
        global_batch_size=cfg.global_batch_size,
        tokens_per_step=cfg.tokens_per_step,
        precision=cfg.training.precision,
        zero_stage=cfg.training.zero_stage,
        params=params,
        active_params_per_token=active,
        memory=estimate,
        gpu_mem_gb=cfg.cluster.gpu_mem_gb,
        warnings=list(warnings or []),
        env_passthrough=list(cfg.cluster.env_passthrough),
    )


def validate(cfg: RunConfig, *, check_data: bool = True, history: Sequence[Path] = ()) -> Summary:
    """Check what the schema cannot (data files, sbatch values) and summarise the run.

    `history`: run directories whose measured checkpoint saves `signal_delay_s` is checked against.
    Raises ConfigError / DataFileError with every issue located (field path, file:line).
    """
    # Values the scheduler cannot take (a newline in a SLURM partition name) fail here, not at submit.
    backend_for(cfg.cluster.executor).check_config(cfg)
    if check_data:
        check_files(cfg)
    extra = [signal_vs_save_check(history)] if history else []
    return summarize(cfg, collect_warnings(cfg, extra))


def validate_file(
    spec: str | Path,
    overrides: Iterable[str] = (),
    *,
    check_data: bool = True,
    home: Path | None = None,
    run_dir: Path | None = None,
) -> Summary:
    """`moe-orch validate CONFIG --set ... [--home DIR | --run RUN]`: load (a path or a shipped
    config's name) and validate; with `home`/`run_dir`, also against measured save times. The run
    home `submit` would use (`home`, else $MOE_ORCH_HOME, else ./runs) must be safe
    (RunHomeError: rundir/access.py)."""
    cfg = load_config(spec, list(overrides))
    access.check_home(runs_home(home), HomeMode.configured())
    summary = validate(cfg, check_data=check_data, history=history_runs(cfg, home=home, run_dir=run_dir))
    if run_dir is not None:
        summary.topology_change, warnings = topology_change(cfg, run_dir)
        summary.warnings += warnings
    return summary


def topology_change(cfg: RunConfig, run_dir: Path) -> tuple[list[str], list[str]]:
    """What resuming `run_dir` with `cfg` implies when the ranks or ep_size differ from the run's
    config (run.yaml): (lines to show, warnings). ConfigError when the run cannot continue so."""
    from orchestrator.spec.loading import load_resolved
    from orchestrator.spec.topology import Topology, change_lines, target_topology

    if not (run_dir / "run.yaml").is_file():
        return [], []
    old = Topology.of(load_resolved(run_dir / "run.yaml"))
    here = Topology.of(cfg)
    if old.same_layout(here):
        return [], []
    new = target_topology(old, world_size=cfg.world_size, ep_size=cfg.ep_size, where="nodes x tasks_per_node")
    warnings = []
    if here.gradient_accumulation_steps != new.gradient_accumulation_steps:
        warnings.append(
            f"training.gradient_accumulation_steps {here.gradient_accumulation_steps} gives a global batch "
            f"of {here.global_batch_size}, not the run's {old.global_batch_size}; the worker sets it to "
            f"{new.gradient_accumulation_steps} when it resumes (set it so to silence this)"
        )
    return change_lines(old, new), warnings


# --- plain-text rendering -------------------------------------------------------------------------


def human_count(n: int) -> str:
    """1234567 -> '1.23M' (parameters, tokens)."""
    for limit, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= limit:
            return f"{n / limit:.2f}{suffix}"
    return str(n)


def human_bytes(n_bytes: int) -> str:
    """Decimal units, as GPU memory is quoted: 1.5e9 -> '1.50 GB'."""
    for limit, suffix in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n_bytes >= limit:
            return f"{n_bytes / limit:.2f} {suffix}"
    return f"{n_bytes} B"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def summary_rows(s: Summary) -> list[tuple[str, str]]:
    """The summary as (label, value) lines, in reading order."""
    rows: list[tuple[str, str]] = [
        ("run", f"{s.name} ({s.executor} executor)"),
        (
            "world size",
            f"{s.world_size} = {_plural(s.nodes, 'node')} x {_plural(s.tasks_per_node, 'rank')} per node",
        ),
        ("data-parallel size", str(s.data_parallel_size)),
    ]
    if s.experts_per_rank:
        rows += [
            (
                "expert parallelism",
                f"ep_size {s.ep_size}, {_plural(s.expert_parallel_groups, 'expert-parallel group')}",
            ),
            ("experts per rank", f"{s.experts_per_rank} per MoE layer"),
        ]
        if s.moe_layers is not None:
            rows.append(("MoE layers", str(s.moe_layers)))
    else:
        rows.append(("MoE", "disabled (dense layout)"))
    rows += [
        (
            "global batch",
            f"{s.global_batch_size} = {s.micro_batch_size} micro x {s.gradient_accumulation_steps} "
            f"accumulation x {s.data_parallel_size} data-parallel",
        ),
        ("tokens per step", f"{human_count(s.tokens_per_step)} (at most: every sequence at max_seq_length)"),
        ("precision / ZeRO", f"{s.precision}, stage {s.zero_stage}"),
    ]
    if s.env_passthrough:
        rows.append(("env passthrough", ", ".join(s.env_passthrough)))  # names only, never values
    for i, line in enumerate(s.topology_change):
        rows.append(("topology change" if i == 0 else "", line))
    if s.params is not None:
        p = s.params
        rows += [
            ("parameters", f"{human_count(p.total)} total ({human_count(p.expert)} in experts)"),
            ("active per token", human_count(s.active_params_per_token or p.total)),
            ("dense parent", human_count(p.dense_parent)),
        ]
    if s.memory is not None:
        m = s.memory
        limit = f" of {s.gpu_mem_gb:g} GB" if s.gpu_mem_gb is not None else ""
        rows += [
            ("model states/rank", f"{human_bytes(m.total_bytes)}{limit} (ZeRO-{m.zero_stage} estimate)"),
            (
                "  non-expert",
                f"{human_bytes(m.non_expert_bytes)}: weights {human_bytes(m.non_expert_replicated)}"
                f" + partitioned {human_bytes(m.non_expert_partitioned)}",
            ),
            (
                "  experts",
                f"{human_bytes(m.expert_bytes)}: weights {human_bytes(m.expert_replicated)}"
                f" + partitioned {human_bytes(m.expert_partitioned)}",
            ),
            ("  note", "activations and buffers come on top of model states"),
        ]
    return rows


def summary_lines(s: Summary) -> list[str]:
    """The summary's rows as aligned `label  value` lines (what `moe-orch validate` prints)."""
    rows = summary_rows(s)
    width = max(len(label) for label, _ in rows)
    return [f"{label.ljust(width)}  {value}" for label, value in rows]


def summary_text(s: Summary) -> str:
    """The summary and its warnings as plain text (logs, tests)."""
    return "\n".join([*summary_lines(s), *(f"warning: {w}" for w in s.warnings)])
