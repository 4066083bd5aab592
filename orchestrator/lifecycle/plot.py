"""`plot RUN --out FILE.png`: training curves and routing from `metrics.jsonl`.

Panels: train and eval loss; tokens/s; expert load per MoE layer over steps (share of tokens per
expert, one line per expert); a heatmap of expert_label x expert (share of each label's tokens
whose first choice is each expert, averaged over the logged steps); the label/expert mutual
information per MoE layer in bits (`routing_mi_bits`, dashed: answer tokens only, dotted: its
ceiling log2(min(labels, experts))). matplotlib (Agg) is imported
inside `plot_run`, so the CLI starts fast.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import PlotError
from orchestrator.rundir import reports

logger = logging.getLogger(__name__)


@dataclass
class Series:
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    tps_steps: list[int] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    # layer -> (steps, [share per expert] per step)
    expert_load: dict[str, tuple[list[int], list[list[float]]]] = field(default_factory=dict)
    # label -> summed shares and count, for the mean
    label_sum: dict[str, list[float]] = field(default_factory=dict)
    label_n: dict[str, int] = field(default_factory=dict)
    # layer -> (steps, MI in bits), on real tokens and on answer tokens; the ceiling
    mi: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    mi_answer: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    mi_max: float | None = None

    def label_matrix(self) -> tuple[list[str], list[list[float]]]:
        labels = sorted(self.label_sum)
        return labels, [[v / max(1, self.label_n[lab]) for v in self.label_sum[lab]] for lab in labels]


def metric_series(run_dir: Path) -> Series:
    """The plotted series from metrics.jsonl; a later line for a step already seen (redone after a
    resume) replaces the earlier one."""
    path = reports.metrics_path(run_dir)
    train: dict[int, dict[str, Any]] = {}
    evals: dict[int, float] = {}
    try:
        lines = reports.read_metrics(run_dir, missing_ok=False)
    except FileNotFoundError:
        raise PlotError(
            f"{path} does not exist yet: the run has logged no step (see `moe-orch status`)"
        ) from None
    for rec in lines:
        if not isinstance(rec.get("step"), int):
            continue
        if "eval_loss" in rec:
            evals[rec["step"]] = float(rec["eval_loss"])
        elif "loss" in rec:
            train[rec["step"]] = rec
    s = Series()
    for step in sorted(train):
        rec = train[step]
        s.steps.append(step)
        s.loss.append(float(rec["loss"]))
        if isinstance(rec.get("tokens_per_s"), (int, float)):
            s.tps_steps.append(step)
            s.tokens_per_s.append(float(rec["tokens_per_s"]))
        for layer, shares in (rec.get("expert_load") or {}).items():
            steps, values = s.expert_load.setdefault(str(layer), ([], []))
            steps.append(step)
            values.append([float(x) for x in shares])
        for key, series in (("routing_mi_bits", s.mi), ("routing_mi_answer_bits", s.mi_answer)):
            for layer, bits in (rec.get(key) or {}).items():
                mi_steps, mi_values = series.setdefault(str(layer), ([], []))
                mi_steps.append(step)
                mi_values.append(float(bits))
        if isinstance(rec.get("routing_mi_max_bits"), (int, float)):
            s.mi_max = float(rec["routing_mi_max_bits"])
        for label, shares in (rec.get("label_routing") or {}).items():
            acc = s.label_sum.setdefault(str(label), [0.0] * len(shares))
            if len(acc) == len(shares):
                s.label_sum[str(label)] = [a + float(b) for a, b in zip(acc, shares, strict=True)]
                s.label_n[str(label)] = s.label_n.get(str(label), 0) + 1
    for step in sorted(evals):
        s.eval_steps.append(step)
        s.eval_loss.append(evals[step])
    if not s.steps and not s.eval_steps:
        raise PlotError(f"{path} has no metrics yet; wait for the first logged step")
    return s


def _goodput_panel(ax: Any, run_dir: Path) -> None:
    """One horizontal bar per attempt: its allocated rank-seconds split into the goodput parts."""
    from orchestrator.rundir import goodput

    total, per = goodput.from_run_dir(run_dir)
    if total.allocated_s <= 0:
        ax.text(0.5, 0.5, "no attempt with a start event", ha="center", va="center")
        ax.set_axis_off()
        return
    names = [p for p in goodput.PARTS if any(abs(getattr(g, p)) > 0 for _, g in per)]
    left = [0.0] * len(per)
    for n, part in enumerate(names):
        widths = [max(0.0, getattr(g, part)) for _, g in per]
        ax.barh(range(len(per)), widths, left=left, color=f"C{n}", label=part.removesuffix("_s"))
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_yticks(range(len(per)), [key for key, _ in per])
    ax.invert_yaxis()
    ax.set_xlabel("rank-seconds")
    ax.set_title(f"goodput {100 * (total.goodput or 0):.1f}% (per attempt)")
    ax.legend(fontsize="small")


def plot_run(run_dir: Path, out: Path, *, title: str | None = None) -> Path:
    """Write the figure to `out` (PNG); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = metric_series(run_dir)
    layers = sorted(s.expert_load, key=lambda x: (len(x), x))
    n_panels = 5 + len(layers)
    cols = 2
    rows = (n_panels + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(11, 3.4 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    ax = flat[0]
    ax.plot(s.steps, s.loss, label="train loss")
    if s.eval_steps:
        ax.plot(s.eval_steps, s.eval_loss, "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_title("loss")
    ax.legend()
    ax = flat[1]
    ax.plot(s.tps_steps, s.tokens_per_s)
    ax.set_xlabel("step")
    ax.set_title("tokens/s")
    for i, layer in enumerate(layers):
        ax = flat[2 + i]
        steps, values = s.expert_load[layer]
        n_exp = max(len(v) for v in values)
        for e in range(n_exp):
            ax.plot(steps, [v[e] if e < len(v) else float("nan") for v in values], label=f"expert {e}")
        ax.set_title(f"expert load, layer {layer}")
        ax.set_xlabel("step")
        ax.set_ylabel("share of tokens")
        ax.legend(fontsize="small")
    ax = flat[2 + len(layers)]
    labels, matrix = s.label_matrix()
    if labels:
        im = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xticks(range(len(matrix[0])), [str(i) for i in range(len(matrix[0]))])
        ax.set_xlabel("expert")
        ax.set_title("routing: expert_label x expert (first MoE layer)")
        fig.colorbar(im, ax=ax)
    else:
        ax.text(0.5, 0.5, "no label_routing in metrics", ha="center", va="center")
        ax.set_axis_off()
    ax = flat[3 + len(layers)]
    if s.mi:
        for n, layer in enumerate(sorted(s.mi, key=lambda x: (len(x), x))):
            color = f"C{n}"
            ax.plot(*s.mi[layer], color=color, label=f"layer {layer}")
            if layer in s.mi_answer:
                ax.plot(*s.mi_answer[layer], "--", color=color, label=f"layer {layer}, answer tokens")
        if s.mi_max is not None:
            ax.axhline(s.mi_max, linestyle=":", color="grey", label="maximum")
        ax.set_title("routing MI: expert_label ; top-1 expert")
        ax.set_xlabel("step")
        ax.set_ylabel("bits")
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no routing_mi_bits in metrics", ha="center", va="center")
        ax.set_axis_off()
    _goodput_panel(flat[4 + len(layers)], run_dir)
    for extra in flat[5 + len(layers) :]:
        extra.set_axis_off()
    fig.suptitle(title or run_dir.name)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
