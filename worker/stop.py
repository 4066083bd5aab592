"""Stopping on a signal (USR2 or TERM, once every rank agreed at a step boundary): every rank saves
together, rank 0 decides the exit reason (timeout, preempted or cancelled), writes the `signal` and
`exit` events and requeues the SLURM job when it should, then all ranks leave with EXIT_STOPPED.

A stop that is a cancellation (`moe-orch cancel`, or a plain `scancel`) is saved but never requeued.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from orchestrator.rundir.exitcodes import EXIT_STOPPED
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
        trainer.save()
    trainer.enter("stopping")
    requeued = False
    if trainer.info.is_main:
        job = running_job(trainer.info)
        reason = job_stop_reason(job, trainer.cfg.cluster.signal_delay_s)
        if _cancelled(trainer, signal_name, job):
            reason = StopReason.CANCELLED
        elif trainer.cfg.cluster.requeue:
            requeued = job.requeue()
        trainer.reporter.event(
            "exit", reason=reason, step=trainer.step, requeued=requeued, error=None, **trainer.exit_fields()
        )
        logger.warning("stopped at step %d (%s), requeued: %s", trainer.step, reason, requeued)
    trainer.reporter.close()
    trainer.barrier()  # leave together: no rank exits while rank 0 still reports or requeues
    return EXIT_STOPPED


def _cancelled(trainer: Trainer, signal_name: str, job: RunningJob) -> bool:
    """Rank 0: a stop that must not requeue (`moe-orch cancel`, or a plain `scancel`)."""
    if cancel_requested(trainer.run_dir):
        return True
    return signal_name == "TERM" and job.term_is_cancellation()
