"""The training loop of one rank: `Trainer`, what it holds and what one optimizer step does.

A step: `gas` micro-batches (`forward_backward`: seed, forward, backward, `engine.step`), then ONE
all-reduce of `StepTotals` (losses, tokens, and every rank's stop/save flags), progress and metrics,
then at the step boundary: the stop path on a signal (worker.stop), eval, and checkpoints. After the
last step: final eval, final checkpoint, the optional export, and the `completed` exit event.
Built by worker.setup, run by worker.train.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import InjectedFault
from orchestrator.rundir.exitcodes import EXIT_COMPLETED
from orchestrator.rundir.runs import StopReason
from orchestrator.spec.schema import RunConfig
from worker import checkpoint as ckpt
from worker.dist import DistInfo
from worker.heartbeat import Pulse
from worker.metrics import Reporter, RoutingStats
from worker.schedule import step_seed
from worker.signals import Faults, SignalState, clear_save_now
from worker.stop import stop_on_signal

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass(frozen=True)
class StepTotals:
    """What the ranks sum once per optimizer step, in one all-reduce: this rank's losses and tokens,
    and its stop/save flags as 0.0 or 1.0 (after the sum, > 0 means some rank raised the flag)."""

    lm_sum: float  # LM losses of this rank's micro-batches, summed
    aux_sum: float  # MoE aux losses, summed the same way
    tokens: float  # attention-mask tokens
    usr2: float  # SIGUSR2 seen: stop
    term: float  # SIGTERM seen: stop
    save_now: float  # USR1 or SAVE_NOW: save and continue

    def to_list(self) -> list[float]:
        return [self.lm_sum, self.aux_sum, self.tokens, self.usr2, self.term, self.save_now]

    @classmethod
    def from_list(cls, values: list[float]) -> StepTotals:
        lm_sum, aux_sum, tokens, usr2, term, save_now = values
        return cls(lm_sum, aux_sum, tokens, usr2, term, save_now)

    @property
    def stop_signal(self) -> str | None:
        """The stop every rank agrees on: USR2 wins over TERM; None when no rank was signalled."""
        if self.usr2 > 0:
            return "USR2"
        return "TERM" if self.term > 0 else None

    @property
    def save_requested(self) -> bool:
        return self.save_now > 0


@dataclass
class Trainer:
    """Everything one rank holds while training (built by `worker.setup.setup_trainer`)."""

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
    pulse: Pulse | None = None  # heartbeats and the stall watchdog (worker.heartbeat)
    fault_group: Any = None  # a process group only the `hang_at_step:...:collective` fault uses
    pending_save: ckpt.BackgroundSave | None = None  # training.async_save: the save being written

    def enter(self, phase: str) -> None:
        """The main thread enters `phase` (the heartbeat shows it; the time ledger counts it)."""
        if self.pulse is not None:
            self.pulse.enter(phase)

    def exit_fields(self) -> dict[str, Any]:
        """What every `exit` event carries for goodput: this attempt's time ledger."""
        if self.pulse is None:
            return {}
        return {"ledger": self.pulse.ledger_now(), "train_s": round(self.pulse.train_s, 3)}

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

        NOTE: it was needed while DeepSpeed's gating sized expert capacity from the local token
        count (batch x seq), as the all_to_all needs the same capacity on every rank of the
        expert-parallel group. The masked gate (worker/moe_gate.py) now agrees the capacity over the
        group itself; the padding stays because removing it changes the matmul shapes, and so the
        bits of the reference trajectories (tests/assets/losses), for one all-reduce per micro-batch.
        """
        import torch
        import torch.distributed as dist
        import torch.nn.functional as F

        if self.info.world_size == 1 or self.routing is None:
            return batch
        seq = batch["input_ids"].shape[1]
        longest = torch.tensor([seq], dtype=torch.long)
        phase = self.pulse.phase if self.pulse is not None else "data"
        self.enter("collective")  # the heartbeat shows a rank waiting here for a stuck peer
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
        self.enter(phase)
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

        from worker import model as moe

        batch = self.common_length(batch)
        torch.manual_seed(step_seed(self.cfg.training.seed, self.step, micro, self.info.rank))
        device = self.engine.device
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
        label_weight = self.cfg.moe.label_routing.weight if self.routing is not None else 0.0
        if label_weight > 0:
            # (b, s): each token carries its example's label id (padding is masked by the layers)
            token_labels = batch["expert_label_ids"][:, None].expand_as(batch["input_ids"])
            moe.set_token_labels(self.engine.module, token_labels)
        self.enter("forward")
        out = self.engine(**inputs)
        lm = out.loss
        aux = moe.moe_aux_loss(self.engine.module)
        loss = lm + self.cfg.moe.aux_loss_weight * aux
        label_loss = moe.moe_label_loss(self.engine.module) if label_weight > 0 else None
        if label_loss is not None:
            loss = loss + label_weight * label_loss
        self.enter("backward")
        self.engine.backward(loss)
        if micro == self.gas - 1 and not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeed's accumulation boundary is out of step with the loop")
        self.enter("optimizer")
        self.engine.step()
        if self.routing is not None:
            self.routing.add(
                moe.expert_token_counts(self.engine.module), moe.routing_top1(self.engine.module), batch,
                label_loss=float(label_loss.detach()) if label_loss is not None else None,
            )  # fmt: skip
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

    def wait_for_save(self, timeout: float | None = None) -> ckpt.SaveResult | None:
        """Block until the background save (if any) is published; its error is raised here."""
        pending, self.pending_save = self.pending_save, None
        if pending is None:
            return None
        if not pending.done():
            self.enter("checkpoint")  # training waits for the previous save: checkpoint time
        result = pending.wait(timeout)
        if self.pulse is not None:
            # A published save is progress, and the stall limit learns how long a write can take
            # (the main thread may wait that long here).
            self.pulse.saved(result.save_s)
        return result

    def save(self, *, background: bool = False) -> ckpt.SaveResult | None:
        """Save at this step, every rank together. `background` (training.async_save): snapshot
        the state, return, and let a thread write it (None is returned; rank 0's thread writes the
        `checkpoint` event once the checkpoint is published). A save first waits for the previous
        background save, so two never overlap."""
        self.wait_for_save()
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
        self.enter("checkpoint")
        if background:
            self._save_in_background(client_state)
            return None
        result = ckpt.save_checkpoint(
            self.engine,
            self.run_dir,
            self.step,
            client_state,
            rank=self.info.rank,
            keep=self.cfg.training.keep_checkpoints,
            hold_save_s=self.faults.hold_save_s,
        )
        train_s = None
        if self.pulse is not None:
            self.pulse.saved(result.save_s)
            train_s = round(self.pulse.train_s, 3)
        self.reporter.event(
            "checkpoint", tag=result.tag, step=self.step, save_s=round(result.save_s, 3), bytes=result.bytes,
            train_s=train_s,  # time in optimizer steps so far in this attempt (goodput: steps kept)
        )
        logger.info("saved checkpoint %s (%.2f s, %.1f MB)", result.tag, result.save_s, result.bytes / 1e6)
        return result

    def _save_in_background(self, client_state: dict[str, Any]) -> None:
        train_s = round(self.pulse.train_s, 3) if self.pulse is not None else None
        reporter = self.reporter

        def published(result: ckpt.SaveResult) -> None:  # in the save's thread, once published
            reporter.event(
                "checkpoint", tag=result.tag, step=client_state["step"], save_s=round(result.save_s, 3),
                bytes=result.bytes, train_s=train_s, stall_s=round(result.stall_s or 0.0, 3), background=True,
            )  # fmt: skip
            logger.info("saved checkpoint %s in the background (%.2f s, training waited %.3f s, %.1f MB)",
                        result.tag, result.save_s, result.stall_s or 0.0, result.bytes / 1e6)

        self.pending_save = ckpt.start_background_save(
            self.engine, self.run_dir, self.step, client_state, rank=self.info.rank,
            keep=self.cfg.training.keep_checkpoints, hold_save_s=self.faults.hold_save_s, on_done=published,
        )  # fmt: skip
        if self.pulse is not None:
            # NOTE: progress as of the snapshot: training goes on while the thread writes, so the
            # stall watchdog sees steps, not the write (worker.heartbeat).
            self.pulse.saved(self.pending_save.stall_s)

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
        if self.pulse is not None:
            self.pulse.training_starts(self.step)
        while self.step < self.total_steps:
            self._injected_hang()
            started = time.perf_counter()
            lm_sum = aux_sum = 0.0
            tokens = 0
            lr = float(self.engine.get_lr()[0])
            for micro in range(self.gas):
                self.enter("data")
                batch = next(batches)
                lm, aux, n = self.forward_backward(batch, micro)
                lm_sum += lm
                aux_sum += aux
                tokens += n
            if self.faults.slow_rank == self.info.rank:
                # MOE_ORCH_FAULT slow_rank: this rank computes `slow_factor` times as long.
                time.sleep((self.faults.slow_factor - 1.0) * (time.perf_counter() - started))
            self.step += 1
            epoch = (self.step - 1) // self.steps_per_epoch
            save_now = self.signals.take_save_request(self.run_dir, check_file=self.info.is_main)
            usr2 = self.signals.stop_signal == "USR2"
            term = self.signals.stop_signal == "TERM"
            # One collective per step: losses, tokens and every rank's flags (any rank's flag wins).
            mine = StepTotals(lm_sum, aux_sum, float(tokens), float(usr2), float(term), float(save_now))
            self.enter("collective")
            waited = time.perf_counter()
            totals = StepTotals.from_list(self.all_reduce(mine.to_list()))
            waited = time.perf_counter() - waited
            world = self.info.world_size
            lm_mean = totals.lm_sum / (world * self.gas)
            aux_mean = totals.aux_sum / (world * self.gas)
            loss = lm_mean + self.cfg.moe.aux_loss_weight * aux_mean
            step_time = time.perf_counter() - started
            if self.pulse is not None:
                self.pulse.step_done(self.step, step_time, waited)
            self.enter("logging")  # progress, metrics, TensorBoard: after the step's own time
            window_tokens += int(totals.tokens)
            window_time += step_time
            tokens_per_s = totals.tokens / step_time if step_time > 0 else 0.0
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
            if totals.stop_signal is not None and self.step < self.total_steps:
                # NOTE: a signal at the last step just completes (the final save follows).
                return stop_on_signal(self, totals.stop_signal, last_saved)
            if eval_every is not None and self.step % eval_every == 0 and self.step < self.total_steps:
                self._log_eval()
            if (self.step % t.save_steps == 0 or totals.save_requested) and self.step < self.total_steps:
                self.save(background=t.async_save)
                last_saved = self.step
                if totals.save_requested and self.info.is_main:
                    clear_save_now(self.run_dir)
        # Past the last step a stop signal changes nothing: the final save follows.
        self.signals.ignore_from_now()
        self._log_eval()
        if last_saved != self.step:
            self.save()
        self.wait_for_save()  # the final checkpoint may be the last background one
        if self.pulse is not None:
            self.pulse.disarm()  # trained and saved: the export and the teardown are not steps
        self.enter("export")
        if self.info.is_main:
            clear_save_now(self.run_dir)  # a request at the last step was served by the final save
            if t.export_on_finish:
                # NOTE: offline from the final checkpoint's files (every expert file is there),
                # so the other ranks need not wait for it.
                from worker.export import export_run

                out = export_run(self.run_dir)
                logger.info("exported a Hugging Face folder to %s", out)
        self.enter("done")
        self.reporter.event(
            "exit", reason=StopReason.COMPLETED, step=self.step, requeued=False, error=None,
            **self.exit_fields(),
        )  # fmt: skip
        return EXIT_COMPLETED

    def _injected_hang(self) -> None:
        """MOE_ORCH_FAULT `hang_at_step:N:R[:collective]`: rank R stops for good before step N,
        outside any collective (in `data`) or inside one nobody else joins."""
        f = self.faults
        if f.hang_at_step is None or self.step + 1 != f.hang_at_step or self.info.rank != f.hang_rank:
            return
        logger.warning("MOE_ORCH_FAULT: rank %d hangs before step %d (%s)", self.info.rank, f.hang_at_step,
                       "in a collective" if f.hang_in_collective else "outside collectives")
        if f.hang_in_collective and self.fault_group is not None:
            import torch
            import torch.distributed as dist

            self.enter("collective")
            dist.all_reduce(torch.zeros(1), group=self.fault_group)  # the others never join
        self.enter("data")
        while True:
            time.sleep(3600)

    def _log_eval(self) -> None:
        self.enter("eval")
        started = time.perf_counter()
        eval_loss = self.evaluate()
        if self.pulse is not None:
            self.pulse.evaluated(time.perf_counter() - started)
        if not math.isnan(eval_loss):
            self.reporter.log_eval(self.step, eval_loss)
            logger.info("step %d eval_loss %.4f", self.step, eval_loss)

    def _log_step(
        self, epoch: int, loss: float, lm: float, aux: float, lr: float, tokens_per_s: float, step_time: float
    ) -> None:
        # expert_load, label_routing, routing_mi_bits, ... (worker.metrics.RoutingStats)
        routing: dict[str, Any] = {"expert_load": {}, "label_routing": {}}
        if self.routing is not None:
            routing = self.routing.reduce_and_reset()
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
            **routing,
            "max_rss_mb": round(peak_rss_mb(), 1),
        }
        self.reporter.log_step(record)
        logger.info(
            "step %d/%d epoch %d loss %.4f (lm %.4f aux %.4f) lr %.3g grad_norm %s %.0f tok/s %.3f s/step",
            self.step, self.total_steps, epoch, loss, lm, aux, lr, record["grad_norm"], tokens_per_s,
            step_time,
        )

