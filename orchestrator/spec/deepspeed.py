"""The DeepSpeed config a run's spec implies: one definition for the rendered ds_config.json and
the engine the worker starts (no jinja2 here: every rank imports it)."""

from __future__ import annotations

from typing import Any

from orchestrator.spec.schema import RunConfig


def deepspeed_config(cfg: RunConfig) -> dict[str, Any]:
    """The DeepSpeed config dict: rendered as ds_config.json, and what the worker passes to DeepSpeed.

    `train_batch_size` must equal micro × accumulation × data-parallel size: DeepSpeed asserts it.
    """
    t = cfg.training
    return {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
        # NOTE: the worker uses torch's AdamW (DeepSpeed's own optimizers JIT-compile C++ for ~80 s).
        "zero_allow_untested_optimizer": True,
        # The worker logs its own metrics (metrics.jsonl); DeepSpeed's step prints stay off.
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # NOTE: every rank names a save's tag from the same step (`step-000120`), and our manifest
        # gathers every rank's files; DeepSpeed's tag check costs two all-reduces inside every
        # save, which a background save's stall pays (issue 14: stall <= 0.2 of a save).
        "checkpoint": {"tag_validation": "Ignore"},
    }
