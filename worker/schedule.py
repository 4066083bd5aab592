"""The step arithmetic of a run: how many optimizer steps, the LR factor of each, and the torch RNG
seed of each micro-batch (pure functions, no torch).

Determinism: weights are seeded by `training.seed`, data order by (seed, epoch), and the torch RNG
is re-seeded per micro-batch from (seed, step, micro index, rank) AFTER the batch is fetched (MoE
gating draws from it and DeepSpeed does not checkpoint it), so a resumed run repeats the
uninterrupted run's losses bit for bit (fp32, same world size).

Data position: an epoch has `steps_per_epoch = micro_batches_per_epoch // gas` optimizer steps
(the tail micro-batches are dropped); optimizer step s (0-based) reads epoch `s // steps_per_epoch`,
micro-batches from `(s % steps_per_epoch) * gas`. `max_steps` beyond the epochs keeps going into
further epochs.
"""

from __future__ import annotations

import hashlib
import math

from orchestrator.errors import ConfigError, ConfigIssue
from orchestrator.spec.schema import RunConfig


def lr_multiplier(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Factor on the peak LR for optimizer step `step` (0-based): linear warmup, then decay."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The torch RNG seed of one micro-batch: a hash of (seed, step, micro index, rank)."""
    digest = hashlib.sha256(f"{seed}/{step}/{micro}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def total_steps(cfg: RunConfig, micro_batches_per_epoch: int) -> int:
    t = cfg.training
    if micro_batches_per_epoch // t.gradient_accumulation_steps == 0:
        raise ConfigError(
            [
                ConfigIssue(
                    "training.gradient_accumulation_steps",
                    f"an epoch has {micro_batches_per_epoch} micro-batches per rank, fewer than "
                    f"gradient_accumulation_steps {t.gradient_accumulation_steps}; lower it or add data",
                )
            ]
        )
    if t.max_steps is not None:
        return t.max_steps
    return t.epochs * (micro_batches_per_epoch // t.gradient_accumulation_steps)
