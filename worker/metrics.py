"""What the run reports on disk (global rank 0 only): events, progress, metrics and TensorBoard.

Formats are the contract in docs/design.md:
- `events.jsonl`: start, first_step, signal, checkpoint, exit (appended, one JSON per line);
- `progress.json`: rewritten atomically after every optimizer step;
- `metrics.jsonl`: one line per logged step (step, epoch, loss, lm_loss, aux_loss, lr, grad_norm,
  tokens_per_s, step_time_s, expert_load, label_routing) and eval lines `{"step", "eval_loss"}`;
- `tb/`: TensorBoard events with the same scalars.

Routing statistics (`RoutingStats`) are accumulated per micro-batch on every rank (no
communication) and all-reduced once per logged step:
- `expert_load`: `{block index: [share of tokens per expert]}` (counts before capacity dropping);
- `label_routing`: `{expert_label: [share of that label's tokens whose first choice is each
  expert]}` for the first MoE layer (padding and unlabelled examples are left out).

Other ranks get a `Reporter(enabled=False)` whose methods do nothing, so the loop never branches.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.checkpoint import atomic_write_text

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

EVENTS = "events.jsonl"
PROGRESS = "progress.json"
METRICS = "metrics.jsonl"
TB_DIR = "tb"


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(record, sort_keys=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every complete JSON line of a file (a torn last line is skipped)."""
    records = []
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            records.append(value)
    return records


def read_progress(run_dir: str | Path) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(run_dir) / PROGRESS).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


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
        _append_jsonl(self.run_dir / EVENTS, {"event": name, "time": time.time(), **fields})

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
        record = {
            "step": step,
            "total_steps": total_steps,
            "epoch": epoch,
            "loss": loss,
            "tokens_per_s": tokens_per_s,
            "step_time_s": step_time_s,
            "time": time.time(),
            "attempt_key": self.attempt_key,
        }
        atomic_write_text(self.run_dir / PROGRESS, json.dumps(record) + "\n")

    def log_step(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl line; its numeric fields and expert loads also go to TensorBoard."""
        if not self.enabled:
            return
        _append_jsonl(self.run_dir / METRICS, record)
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
        _append_jsonl(self.run_dir / METRICS, {"step": step, "eval_loss": eval_loss})
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
