"""Building one rank's `Trainer` before the first step: the config fitted to the job's real world
size, tokenizer (rank 0 trains/saves, others load), data, model, `deepspeed.initialize` with torch
AdamW (MoE param groups) and the LR schedule, the metrics reporter; then resume from the newest
valid checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.errors import ConfigError, ConfigIssue
from orchestrator.spec.deepspeed import deepspeed_config  # one definition: ds_config.json and the engine
from orchestrator.spec.schema import RunConfig
from worker import checkpoint as ckpt
from worker.dist import DistInfo
from worker.elastic import ResumePlan, verify_loaded
from worker.loop import Trainer
from worker.metrics import Reporter, RoutingStats
from worker.schedule import lr_multiplier, total_steps
from worker.signals import Faults, SignalState

logger = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"


def _barrier_fn(info: DistInfo) -> Callable[[], None]:
    def barrier() -> None:
        import torch.distributed as dist

        if info.world_size > 1:
            dist.barrier()

    return barrier


def setup_trainer(
    cfg: RunConfig, run_dir: Path, info: DistInfo, signals: SignalState, faults: Faults
) -> Trainer:
    """This rank's Trainer at step 0 (`resume_from_checkpoint` moves it to the saved step)."""
    import deepspeed
    import torch

    from worker.data import (
        EvalBatches,
        RankBatches,
        build_datasets,
        make_splits,
        read_train_examples,
        tokenizer_texts,
    )
    from worker.model import (
        build_model,
        build_optimizer,
        label_expert_table,
        moe_layers,
        set_label_routing,
    )
    from worker.tokenizer import load_or_train_tokenizer_on_ranks

    t = cfg.training
    examples = read_train_examples(cfg)
    train_examples, eval_examples = make_splits(cfg, examples)
    tokenizer = load_or_train_tokenizer_on_ranks(
        cfg, tokenizer_texts(cfg, train_examples), run_dir / TOKENIZER_DIR,
        is_main=info.is_main, barrier=_barrier_fn(info),
    )
    train_ds, eval_ds = build_datasets(cfg, tokenizer, train_examples, eval_examples)
    batches = RankBatches(train_ds, t.micro_batch_size, info.rank, info.world_size, t.seed)
    eval_batches = EvalBatches(eval_ds, t.micro_batch_size, info.rank, info.world_size)
    n_steps = total_steps(cfg, batches.micro_batches_per_epoch())
    steps_per_epoch = batches.micro_batches_per_epoch() // t.gradient_accumulation_steps

    torch.manual_seed(t.seed)
    model = build_model(cfg, len(tokenizer))
    if cfg.moe.enabled and cfg.moe.label_routing.weight > 0:
        labels = train_ds.label_vocab
        assignment = cfg.moe.label_routing.assignment(labels, cfg.moe.num_experts)
        set_label_routing(model, label_expert_table(assignment, labels, cfg.moe.num_experts))
        logger.info("label routing (weight %g): %s", cfg.moe.label_routing.weight, assignment)
    optimizer = build_optimizer(model, lr=t.learning_rate, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_multiplier(s, warmup=t.warmup_steps, total=n_steps, schedule=t.lr_schedule),
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg)
    )
    layers = moe_layers(engine.module)
    routing = None
    if layers:
        n_layers = int(getattr(engine.module.config, "n_layers", len(layers)))
        ids = cfg.moe.moe_layer_indices(n_layers)[: len(layers)]
        routing = RoutingStats(ids, cfg.moe.num_experts, train_ds.label_vocab)
    reporter = Reporter(run_dir, enabled=info.is_main, attempt_key=info.attempt_key)
    return Trainer(
        cfg=cfg, run_dir=run_dir, info=info, engine=engine, batches=batches, eval_batches=eval_batches,
        reporter=reporter, signals=signals, faults=faults,
        total_steps=n_steps, steps_per_epoch=steps_per_epoch, routing=routing, pad_id=train_ds.pad_id,
    )


def resume_from_checkpoint(trainer: Trainer, plan: ResumePlan | None = None) -> tuple[str | None, int]:
    """Load the newest valid checkpoint, if any (`plan`: the one `worker.elastic.plan_resume`
    chose, resharded for this topology); returns (tag of the checkpoint chosen, step)."""
    if plan is None:
        path = ckpt.select_resume_checkpoint(trainer.run_dir, trainer.info.rank, trainer.info.world_size)
    else:
        path = plan.path
    if path is None:
        return None, 0
    state = ckpt.load_checkpoint(trainer.engine, path)
    trainer.step = int(state["step"])
    if plan is not None and plan.changed:
        plan.experts_by_rank = _gather(trainer.info, verify_loaded(trainer.engine, path))
        logger.info(
            "every rank loaded its own experts (bitwise the expert files; fp32 masters match): %s",
            ", ".join(f"rank {r}: {ids}" for r, ids in enumerate(plan.experts_by_rank)),
        )
        path = plan.source or path
    if int(state.get("world_size", trainer.info.world_size)) != trainer.info.world_size:
        logger.warning(
            "checkpoint %s was written by %s ranks, this run has %d", path.name, state.get("world_size"),
            trainer.info.world_size,
        )
    logger.info("resumed from %s at step %d", path.name, trainer.step)
    return path.name, trainer.step


def _gather(info: DistInfo, value: list[int]) -> list[list[int]]:
    import torch.distributed as dist

    if info.world_size == 1:
        return [value]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, value)
    return [list(v) for v in out]


def fit_world(cfg: RunConfig, info: DistInfo) -> RunConfig:
    """The config with the job's real world size (a launch by hand may differ from the config)."""
    if info.world_size == cfg.world_size:
        return cfg
    logger.warning(
        "the job has %d ranks but the config describes %d (nodes x tasks_per_node); the global batch "
        "follows the job", info.world_size, cfg.world_size,
    )
    from orchestrator.spec.loading import validate_data

    data = cfg.model_dump(mode="json")
    data["cluster"].update(nodes=1, tasks_per_node=info.world_size, executor="local")
    if cfg.cluster.gpus_per_node:
        data["cluster"]["gpus_per_node"] = info.world_size
    try:
        return validate_data(data)  # e.g. moe.ep_size must still divide the real world size
    except ConfigError as exc:
        raise ConfigError(
            [
                ConfigIssue(
                    "cluster.tasks_per_node",
                    f"the job was launched with {info.world_size} rank(s) but the config describes "
                    f"{cfg.world_size}; start {cfg.world_size} ranks (e.g. torchrun --nproc_per_node "
                    f"{cfg.cluster.tasks_per_node} -m worker ...) or change the config ({exc})",
                )
            ]
        ) from None

