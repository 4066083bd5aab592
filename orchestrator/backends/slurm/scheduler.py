"""squeue/sacct/sinfo/scancel from the login node: one batched call each per poll, and their parsers.

A poll asks `squeue` once and `sacct` once for every job id of every run it looks at, whatever the
number of runs. Both outputs use fixed formats (`FORMATS` below) so the parsers can be tested with
literal scheduler output. Nothing here imports torch; a status poll starts fast.

Two scheduler habits shape the parsing:
- requeue: `sacct -D` keeps one row per run of a requeued job (`REQUEUED`, `PREEMPTED`,
  `NODE_FAIL`, then `RUNNING`/`COMPLETED`), all with the same job id, oldest first;
- job-id reuse: after a controller restart with fresh state, ids start again at 1, so a row with
  the right id may belong to an older job. Rows are matched to an attempt by submit time
  (`rows_since`), never by id alone.

srun's reports of the tasks that ended badly (which rank, which node, how) are not in sacct: see
`task_reports.py`. SLURM's time format is parsed by `injob.parse_time`, shared with the job's side.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from orchestrator.backends import nodelist as nodelist_mod
from orchestrator.backends.slurm.injob import parse_time
from orchestrator.errors import ConfigError, SchedulerError
from orchestrator.rundir.runs import StopReason

logger = logging.getLogger(__name__)

SQUEUE_FORMAT = "%i|%T|%r|%N|%V|%S"
SACCT_FIELDS = "JobID,State,ExitCode,Submit,Start,End,NodeList"
# NOTE: JobID, not JobIDRaw: an array task's raw id is an id of its own (`1236`), its JobID the
# `1234_2` that squeue, submitit and our records use. For any other job the two are equal.
JOB_ID_RE = re.compile(r"^\d+(?:_\d+)?$")
"""A job id as moe-orch records it: `1234`, or an array task `1234_2`."""
SUBMIT_SLACK_S = 120.0
"""A scheduler row belongs to an attempt only if it was submitted at most this long before the
attempt's recorded submit time (clock skew between login node and controller)."""

ALIVE_STATES = frozenset(
    {
        "PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
        "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "SPECIAL_EXIT",
    }
)  # fmt: skip
FINAL_STATES = frozenset(
    {
        "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
        "BOOT_FAIL", "DEADLINE",
    }
)  # fmt: skip

_STOP_REASON: dict[str, StopReason] = {
    "COMPLETED": StopReason.COMPLETED,
    "FAILED": StopReason.FAILED,
    "CANCELLED": StopReason.CANCELLED,
    "TIMEOUT": StopReason.TIMEOUT,
    "DEADLINE": StopReason.TIMEOUT,
    "NODE_FAIL": StopReason.NODE_FAIL,
    "BOOT_FAIL": StopReason.NODE_FAIL,
    "PREEMPTED": StopReason.PREEMPTED,
    "REQUEUED": StopReason.PREEMPTED,
    "OUT_OF_MEMORY": StopReason.FAILED,
}


def stop_reason_for(state: str) -> StopReason | None:
    """Our stop reason for a final (or requeued) SLURM state; None while the job lives."""
    return _STOP_REASON.get(state)


@dataclass(frozen=True)
class QueueRow:
    """One `squeue` line (with `--states=all` also recently finished jobs)."""

    job_id: str
    state: str
    reason: str
    nodelist: str
    submit: float | None
    start: float | None

    @property
    def alive(self) -> bool:
        return self.state in ALIVE_STATES


@dataclass(frozen=True)
class AcctRow:
    """One `sacct -D -X` line: one run of a job (requeues give one row each)."""

    job_id: str
    state: str
    cancelled_by: str | None
    exit_code: str
    submit: float | None
    start: float | None
    end: float | None
    nodelist: str

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES or self.state == "REQUEUED"


@dataclass
class Snapshot:
    """What the scheduler said in one poll."""

    queue: dict[str, QueueRow] = field(default_factory=dict)
    acct: dict[str, list[AcctRow]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    time: float = 0.0


def split_state(raw: str) -> tuple[str, str | None]:
    """`CANCELLED by 0` -> ("CANCELLED", "0"); `RUNNING` -> ("RUNNING", None)."""
    raw = raw.strip()
    match = re.match(r"^([A-Z_]+)(?:\+)?(?:\s+by\s+(\S+))?", raw)
    if not match:
        return raw, None
    return match.group(1), match.group(2)


def _job_id(raw: str) -> str | None:
    raw = raw.strip()
    # A job `12` or an array task `12_3`; steps (`12.batch`, `12.0`), an array's pending remainder
    # (`12_[4-7%2]`) and heterogeneous jobs (`12+0`) are not attempts.
    return raw if JOB_ID_RE.match(raw) else None


def job_sort_key(job_id: str) -> tuple[int, int]:
    """`12` -> (12, -1), `12_3` -> (12, 3): numeric order, an array's tasks after its id."""
    head, _, task = job_id.partition("_")
    return int(head), int(task) if task else -1


def parse_squeue(text: str) -> dict[str, QueueRow]:
    """Parse `squeue -h -o SQUEUE_FORMAT` output. For a duplicated id the newest row wins."""
    rows: dict[str, QueueRow] = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) < 6:
            continue
        job_id = _job_id(parts[0])
        if job_id is None:
            continue
        state, _ = split_state(parts[1])
        row = QueueRow(
            job_id, state, parts[2].strip(), parts[3].strip(), parse_time(parts[4]), parse_time(parts[5])
        )
        old = rows.get(job_id)
        if old is None or (row.submit or 0) >= (old.submit or 0):
            rows[job_id] = row
    return rows


def parse_sacct(text: str) -> dict[str, list[AcctRow]]:
    """Parse `sacct -D -X -P -n --format SACCT_FIELDS`; rows per job id, oldest first."""
    out: dict[str, list[AcctRow]] = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) < 7:
            continue
        job_id = _job_id(parts[0])
        if job_id is None:
            continue
        state, by = split_state(parts[1])
        row = AcctRow(
            job_id=job_id,
            state=state,
            cancelled_by=by,
            exit_code=parts[2].strip(),
            submit=parse_time(parts[3]),
            start=parse_time(parts[4]),
            end=parse_time(parts[5]),
            nodelist=parts[6].strip(),
        )
        out.setdefault(job_id, []).append(row)
    for rows in out.values():
        rows.sort(key=lambda r: (r.submit or 0, r.start or float("inf")))
    return out


def rows_since(
    rows: Sequence[AcctRow], submitted: float | None, slack: float = SUBMIT_SLACK_S
) -> list[AcctRow]:
    """The rows that can belong to a job submitted at `submitted` (drops an older job's rows
    that carry a reused id)."""
    if submitted is None:
        return list(rows)
    return [r for r in rows if r.submit is None or r.submit >= submitted - slack]


def expand_nodelist(nodelist: str) -> list[str]:
    """`n[1-3,5],gpu01` -> [n1, n2, n3, n5, gpu01]; `None assigned`/`(null)` -> []."""
    text = nodelist.strip()
    if not text or text.startswith("None") or text in ("(null)", "N/A"):
        return []
    try:
        return nodelist_mod.expand_nodelist(text)
    except ConfigError:
        logger.warning("unreadable node list from SLURM: %r", nodelist)
        return []


# --- the calls ------------------------------------------------------------------------------


def _run(args: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def query(job_ids: Iterable[str]) -> Snapshot:
    """One `squeue` and one `sacct` call for all `job_ids`. Failures are recorded in
    `Snapshot.errors` (status still shows what the run files say)."""
    ids = sorted({j for j in job_ids if j and JOB_ID_RE.match(j)}, key=job_sort_key)
    snap = Snapshot(time=time.time())
    if not ids:
        return snap
    joined = ",".join(ids)
    try:
        # `-r`: one line per array task (a pending array's tasks are otherwise one `12_[2-3%2]` line).
        sq = _run(["squeue", "-h", "-r", "--states=all", "-j", joined, "-o", SQUEUE_FORMAT])
        if sq.returncode == 0:
            snap.queue = parse_squeue(sq.stdout)
        elif "Invalid job id" not in sq.stderr:
            snap.errors.append(f"squeue: {sq.stderr.strip() or sq.returncode}")
    except (OSError, subprocess.SubprocessError) as exc:
        snap.errors.append(f"squeue: {exc}")
    try:
        sa = _run(["sacct", "-D", "-X", "-P", "-n", "-j", joined, f"--format={SACCT_FIELDS}"])
        if sa.returncode == 0:
            snap.acct = parse_sacct(sa.stdout)
        else:
            snap.errors.append(f"sacct: {sa.stderr.strip() or sa.returncode}")
    except (OSError, subprocess.SubprocessError) as exc:
        snap.errors.append(f"sacct: {exc}")
    for err in snap.errors:
        logger.warning("scheduler query: %s", err)
    return snap


def unhealthy_nodes(nodes: Iterable[str]) -> list[str]:
    """Those of `nodes` that `sinfo` reports down, drained, failing or not responding, or that
    carry a down/drain reason (`%E`).

    NOTE: the reason matters: a node set DOWN while its dead slurmd still holds a job shows as
    `completing` in `%T` (seen on the localhost cluster right after a node failure), but its
    reason (`Not responding`, or the admin's) is set.
    """
    wanted = list(nodes)
    if not wanted:
        return []
    try:
        out = _run(["sinfo", "-h", "-N", "-n", ",".join(wanted), "-o", "%N|%T|%E"])
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("sinfo failed (%s); no node excluded", exc)
        return []
    if out.returncode != 0:
        logger.warning("sinfo failed (%s); no node excluded", out.stderr.strip() or out.returncode)
    bad: list[str] = []
    for line in out.stdout.splitlines():
        name, _, rest = line.partition("|")
        state, _, reason = rest.partition("|")
        state = state.strip().lower()
        flagged = reason.strip().lower() not in ("", "none")
        if flagged or any(w in state for w in ("down", "drain", "fail", "no_respond")) or state.endswith("*"):
            if name.strip() not in bad:
                bad.append(name.strip())
    return bad


def scancel(job_id: str, *options: str) -> None:
    """Cancel a job (or, with `--signal=...`, signal it); raises SchedulerError with scancel's message."""
    try:
        res = _run(["scancel", *options, job_id])
    except (OSError, subprocess.SubprocessError) as exc:
        raise SchedulerError(f"scancel {job_id} failed: {exc}") from None
    if res.returncode != 0:
        raise SchedulerError(f"scancel {job_id} failed: {res.stderr.strip() or res.returncode}")


def start_estimate(script: str) -> str | None:
    """SLURM's own start estimate for a job of `script` (`sbatch --test-only`, which submits
    nothing): `Job 12 to start at 2026-11-28T15:20:01 using 2 processors on nodes n[1-2] in
    partition debug`; None when SLURM's commands are not here, its error when it refuses."""
    if shutil.which("sbatch") is None:
        return None
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="moe-orch-test-only-") as f:
        f.write(script)
        f.flush()
        try:
            res = _run(["sbatch", "--test-only", f.name], timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"unavailable (sbatch --test-only: {exc})"
    text = " ".join((res.stderr + res.stdout).split())
    found = re.search(r"Job \d+ to start at .*", text)
    if res.returncode == 0 and found:
        return found.group(0)
    return f"unavailable (sbatch --test-only: {text or res.returncode})"


def available() -> bool:
    """Whether SLURM's client commands are on PATH."""
    return shutil.which("sbatch") is not None and shutil.which("squeue") is not None
