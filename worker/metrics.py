"""What the run reports (global rank 0 only): events, progress, metrics and TensorBoard.

The files `events.jsonl`, `progress.json` and `metrics.jsonl` (their formats, writers and readers)
belong to `orchestrator.rundir.reports`; `Reporter` calls it and adds TensorBoard (`tb/`) with the
same scalars. Metrics lines hold step, epoch, loss, lm_loss, aux_loss, lr, grad_norm, tokens_per_s,
step_time_s, expert_load, label_routing, routing_mi_bits, routing_mi_answer_bits, routing_mi_max_bits
and (label routing on) label_routing_loss; eval lines `{"step", "eval_loss"}`.

Routing statistics (`RoutingStats`) are accumulated per micro-batch on every rank (no
communication) and all-reduced once per logged step, over real tokens only (never padding):
- `expert_load`: `{block index: [share of tokens per expert]}` (counts before capacity dropping);
- `label_routing`: `{expert_label: [share of that label's tokens whose first choice is each
  expert]}` for the first MoE layer (unlabelled examples are left out);
- `routing_mi_bits`: `{block index: I(expert_label; top-1 expert)}` in bits, from the labelled real
  tokens of the window; `routing_mi_answer_bits` the same on answer tokens only (labels != -100);
  `routing_mi_max_bits`: its ceiling, log2(min(labels, experts)). 0 is routing that ignores the
  label, the ceiling a router that sends each label to its own experts;
- `label_routing_loss`: the mean label-routing loss (summed over layers), when it is on.

Other ranks get a `Reporter(enabled=False)` whose methods do nothing, so the loop never branches.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.rundir import reports

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

TB_DIR = "tb"


class Reporter:
    """Writes the run's reports; a no-op unless `enabled` (global rank 0)."""

    def __init__(self, run_dir: Path, *, enabled: bool, attempt_key: str, tensorboard: bool = True) -> None:
        self.run_dir = run_dir
        self.enabled = enabled
        self.attempt_key = attempt_key
        self._tb: Any = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    logger.warning("tensorboard is not installed: no tb/ events (pip install tensorboard)")
                else:
                    self._tb = SummaryWriter(log_dir=str(run_dir / TB_DIR))

    def event(self, name: str, **fields: Any) -> None:
        if not self.enabled:
            return
        reports.append_event(self.run_dir, name, **fields)

    def progress(
        self,
        *,
        step: int,
        total_steps: int,
        epoch: int,
        loss: float,
        tokens_per_s: float,
        step_time_s: float,
    ) -> None:
        if not self.enabled:
            return
        reports.write_progress(
            self.run_dir,
            step=step,
            total_steps=total_steps,
            epoch=epoch,
            loss=loss,
            tokens_per_s=tokens_per_s,
            step_time_s=step_time_s,
            attempt_key=self.attempt_key,
        )

    def log_step(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl line; its numeric fields and expert loads also go to TensorBoard."""
        if not self.enabled:
            return
        reports.append_metrics(self.run_dir, record)
        if self._tb is None:
            return
        step = int(record["step"])
        for key in ("loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "step_time_s"):
            value = record.get(key)
            if isinstance(value, (int, float)):
                self._tb.add_scalar(f"train/{key}", value, step)
        for layer, shares in (record.get("expert_load") or {}).items():
            for expert, share in enumerate(shares):
                self._tb.add_scalar(f"expert_load/layer_{layer}/expert_{expert}", share, step)
        for key in ("routing_mi_bits", "routing_mi_answer_bits"):
            for layer, bits in (record.get(key) or {}).items():
                self._tb.add_scalar(f"{key}/layer_{layer}", bits, step)

    def log_eval(self, step: int, eval_loss: float) -> None:
        if not self.enabled:
            return
        reports.append_eval(self.run_dir, step, eval_loss)
        if self._tb is not None:
            self._tb.add_scalar("eval/loss", eval_loss, step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def mutual_information_bits(joint: Any) -> float:
    """I(row; column) in bits of a table of co-occurrence counts (rows: labels, columns: experts).

    0 when the column does not depend on the row; log2(k) when k equally likely rows each map to
    their own column. An empty table is 0."""
    rows = [[float(v) for v in row] for row in joint]
    total = sum(sum(row) for row in rows)
    if total <= 0:
        return 0.0
    p_row = [sum(row) / total for row in rows]
    p_col = [sum(col) / total for col in zip(*rows, strict=True)]
    mi = 0.0
    for i, row in enumerate(rows):
        for j, count in enumerate(row):
            if count > 0:
                p = count / total
                mi += p * math.log2(p / (p_row[i] * p_col[j]))
    return max(mi, 0.0)  # NOTE: rounding can leave -1e-17 for independent tables


class RoutingStats:
    def __init__(self, layer_ids: list[int], num_experts: int, labels: list[str]) -> None:
        import torch

        self.layer_ids = layer_ids
        self.num_experts = num_experts
        self.labels = labels
        n_layers, n_labels = len(layer_ids), max(len(labels), 1)
        self.load = torch.zeros((n_layers, num_experts), dtype=torch.float64)  # (layers, E)
        # (2, layers, labels, E): label x first choice on [real tokens, answer tokens]
        self.joint = torch.zeros((2, n_layers, n_labels, num_experts), dtype=torch.float64)
        self.label_loss = torch.zeros(2, dtype=torch.float64)  # (sum, micro-batches)

    def add(
        self,
        counts: list[torch.Tensor],
        top1: list[torch.Tensor],
        batch: dict[str, torch.Tensor],
        *,
        label_loss: float | None = None,
    ) -> None:
        """One micro-batch: `counts` per layer (E,), `top1` per layer (b*s,), the batch it routed,
        and its label-routing loss when that is on."""
        import torch

        for i, c in enumerate(counts[: len(self.layer_ids)]):
            self.load[i] += c.detach().to("cpu", torch.float64).reshape(-1)[: self.num_experts]
        if label_loss is not None:
            self.label_loss += torch.tensor([label_loss, 1.0], dtype=torch.float64)
        if not top1 or not self.labels:
            return
        real = batch["attention_mask"].reshape(-1).bool().cpu()  # (b*s,)
        seq = batch["attention_mask"].shape[1]
        label_of_token = batch["expert_label_ids"].cpu().repeat_interleave(seq)  # (b*s,)
        keep = real & (label_of_token >= 0)  # (b*s,)
        answer = keep & (batch["labels"].reshape(-1).cpu() != -100)  # (b*s,)
        cells = self.joint.shape[2] * self.num_experts
        for i, choice in enumerate(top1[: len(self.layer_ids)]):
            flat = label_of_token * self.num_experts + choice.detach().cpu().reshape(-1)  # (b*s,)
            for j, sel in enumerate((keep, answer)):
                if sel.any():
                    hist = torch.bincount(flat[sel], minlength=cells).to(torch.float64)
                    self.joint[j, i] += hist.reshape(self.joint.shape[2:])

    def reduce_and_reset(self) -> dict[str, Any]:
        """The metrics fields (`expert_load`, `label_routing`, `routing_mi_*`, `label_routing_loss`)
        over all ranks since the last call; every rank calls it."""
        import torch
        import torch.distributed as dist

        parts = [self.load, self.joint, self.label_loss]
        flat = torch.cat([p.reshape(-1) for p in parts])
        if dist.is_initialized() and dist.get_world_size() > 1:
            flat = flat.to(torch.float32)  # NOTE: gloo reduces float32 fine; counts stay exact < 2**24
            dist.all_reduce(flat)
            flat = flat.to(torch.float64)
        sizes = [p.numel() for p in parts]
        offsets = [sum(sizes[:i]) for i in range(len(parts))]
        load, joint, label_loss = (
            flat[o : o + p.numel()].reshape(p.shape) for o, p in zip(offsets, parts, strict=True)
        )
        for p in parts:
            p.zero_()
        layers = [str(i) for i in self.layer_ids]
        fields: dict[str, Any] = {
            "expert_load": _shares_by_key(layers, load),
            "label_routing": _shares_by_key(self.labels, joint[0, 0]) if len(self.layer_ids) else {},
        }
        if self.labels:
            for key, tables in (("routing_mi_bits", joint[0]), ("routing_mi_answer_bits", joint[1])):
                mi = [round(mutual_information_bits(t), 5) for t in tables]
                fields[key] = dict(zip(layers, mi, strict=True))
            fields["routing_mi_max_bits"] = round(math.log2(min(len(self.labels), self.num_experts)), 5)
        if label_loss[1] > 0:
            fields["label_routing_loss"] = float(label_loss[0] / label_loss[1])
        return fields


def _shares_by_key(keys: list[str], counts: Any) -> dict[str, list[float]]:
    out = {}
    for key, row in zip(keys, counts, strict=False):
        total = float(row.sum())
        out[key] = [round(float(v) / total, 6) if total else 0.0 for v in row]
    return out
