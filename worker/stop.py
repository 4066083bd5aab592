"""Stopping on a signal (USR2 or TERM, once every rank agreed at a step boundary): every rank saves
together, rank 0 decides the exit reason (timeout, preempted or cancelled), writes the `signal` and
`exit` events and requeues the SLURM job when it should, then all ranks leave with EXIT_STOPPED.

A stop that is a cancellation (`moe-orch cancel`, or a plain `scancel`) is saved but never requeued.

With `cluster.continue_with: chain` a stop at the time limit (and a preemption whose requeue was
refused, or with `requeue: false`) is continued by a successor job that rank 0 submits
(`RunningJob.submit_successor`, `backends/slurm/chain.py`) within the budgets; the `exit` event
names it (`successor`), or says why there is none (`chain_note`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from orchestrator.rundir.exitcodes import EXIT_STOPPED
from orchestrator.rundir.reports import read_events
from orchestrator.rundir.runs import StopReason
from worker.signals import cancel_requested, job_stop_reason, running_job

if TYPE_CHECKING:
    from orchestrator.backends.base import RunningJob
    from worker.loop import Trainer

logger = logging.getLogger(__name__)


def stop_on_signal(trainer: Trainer, signal_name: str, last_saved: int) -> int:
    """Every rank: save together, then rank 0 reports, requeues, and all leave."""
    trainer.signals.ignore_from_now()  # every rank agreed to stop: a second signal changes nothing
    logger.warning("stop signal %s: saving a checkpoint at step %d", signal_name, trainer.step)
    trainer.reporter.event("signal", signal=signal_name, step=trainer.step)
    if last_saved != trainer.step:
        trainer.save()  # synchronous (after any background save): durable before the exit
    trainer.wait_for_save()  # this step's background save, if that was the last one
    trainer.enter("stopping")
    requeued = False
    if trainer.info.is_main:
        job = running_job(trainer.info)
        reason = job_stop_reason(job, trainer.cfg.cluster.signal_delay_s)
        chain: dict[str, str | None] = {}
        if _cancelled(trainer, signal_name, job):
            reason = StopReason.CANCELLED
        else:
            requeued, chain = _go_on(trainer, job, reason)
        trainer.reporter.event(
            "exit", reason=reason, step=trainer.step, requeued=requeued, error=None, **chain,
            **trainer.exit_fields(),
        )  # fmt: skip
        logger.warning("stopped at step %d (%s), requeued: %s", trainer.step, reason, requeued)
    trainer.reporter.close()
    trainer.barrier()  # leave together: no rank exits while rank 0 still reports or requeues
    return EXIT_STOPPED


def _go_on(trainer: Trainer, job: RunningJob, reason: StopReason) -> tuple[bool, dict[str, str | None]]:
    """Rank 0, after a stop that is not a cancellation: requeue the job, or (chain) submit its
    successor; (requeued, the exit event's chain fields)."""
    c = trainer.cfg.cluster
    chain = c.continue_with == "chain"
    requeued = False
    if c.requeue and not (chain and reason == StopReason.TIMEOUT):
        requeued = job.requeue()
    if requeued or not chain:
        return requeued, {}
    import time

    from orchestrator.backends.slurm.chain import successor_refusal

    refused = successor_refusal(
        read_events(trainer.run_dir), now=time.time(), step=trainer.step, max_preemptions=c.max_preemptions,
        max_attempts_without_progress=c.max_attempts_without_progress, total_time_min=c.total_time_min,
    )  # fmt: skip
    if refused is not None:
        logger.warning("no successor job: %s", refused)
        return False, {"successor": None, "chain_note": f"no successor: {refused}"}
    successor = job.submit_successor(trainer.run_dir)
    note = None if successor else "no successor: sbatch failed (see rank 0's log)"
    return False, {"successor": successor, "chain_note": note}


def _cancelled(trainer: Trainer, signal_name: str, job: RunningJob) -> bool:
    """Rank 0: a stop that must not requeue (`moe-orch cancel`, or a plain `scancel`)."""
    if cancel_requested(trainer.run_dir):
        return True
    return signal_name == "TERM" and job.term_is_cancellation()
