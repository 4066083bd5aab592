"""The DeepSpeed training loop of one rank: `run(cfg, run_dir)`.

Order of a run: rendezvous (worker.dist) -> tokenizer (rank 0 trains/saves, others load) -> data
-> model -> `deepspeed.initialize` with torch AdamW (MoE param groups) and the LR schedule ->
resume from the newest valid checkpoint -> optimizer steps until `total_steps`, with metrics,
eval, checkpoints and signal handling at step boundaries -> final eval and checkpoint.

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
import logging
import math
import os
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import ConfigError, ConfigIssue
from orchestrator.spec.deepspeed import deepspeed_config  # one definition: ds_config.json and the engine
from orchestrator.spec.schema import RunConfig
from worker import checkpoint as ckpt
from worker.dist import DistInfo, init_distributed, resolve_dist
from worker.metrics import Reporter, RoutingStats, read_progress
from worker.signals import (
    EXIT_COMPLETED,
    EXIT_STOPPED,
    Faults,
    InjectedFault,
    SignalState,
    cancel_requested,
    clear_save_now,
    requeue_slurm_job,
    slurm_job_fields,
    stop_reason_from_env,
    term_is_cancellation,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"


class ExitWithoutProgress(SystemExit):
    """`MOE_ORCH_FAULT=exit_without_progress`: leave with code 1, no exit event."""


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


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class Trainer:
    """Everything one rank holds while training (built by `_setup`)."""

    cfg: RunConfig
    run_dir: Path
    info: DistInfo
    engine: Any
    batches: Any  # worker.data.RankBatches
    eval_batches: Any  # worker.data.EvalBatches
    reporter: Reporter
    signals: SignalState
    faults: Faults
    total_steps: int
    steps_per_epoch: int
    routing: RoutingStats | None
    pad_id: int
    step: int = 0

    @property
    def gas(self) -> int:
        return self.cfg.training.gradient_accumulation_steps

    # --- collectives -----------------------------------------------------------------------
    def all_reduce(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64)
        if self.info.world_size > 1:
            dist.all_reduce(tensor)
        return [float(v) for v in tensor]

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.info.world_size > 1:
            dist.barrier()

    # --- pieces of a step ------------------------------------------------------------------
    def micro_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's micro-batches from the current step on, epoch after epoch."""
        while True:
            epoch, offset = divmod(self.step, self.steps_per_epoch)
            usable = self.steps_per_epoch * self.gas
            for i, batch in enumerate(self.batches.iterate(epoch, offset * self.gas)):
                if offset * self.gas + i >= usable:
                    break
                yield batch

    def common_length(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Pad a micro-batch to the longest sequence of this micro-batch on ANY rank.

        NOTE: DeepSpeed's gating sizes expert capacity from the local token count (batch x seq), and
        the all_to_all needs the same capacity on every rank of the expert-parallel group; batches
        padded to their own longest sequence would differ per rank and break the collective.
        """
        import torch
        import torch.distributed as dist
        import torch.nn.functional as F

        if self.info.world_size == 1 or self.routing is None:
            return batch
        seq = batch["input_ids"].shape[1]
        longest = torch.tensor([seq], dtype=torch.long)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
        extra = int(longest) - seq
        if extra == 0:
            return batch
        out = dict(batch)
        out["input_ids"] = F.pad(batch["input_ids"], (0, extra), value=self.pad_id)
        out["attention_mask"] = F.pad(batch["attention_mask"], (0, extra), value=0)
        out["labels"] = F.pad(batch["labels"], (0, extra), value=-100)
        return out

    def forward_backward(self, batch: dict[str, torch.Tensor], micro: int) -> tuple[float, float, int]:
        """One micro-batch; returns (lm loss, aux loss, tokens)."""
        import torch

        from worker.model import expert_token_counts, moe_aux_loss, routing_top1

        batch = self.common_length(batch)
        torch.manual_seed(step_seed(self.cfg.training.seed, self.step, micro, self.info.rank))
        device = self.engine.device
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
        out = self.engine(**inputs)
        lm = out.loss
        aux = moe_aux_loss(self.engine.module)
        loss = lm + self.cfg.moe.aux_loss_weight * aux
        self.engine.backward(loss)
        if micro == self.gas - 1 and not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeed's accumulation boundary is out of step with the loop")
        self.engine.step()
        if self.routing is not None:
            self.routing.add(expert_token_counts(self.engine.module), routing_top1(self.engine.module), batch)
        return float(lm.detach()), float(aux.detach()), int(batch["attention_mask"].sum())

    def evaluate(self) -> float:
        """Mean loss per answer token over the eval split, all ranks together."""
        import torch
        import torch.nn.functional as F

        if len(self.eval_batches) == 0:
            return float("nan")
        self.engine.eval()
        loss_sum, count = 0.0, 0.0
        with torch.no_grad():
            for batch in self.eval_batches:
                batch = self.common_length(batch)
                logits = self.engine(
                    input_ids=batch["input_ids"].to(self.engine.device),
                    attention_mask=batch["attention_mask"].to(self.engine.device),
                ).logits.float()  # (b, s, V)
                labels = batch["labels"].to(logits.device)[:, 1:]  # (b, s-1)
                loss_sum += float(
                    F.cross_entropy(
                        logits[:, :-1].reshape(-1, logits.shape[-1]),
                        labels.reshape(-1),
                        ignore_index=-100,
                        reduction="sum",
                    )
                )
                count += float((labels != -100).sum())
        self.engine.train()
        total_loss, total_count = self.all_reduce([loss_sum, count])
        return total_loss / max(total_count, 1.0)

    def save(self) -> ckpt.SaveResult:
        offset = self.step % self.steps_per_epoch
        client_state = {
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "micro_batch": offset * self.gas,
            "seed": self.cfg.training.seed,
            "world_size": self.info.world_size,
            "total_steps": self.total_steps,
            "attempt_key": self.info.attempt_key,
            "time": time.time(),
        }
        result = ckpt.save_checkpoint(
            self.engine,
            self.run_dir,
            self.step,
            client_state,
            rank=self.info.rank,
            keep=self.cfg.training.keep_checkpoints,
            hold_save_s=self.faults.hold_save_s,
        )
        self.reporter.event(
            "checkpoint", tag=result.tag, step=self.step, save_s=round(result.save_s, 3), bytes=result.bytes
        )
        logger.info("saved checkpoint %s (%.2f s, %.1f MB)", result.tag, result.save_s, result.bytes / 1e6)
        return result

    # --- the loop --------------------------------------------------------------------------
    def train(self) -> int:
        """Optimizer steps until the end or a stop signal; returns the exit code."""
        t = self.cfg.training
        eval_every = t.eval_steps
        if self.step == 0:
            self._log_eval()
        batches = self.micro_batches()
        first = True
        last_saved = self.step if self.step > 0 else -1
        window_tokens, window_time = 0, 0.0
        while self.step < self.total_steps:
            started = time.perf_counter()
            lm_sum = aux_sum = 0.0
            tokens = 0
            lr = float(self.engine.get_lr()[0])
            for micro in range(self.gas):
                lm, aux, n = self.forward_backward(next(batches), micro)
                lm_sum += lm
                aux_sum += aux
                tokens += n
            self.step += 1
            epoch = (self.step - 1) // self.steps_per_epoch
            save_now = self.signals.take_save_request(self.run_dir, check_file=self.info.is_main)
            usr2 = self.signals.stop_signal == "USR2"
            term = self.signals.stop_signal == "TERM"
            # One collective per step: losses, tokens and every rank's flags (any rank's flag wins).
            red = self.all_reduce([lm_sum, aux_sum, float(tokens), float(usr2), float(term), float(save_now)])
            world = self.info.world_size
            lm_mean = red[0] / (world * self.gas)
            aux_mean = red[1] / (world * self.gas)
            loss = lm_mean + self.cfg.moe.aux_loss_weight * aux_mean
            step_time = time.perf_counter() - started
            window_tokens += int(red[2])
            window_time += step_time
            tokens_per_s = red[2] / step_time if step_time > 0 else 0.0
            self.reporter.progress(
                step=self.step, total_steps=self.total_steps, epoch=epoch, loss=loss,
                tokens_per_s=tokens_per_s, step_time_s=step_time,
            )
            if first:
                self.reporter.event("first_step", step=self.step)
                first = False
            if self.step % t.logging_steps == 0 or self.step == self.total_steps:
                self._log_step(epoch, loss, lm_mean, aux_mean, lr, window_tokens / max(window_time, 1e-9),
                               step_time)
                window_tokens, window_time = 0, 0.0
            if self.faults.crash_at_step is not None and self.step == self.faults.crash_at_step:
                raise InjectedFault(f"MOE_ORCH_FAULT crash_at_step:{self.step}")
            if (red[3] > 0 or red[4] > 0) and self.step < self.total_steps:
                # NOTE: a signal at the last step just completes (the final save follows).
                return self._stop("USR2" if red[3] > 0 else "TERM", last_saved)
            if eval_every is not None and self.step % eval_every == 0 and self.step < self.total_steps:
                self._log_eval()
            if (self.step % t.save_steps == 0 or red[5] > 0) and self.step < self.total_steps:
                self.save()
                last_saved = self.step
                if red[5] > 0 and self.info.is_main:
                    clear_save_now(self.run_dir)
        # Past the last step a stop signal changes nothing: the final save follows.
        self.signals.ignore_from_now()
        self._log_eval()
        if last_saved != self.step:
            self.save()
        if self.info.is_main:
            clear_save_now(self.run_dir)  # a request at the last step was served by the final save
            if t.export_on_finish:
                # NOTE: offline from the final checkpoint's files (every expert file is there),
                # so the other ranks need not wait for it.
                from worker.export import export_run

                out = export_run(self.run_dir)
                logger.info("exported a Hugging Face folder to %s", out)
        self.reporter.event("exit", reason="completed", step=self.step, requeued=False, error=None)
        return EXIT_COMPLETED

    def _stop(self, signal_name: str, last_saved: int) -> int:
        """Every rank: save together, then rank 0 reports, requeues, and all leave."""
        self.signals.ignore_from_now()  # every rank agreed to stop: a second signal changes nothing
        logger.warning("stop signal %s: saving a checkpoint at step %d", signal_name, self.step)
        self.reporter.event("signal", signal=signal_name, step=self.step)
        if last_saved != self.step:
            self.save()
        requeued = False
        if self.info.is_main:
            reason = stop_reason_from_env(
                os.environ, self.info.job_id, self.info.slurm_job, self.cfg.cluster.signal_delay_s
            )
            if self._cancelled(signal_name):
                reason = "cancelled"
            elif self.info.slurm_job and self.cfg.cluster.requeue:
                requeued = requeue_slurm_job(self.info.job_id)
            self.reporter.event("exit", reason=reason, step=self.step, requeued=requeued, error=None)
            logger.warning("stopped at step %d (%s), requeued: %s", self.step, reason, requeued)
        self.reporter.close()
        self.barrier()  # leave together: no rank exits while rank 0 still reports or requeues
        return EXIT_STOPPED

    def _cancelled(self, signal_name: str) -> bool:
        """Rank 0: a stop that must not requeue (`moe-orch cancel`, or a plain `scancel`)."""
        if cancel_requested(self.run_dir):
            return True
        if signal_name != "TERM" or not self.info.slurm_job:
            return False
        job = slurm_job_fields(self.info.job_id)
        return bool(job) and term_is_cancellation(job, self.info.restart_count)

    def _log_eval(self) -> None:
        eval_loss = self.evaluate()
        if not math.isnan(eval_loss):
            self.reporter.log_eval(self.step, eval_loss)
            logger.info("step %d eval_loss %.4f", self.step, eval_loss)

    def _log_step(
        self, epoch: int, loss: float, lm: float, aux: float, lr: float, tokens_per_s: float, step_time: float
    ) -> None:
        expert_load: dict[str, list[float]] = {}
        label_routing: dict[str, list[float]] = {}
        if self.routing is not None:
            expert_load, label_routing = self.routing.reduce_and_reset()
        grad_norm = self.engine.get_global_grad_norm()
        record = {
            "step": self.step,
            "epoch": epoch,
            "loss": loss,
            "lm_loss": lm,
            "aux_loss": aux,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": tokens_per_s,
            "step_time_s": step_time,
            "expert_load": expert_load,
            "label_routing": label_routing,
            "max_rss_mb": round(peak_rss_mb(), 1),
        }
        self.reporter.log_step(record)
        logger.info(
            "step %d/%d epoch %d loss %.4f (lm %.4f aux %.4f) lr %.3g grad_norm %s %.0f tok/s %.3f s/step",
            self.step, self.total_steps, epoch, loss, lm, aux, lr, record["grad_norm"], tokens_per_s,
            step_time,
        )


def _barrier_fn(info: DistInfo) -> Callable[[], None]:
    def barrier() -> None:
        import torch.distributed as dist

        if info.world_size > 1:
            dist.barrier()

    return barrier


def _setup(cfg: RunConfig, run_dir: Path, info: DistInfo, signals: SignalState, faults: Faults) -> Trainer:
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
    from worker.model import build_model, moe_layers, optimizer_param_groups
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
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, t.weight_decay), lr=t.learning_rate)
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


def _resume(trainer: Trainer) -> tuple[str | None, int]:
    """Load the newest valid checkpoint, if any; returns (tag, step)."""
    path = ckpt.select_resume_checkpoint(trainer.run_dir, trainer.info.rank, trainer.info.world_size)
    if path is None:
        return None, 0
    state = ckpt.load_checkpoint(trainer.engine, path)
    trainer.step = int(state["step"])
    if int(state.get("world_size", trainer.info.world_size)) != trainer.info.world_size:
        logger.warning(
            "checkpoint %s was written by %s ranks, this run has %d", path.name, state.get("world_size"),
            trainer.info.world_size,
        )
    logger.info("resumed from %s at step %d", path.name, trainer.step)
    return path.name, trainer.step


def _fit_world(cfg: RunConfig, info: DistInfo) -> RunConfig:
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


def run(cfg: RunConfig, run_dir: str | Path, *, info: DistInfo | None = None) -> int:
    """Train `cfg` in `run_dir` as one rank of the job; returns the exit code (worker.signals).

    Errors propagate (after rank 0 wrote an `exit` event with reason `failed` when it could).
    """
    run_path = Path(run_dir).resolve()
    run_path.mkdir(parents=True, exist_ok=True)
    faults = Faults.from_env()
    signals = SignalState()
    signals.install()
    info = info or resolve_dist(os.environ, master_port=cfg.cluster.master_port)
    use_gpu = cfg.cluster.gpus_per_node > 0
    init_distributed(info, num_threads=cfg.training.num_threads or cfg.cluster.cpus_per_task, use_gpu=use_gpu)
    reporter: Reporter | None = None
    trainer: Trainer | None = None
    try:
        cfg = _fit_world(cfg, info)
        trainer = _setup(cfg, run_path, info, signals, faults)
        reporter = trainer.reporter
        previous = read_progress(run_path) if info.is_main else None
        tag, resumed_step = _resume(trainer)
        redone = max(0, int(previous["step"]) - resumed_step) if previous else 0
        reporter.event(
            "start", job_id=info.job_id, restart=info.restart_count, attempt_key=info.attempt_key,
            nodes=info.nodes, world_size=info.world_size, resumed_from=tag, resumed_step=resumed_step,
            steps_redone=redone,
        )
        logger.info(
            "training %s: %d ranks (%s), steps %d -> %d, global batch %d",
            cfg.name, info.world_size, info.source, resumed_step, trainer.total_steps, cfg.global_batch_size,
        )
        if faults.crash_at_start:
            raise InjectedFault("MOE_ORCH_FAULT crash_at_start")
        if faults.exit_without_progress:
            logger.error("MOE_ORCH_FAULT exit_without_progress: leaving before the first step")
            raise ExitWithoutProgress(1)
        code = trainer.train()
        rss = peak_rss_mb()
        import torch.distributed as dist

        rss_all: list[Any] = [None] * info.world_size
        if info.world_size > 1:
            dist.all_gather_object(rss_all, round(rss, 1))
        else:
            rss_all = [round(rss, 1)]
        logger.info("peak RSS per rank (MB): %s", rss_all)
        reporter.close()
        if code == EXIT_COMPLETED:
            trainer.barrier()
        # NOTE: the orchestrator's submitit job calls this in-process; leave no process group behind.
        dist.destroy_process_group()
        return code
    except Exception as exc:
        if info.is_main:
            failed = reporter or Reporter(
                run_path, enabled=True, attempt_key=info.attempt_key, tensorboard=False
            )
            try:
                failed.event(
                    "exit", reason="failed", step=trainer.step if trainer else 0, requeued=False,
                    error=f"{type(exc).__name__}: {exc}",
                )
            except OSError:
                logger.exception("could not write the exit event")
        raise
