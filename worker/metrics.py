"""What the run reports (global rank 0 only): events, progress, metrics and TensorBoard.

The files `events.jsonl`, `progress.json` and `metrics.jsonl` (their formats, writers and readers)
belong to `orchestrator.rundir.reports`; `Reporter` calls it and adds TensorBoard (`tb/`) with the
same scalars. Metrics lines hold step, epoch, loss, lm_loss, aux_loss, lr, grad_norm, tokens_per_s,
step_time_s, expert_load and label_routing; eval lines `{"step", "eval_loss"}`.

Routing statistics (`RoutingStats`) are accumulated per micro-batch on every rank (no
communication) and all-reduced once per logged step:
- `expert_load`: `{block index: [share of tokens per expert]}` (counts before capacity dropping);
- `label_routing`: `{expert_label: [share of that label's tokens whose first choice is each
  expert]}` for the first MoE layer (padding and unlabelled examples are left out).

Other ranks get a `Reporter(enabled=False)` whose methods do nothing, so the loop never branches.
"""

from __future__ import annotations

import logging
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


class RoutingStats:
    def __init__(self, layer_ids: list[int], num_experts: int, labels: list[str]) -> None:
        import torch

        self.layer_ids = layer_ids
        self.num_experts = num_experts
        self.labels = labels
        self.load = torch.zeros((len(layer_ids), num_experts), dtype=torch.float64)  # (layers, E)
        self.by_label = torch.zeros((max(len(labels), 1), num_experts), dtype=torch.float64)  # (labels, E)

    def add(
        self, counts: list[torch.Tensor], top1: list[torch.Tensor], batch: dict[str, torch.Tensor]
    ) -> None:
        """One micro-batch: `counts` per layer (E,), `top1` per layer (b*s,), the batch it routed."""
        import torch

        for i, c in enumerate(counts[: len(self.layer_ids)]):
            self.load[i] += c.detach().to("cpu", torch.float64).reshape(-1)[: self.num_experts]
        if not top1 or not self.labels:
            return
        mask = batch["attention_mask"].reshape(-1).bool().cpu()  # (b*s,)
        seq = batch["attention_mask"].shape[1]
        label_of_token = batch["expert_label_ids"].cpu().repeat_interleave(seq)  # (b*s,)
        choice = top1[0].detach().cpu().reshape(-1)  # (b*s,)
        keep = mask & (label_of_token >= 0)
        if keep.any():
            flat = label_of_token[keep] * self.num_experts + choice[keep]
            hist = torch.bincount(flat, minlength=self.by_label.numel()).to(torch.float64)
            self.by_label += hist.reshape(self.by_label.shape)

    def reduce_and_reset(self) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
        """(expert_load, label_routing) over all ranks since the last call; every rank calls it."""
        import torch
        import torch.distributed as dist

        both = torch.cat([self.load.reshape(-1), self.by_label.reshape(-1)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            both = both.to(torch.float32)  # NOTE: gloo reduces float32 fine; counts stay exact < 2**24
            dist.all_reduce(both)
            both = both.to(torch.float64)
        load = both[: self.load.numel()].reshape(self.load.shape)
        by_label = both[self.load.numel() :].reshape(self.by_label.shape)
        self.load.zero_()
        self.by_label.zero_()
        return _shares_by_key([str(i) for i in self.layer_ids], load), _shares_by_key(self.labels, by_label)


def _shares_by_key(keys: list[str], counts: Any) -> dict[str, list[float]]:
    out = {}
    for key, row in zip(keys, counts, strict=False):
        total = float(row.sum())
        out[key] = [round(float(v) / total, 6) if total else 0.0 for v in row]
    return out
