"""What a rank does when its watchdog finds training stalled (worker.heartbeat): it never returns.

1. Every rank writes the Python stacks of all its threads (faulthandler) to
   `attempts/<key>/stacks/rank-<r>.txt`, under a header with its heartbeat.
2. The first rank to claim `attempts/<key>/hang.claim` (O_EXCL; any rank, since rank 0 may be the
   stuck one) waits a moment for the others' heartbeats, reads them all, and writes the `hang`
   event: the suspects (silent ranks, ranks that never wrote a heartbeat, or those behind the
   others) and the ranks waiting for them; `stage` says whether it hung before the attempt's first
   step (`startup`, under `cluster.startup_timeout_s`) or while training.
   Within `cluster.max_hangs` (hang events counted in events.jsonl) and with `cluster.requeue`, it
   asks the scheduler to keep the suspects' nodes out of the next run when the partition has
   enough other nodes (else it says the job retries on the same nodes) and requeues the job; it
   then writes the `exit` event with stop reason `hung` and marks `hang.done`.
3. Every rank ends its process with EXIT_HUNG (the others after `hang.done`, or a minute).

The main thread may be blocked in a collective that will never return: only `os._exit` ends it.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.redact import redact
from orchestrator.rundir import reports
from orchestrator.rundir.exitcodes import EXIT_HUNG
from orchestrator.rundir.heartbeats import attempt_dir, diagnose, read_heartbeats, stacks_path, stragglers
from orchestrator.rundir.runs import StopReason
from worker.heartbeat import Pulse

if TYPE_CHECKING:
    from orchestrator.spec.schema import ClusterConfig
    from worker.dist import DistInfo

logger = logging.getLogger(__name__)

CLAIM = "hang.claim"
DONE = "hang.done"
PEERS_WAIT_S = 60.0
"""How long a rank that did not claim the report waits for it before it exits anyway."""


def write_stacks(run_dir: Path, pulse: Pulse) -> Path:
    path = stacks_path(run_dir, pulse.attempt_key, pulse.rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        idle = time.time() - pulse.last_progress
        fh.write(
            f"# rank {pulse.rank} on {pulse.host} (pid {pulse.pid}), step {pulse.step}, phase {pulse.phase}, "
            f"no progress for {idle:.1f} s (stall limit {pulse.limit_s():.1f} s)\n"
        )
        fh.flush()
        faulthandler.dump_traceback(file=fh, all_threads=True)
    return path


def _claim(folder: Path) -> bool:
    try:
        fd = os.open(folder / CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def rank_hosts(info: DistInfo) -> dict[int, str]:
    """Every rank's node as the launchers place them, in blocks of ranks per node (srun
    `--ntasks-per-node`, torchrun `--nproc_per_node`); "?" where the node list does not tell."""
    nodes = info.nodes
    if nodes and info.world_size % len(nodes) == 0:
        per_node = info.world_size // len(nodes)
        return {r: nodes[r // per_node] for r in range(info.world_size)}
    return dict.fromkeys(range(info.world_size), "?")


def report_hang(run_dir: Path, pulse: Pulse, info: DistInfo, cluster: ClusterConfig) -> None:
    """The claiming rank: the `hang` and `exit` events, the exclusion and the requeue."""
    from worker.signals import running_job  # the scheduler's in-job side

    time.sleep(min(2.0 * cluster.heartbeat_s, 5.0))  # the others' last heartbeats and stacks
    detected = time.time()
    beats = read_heartbeats(run_dir, pulse.attempt_key)
    diag = diagnose(beats, detected, heartbeat_s=cluster.heartbeat_s, expected=rank_hosts(info))
    last_progress = max(
        (float(b.get("last_progress") or 0.0) for b in beats.values()), default=pulse.last_progress
    )
    hangs = 1 + sum(1 for ev in reports.read_events(run_dir) if ev.get("event") == "hang")
    within_budget = hangs <= cluster.max_hangs
    job = running_job(info)
    exclusion = ""
    if within_budget and cluster.requeue:
        suspects = sorted({r.host for r in diag.suspects} - {"?"})
        requeued = job.requeue()
        exclusion = job.exclude_next(suspects, max(1, len(info.nodes))) if requeued and suspects else ""
    else:
        requeued = False
    note = (
        f"hang {hangs} of cluster.max_hangs={cluster.max_hangs}"
        + ("" if within_budget else ": budget exhausted, not requeued")
        + (f"; {exclusion}" if exclusion else "")
    )
    reports.append_event(
        run_dir, "hang", attempt_key=pulse.attempt_key, step=pulse.step, detected_by=f"rank {pulse.rank}",
        stage="startup" if pulse.starting else "training", stall_limit_s=round(pulse.limit_s(), 1),
        last_progress=last_progress,
        hang_s=round(detected - last_progress, 1),
        stacks=str(attempt_dir(run_dir, pulse.attempt_key) / "stacks"),
        note=note, **diag.to_dict(),
    )  # fmt: skip
    logger.error("training hung: %s (%s)", diag.summary(), note)
    reports.append_event(
        run_dir, "exit", reason=StopReason.HUNG, step=pulse.step, requeued=requeued,
        error=redact(f"hung: {diag.summary()}"), ledger=pulse.ledger_now(), train_s=round(pulse.train_s, 3),
    )  # fmt: skip


_FLAGGED: set[tuple[str, int]] = set()
"""(attempt key, rank) of the stragglers already reported: one `straggler` event each."""


def report_stragglers(run_dir: Path, cluster: ClusterConfig, pulse: Pulse) -> None:
    """Rank 0's watchdog, after each heartbeat: a `straggler` event for each rank newly slower
    than `cluster.straggler_factor` times the others (orchestrator.rundir.heartbeats.stragglers)."""
    beats = read_heartbeats(run_dir, pulse.attempt_key)
    for slow in stragglers(beats, cluster.straggler_factor):
        if (pulse.attempt_key, slow.rank) in _FLAGGED:
            continue
        _FLAGGED.add((pulse.attempt_key, slow.rank))
        logger.warning("straggler: rank %d on %s computes %.2fx as long as the others", slow.rank, slow.host,
                       slow.factor)
        reports.append_event(
            run_dir, "straggler", attempt_key=pulse.attempt_key, step=pulse.step, **slow.to_dict()
        )


def handle_stall(run_dir: Path, info: DistInfo, cluster: ClusterConfig, pulse: Pulse) -> None:
    """The watchdog's `on_stall`: stacks, the report (one rank), then the end of this process."""
    from worker.__main__ import exit_process

    logger.error(
        "no training progress for %.0f s (limit %.0f s) at step %s, phase %s: writing stacks",
        time.time() - pulse.last_progress, pulse.limit_s(), pulse.step, pulse.phase,
    )  # fmt: skip
    folder = attempt_dir(run_dir, pulse.attempt_key)
    try:
        write_stacks(run_dir, pulse)
        if _claim(folder):
            try:
                report_hang(run_dir, pulse, info, cluster)
            finally:
                (folder / DONE).touch()
        else:
            deadline = time.time() + PEERS_WAIT_S
            while time.time() < deadline and not (folder / DONE).exists():
                time.sleep(0.5)
    except Exception:
        logger.exception("reporting the hang failed")
    exit_process(EXIT_HUNG)
