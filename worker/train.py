"""The entry point of one rank: `run(cfg, run_dir)` trains and returns the exit code.

Order of a run: rendezvous (worker.dist) -> the Trainer (worker.setup: tokenizer, data, model,
`deepspeed.initialize`, LR schedule) -> resume from the newest valid checkpoint -> the `start`
event -> optimizer steps until `total_steps` (worker.loop: metrics, eval, checkpoints; on a signal,
worker.stop) -> final eval and checkpoint -> peak RSS, process group torn down. An error is
re-raised after rank 0 wrote an `exit` event with reason `failed`. The stall watchdog runs from the
start, under `cluster.startup_timeout_s` until the first step; the heartbeat's phases before
training are `startup`, `rendezvous`, `model` and `resume` (worker.heartbeat).

The step arithmetic (LR schedule, per-micro-batch seeds, data position) is in worker.schedule.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from typing import Any

from orchestrator.errors import ExitWithoutProgress, InjectedFault
from orchestrator.redact import redact
from orchestrator.rundir.exitcodes import EXIT_COMPLETED
from orchestrator.rundir.reports import read_events, read_progress
from orchestrator.rundir.runs import StopReason
from orchestrator.spec.launch import collective_timeout_from_env
from orchestrator.spec.schema import RunConfig
from worker.dist import DistInfo, init_distributed, resolve_dist
from worker.elastic import plan_resume
from worker.hang import handle_stall, report_stragglers
from worker.heartbeat import Pulse, Watchdog
from worker.loop import Trainer, peak_rss_mb
from worker.malloc import keep_freed_memory
from worker.metrics import Reporter
from worker.setup import fit_world, resume_from_checkpoint, setup_trainer
from worker.signals import Faults, SignalState, running_job

logger = logging.getLogger(__name__)


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
    if cfg.cluster.continue_with == "chain" and info.is_main:  # continue_with: chain (worker/stop.py)
        signals.stop_before_time_limit(running_job(info), cfg.cluster.signal_delay_s)
    injected = faults.hang_at_step is not None or faults.hang_at_startup is not None
    if injected and any(e.get("event") == "hang" for e in read_events(run_path)):
        faults.after_a_hang()
    pulse = Pulse(
        rank=info.rank, attempt_key=info.attempt_key, configured_limit_s=cfg.cluster.stall_timeout_s,
        startup_limit_s=cfg.cluster.startup_timeout_s,
    )  # fmt: skip
    watchdog = Watchdog(
        pulse, run_path, heartbeat_s=cfg.cluster.heartbeat_s,
        on_stall=functools.partial(handle_stall, run_path, info, cfg.cluster),
        on_beat=functools.partial(report_stragglers, run_path, cfg.cluster) if info.is_main else None,
    )  # fmt: skip
    watchdog.start()
    if faults.hang_at_startup == info.rank:
        _injected_startup_hang(info.rank)
    use_gpu = cfg.cluster.gpus_per_node > 0
    if not use_gpu:
        keep_freed_memory()  # CPU ranks reuse each step's large temporaries (worker/malloc.py)
    # NOTE: NCCL collectives time out as the job script says (orchestrator/spec/launch.py).
    timeout_s = collective_timeout_from_env(os.environ, cfg) if use_gpu else None
    pulse.enter("rendezvous")
    init_distributed(
        info, num_threads=cfg.training.num_threads or cfg.cluster.cpus_per_task, use_gpu=use_gpu,
        timeout_s=timeout_s,
    )
    reporter: Reporter | None = None
    trainer: Trainer | None = None
    try:
        pulse.enter("model")  # the engine, and a reshard of a checkpoint of another topology
        cfg = fit_world(cfg, info)
        plan = plan_resume(cfg, run_path, info)  # reshards a checkpoint of another topology
        cfg = plan.cfg
        trainer = setup_trainer(cfg, run_path, info, signals, faults)
        trainer.pulse = pulse
        if faults.hang_in_collective and info.world_size > 1:
            import torch.distributed as tdist

            trainer.fault_group = tdist.new_group(backend="gloo")
        reporter = trainer.reporter
        pulse.enter("resume")
        previous = read_progress(run_path) if info.is_main else None
        tag, resumed_step = resume_from_checkpoint(trainer, plan)
        redone = max(0, int(previous["step"]) - resumed_step) if previous else 0
        reporter.event(
            "start", job_id=info.job_id, restart=info.restart_count, attempt_key=info.attempt_key,
            nodes=info.nodes, world_size=info.world_size, resumed_from=tag, resumed_step=resumed_step,
            steps_redone=redone, launched=round(pulse.launched, 3), heartbeat_s=cfg.cluster.heartbeat_s,
            topology_change=plan.event(), ep_size=cfg.ep_size,
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
        if info.is_main and code == EXIT_COMPLETED:
            from orchestrator.rundir import goodput

            for line in goodput.summary_lines(goodput.from_run_dir(run_path)[0]):
                logger.info("%s", line)  # the run's summary over all its attempts (docs/design.md)
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
        watchdog.stop()
        return code
    except Exception as exc:
        pulse.failed(redact(f"{type(exc).__name__}: {exc}"))
        watchdog.stop()  # the last heartbeat names this rank's error and when (first failure)
        if watchdog.fired:
            # NOTE: the hang report ended the attempt (worker.hang); this error is its consequence
            # (a peer left the collective this rank was blocked in), not a second ending.
            logger.error("after the hang: %s", redact(f"{type(exc).__name__}: {exc}"))
            raise
        _finish_background_save(trainer)
        if info.is_main:
            failed = reporter or Reporter(
                run_path, enabled=True, attempt_key=info.attempt_key, tensorboard=False
            )
            try:
                failed.event(
                    "exit", reason=StopReason.FAILED, step=trainer.step if trainer else 0, requeued=False,
                    error=redact(f"{type(exc).__name__}: {exc}"),  # `status` shows it: no credentials
                    ledger=pulse.ledger_now(), train_s=round(pulse.train_s, 3),
                )
            except OSError:
                logger.exception("could not write the exit event")
        raise


def _injected_startup_hang(rank: int) -> None:
    """MOE_ORCH_FAULT `hang_at_startup:R`: this rank stops for good before the rendezvous."""
    logger.warning("MOE_ORCH_FAULT: rank %d hangs before init_distributed", rank)
    while True:
        time.sleep(3600)


BACKGROUND_SAVE_GRACE_S = 120.0
"""How long a failing rank waits for its background save to be published before leaving."""


def _finish_background_save(trainer: Trainer | None) -> None:
    """A failing rank lets an in-flight background save finish (the other ranks' save threads run
    on, independent of training), so the checkpoint it was writing still counts; a save that
    cannot finish stays a `.partial-*` folder, skipped like one cut by a kill."""
    if trainer is None or trainer.pending_save is None:
        return
    try:
        trainer.wait_for_save(timeout=BACKGROUND_SAVE_GRACE_S)
    except Exception as exc:
        logger.error("the background save did not complete: %s", redact(str(exc)))
