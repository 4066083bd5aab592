"""`logs`: every rank's output across attempts, with `[rank N]` / `[attempt K]` prefixes.

submitit writes `<run>/logs/<job_id>_<task>_log.out` and `.err` per rank (task = global rank).
A SLURM requeue keeps the job id, so later attempts append to the same files. How attempts are
split: every rank's job function (`orchestrator.lifecycle.job.run_worker`) first writes a marker line
`=== moe-orch attempt <job_id>.<restart> rank <r> start <t> ===` to both its stdout and stderr;
`logs` cuts each file at those markers and maps `<job_id>.<restart>` to the run record's attempt
(`attempt_key`). Lines before any marker (submitit's own preamble) belong to the first attempt
of that job. Resubmissions have new job ids, hence new files.

Every line shown goes through `orchestrator.redact` (a traceback may quote a URL with credentials);
the files themselves are protected by the run directory's mode.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import AttemptNotFoundError, MoeOrchError, RankNotFoundError
from orchestrator.lifecycle.job import ATTEMPT_MARKER
from orchestrator.redact import redact
from orchestrator.rundir import reports, runs
from orchestrator.rundir.runs import RunRecord

logger = logging.getLogger(__name__)

Echo = Callable[[str], None]
_MARKER_RE = re.compile(re.escape(ATTEMPT_MARKER) + r"(\S+) rank (\S+)")
_SUBMITIT_START = "Starting with JobEnvironment("
_FILE_RE = re.compile(r"^(\d+(?:_\d+)?)_(\d+)_log\.(out|err)$")  # job `12` or array task `12_3`


@dataclass(frozen=True)
class LogLine:
    attempt: int
    rank: int
    text: str


def _attempt_numbers(rec: RunRecord) -> tuple[dict[str, int], dict[str, int]]:
    """attempt_key -> number, and job_id -> number of that job's first attempt."""
    by_key: dict[str, int] = {}
    first_of_job: dict[str, int] = {}
    for att in rec.attempts:
        if att.attempt_key:
            by_key[att.attempt_key] = att.number
        if att.job_id and att.job_id not in first_of_job:
            first_of_job[att.job_id] = att.number
    return by_key, first_of_job


def rank_files(run_dir: Path, rec: RunRecord, stream: str) -> list[tuple[str, int, Path]]:
    """(job_id, rank, path) of every per-rank log file of the run's jobs, in attempt order."""
    job_order = []
    for att in rec.attempts:
        if att.job_id and att.job_id not in job_order:
            job_order.append(att.job_id)
    found: list[tuple[str, int, Path]] = []
    folder = run_dir / "logs"
    if not folder.is_dir():
        return found
    for path in folder.iterdir():
        m = _FILE_RE.match(path.name)
        if m and m.group(3) == stream and m.group(1) in job_order:
            found.append((m.group(1), int(m.group(2)), path))
    found.sort(key=lambda t: (job_order.index(t[0]), t[1]))
    return found


def split_attempts(
    text: str, job_id: str, by_key: dict[str, int], first_of_job: dict[str, int]
) -> Iterator[tuple[int, str]]:
    """(attempt number, line) for each line of one rank's file.

    submitit's own "Starting with JobEnvironment" line comes just before the marker of a new
    attempt: lines from it up to the marker are held back and given to the marker's attempt.
    """
    current = first_of_job.get(job_id, 0)
    held: list[str] = []
    for line in text.splitlines():
        m = _MARKER_RE.search(line)
        if m:
            key = m.group(1)
            restart = key.rsplit(".", 1)[-1]
            current = by_key.get(key, current if restart == "0" else current + 1)
            for h in held:
                yield current, h
            held = []
            continue
        if held or _SUBMITIT_START in line:
            held.append(line)
            continue
        yield current, line
    for h in held:
        yield current, h


def read_logs(
    run_dir: Path,
    rec: RunRecord,
    *,
    rank: int | None = None,
    attempt: int | None = None,
    stderr: bool = False,
) -> list[LogLine]:
    by_key, first_of_job = _attempt_numbers(rec)
    out: list[LogLine] = []
    for job_id, r, path in rank_files(run_dir, rec, "err" if stderr else "out"):
        if rank is not None and r != rank:
            continue
        text = path.read_text(errors="replace")
        out.extend(
            LogLine(n, r, line)
            for n, line in split_attempts(text, job_id, by_key, first_of_job)
            if attempt is None or n == attempt
        )
    out.sort(key=lambda ln: (ln.attempt, ln.rank))  # stable: file order within a rank
    return out


def format_lines(lines: list[LogLine], *, tail: int | None = None) -> list[str]:
    """Prefix `[rank N]` always and `[attempt K]` when several attempts are shown; `tail` keeps
    the last N lines of every (attempt, rank). Secrets are redacted."""
    if tail is not None:
        groups: dict[tuple[int, int], list[LogLine]] = {}
        for ln in lines:
            groups.setdefault((ln.attempt, ln.rank), []).append(ln)
        lines = [ln for key in sorted(groups) for ln in (groups[key][-tail:] if tail > 0 else [])]
    several = len({ln.attempt for ln in lines}) > 1
    return [
        (f"[attempt {ln.attempt}] " if several else "") + f"[rank {ln.rank}] {redact(ln.text)}"
        for ln in lines
    ]


def _describe_numbers(numbers: list[int]) -> str:
    """`1..3` for a contiguous range, else the numbers: `1, 3`."""
    if len(numbers) > 2 and numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"{numbers[0]}..{numbers[-1]}"
    return ", ".join(map(str, numbers))


def check_attempt(rec: RunRecord, attempt: int) -> None:
    """Raise AttemptNotFoundError, naming the attempts the run has, unless `attempt` is one."""
    numbers = sorted(att.number for att in rec.attempts)
    if attempt in numbers:
        return
    if not numbers:
        has = "has no attempts yet"
    else:
        has = f"has attempt{'s' if len(numbers) > 1 else ''} {_describe_numbers(numbers)}"
    raise AttemptNotFoundError(
        f"run {rec.run_id} {has}; no attempt {attempt} (see `moe-orch status {rec.run_id}`)"
    )


def world_size(run_dir: Path) -> int | None:
    """How many ranks the run's job has: the newest `start` event says, else run.yaml; None when
    neither can tell (nothing to check a rank against)."""
    events = reports.read_events(run_dir)
    sizes = [ev["world_size"] for ev in events if ev["event"] == "start" and "world_size" in ev]
    if sizes:
        return int(sizes[-1])
    from orchestrator.spec.loading import load_resolved

    try:
        return load_resolved(run_dir / "run.yaml").world_size
    except MoeOrchError:
        return None


def check_rank(rec: RunRecord, run_dir: Path, rank: int) -> None:
    """Raise RankNotFoundError, naming the ranks the run has, unless `rank` is one of them."""
    world = world_size(run_dir)
    if world is None or 0 <= rank < world:
        return
    ranks = "rank 0" if world == 1 else f"ranks 0..{world - 1}"
    raise RankNotFoundError(f"run {rec.run_id} has {ranks} (world size {world}); no rank {rank}")


def show_logs(
    run_dir: Path,
    *,
    rank: int | None,
    attempt: int | None,
    stderr: bool,
    tail: int | None,
    echo: Echo,
) -> int:
    """Print the run's log lines (`echo`); return how many. An `attempt` or `rank` the run does not
    have raises AttemptNotFoundError or RankNotFoundError."""
    rec = runs.read_run(run_dir)
    if attempt is not None:
        check_attempt(rec, attempt)
    if rank is not None:
        check_rank(rec, run_dir, rank)
    lines = format_lines(read_logs(run_dir, rec, rank=rank, attempt=attempt, stderr=stderr), tail=tail)
    for line in lines:
        echo(line)
    return len(lines)


def follow_logs(
    run_dir: Path,
    *,
    rank: int | None,
    stderr: bool,
    echo: Echo,
    interval: float = 1.0,
    max_s: float | None = None,
    start_at_end: bool = False,
) -> None:
    """Stream new lines of every rank (including the next attempt's after a requeue or a
    resubmission) until the run reaches a final state."""
    from orchestrator.lifecycle.poll import poll

    offsets: dict[Path, int] = {}
    partial: dict[Path, str] = {}
    current: dict[Path, int] = {}
    start = time.time()
    last_poll = 0.0
    final = False
    if start_at_end:  # what is there was already shown (`logs --follow` prints it first)
        rec0 = runs.read_run(run_dir)
        by_key0, first0 = _attempt_numbers(rec0)
        for job_id, _r, path in rank_files(run_dir, rec0, "err" if stderr else "out"):
            text = path.read_text(errors="replace")
            offsets[path] = len(text.encode())
            numbers = [n for n, _ in split_attempts(text, job_id, by_key0, first0)]
            current[path] = numbers[-1] if numbers else first0.get(job_id, 0)
    while True:
        if time.time() - last_poll > 5 * interval:
            final = poll([run_dir])[0].record.final
            last_poll = time.time()
        rec = runs.read_run(run_dir)
        by_key, first_of_job = _attempt_numbers(rec)
        for job_id, r, path in rank_files(run_dir, rec, "err" if stderr else "out"):
            if rank is not None and r != rank:
                continue
            try:
                with path.open("r", errors="replace") as f:
                    f.seek(offsets.get(path, 0))
                    chunk = f.read()
                    offsets[path] = f.tell()
            except OSError:
                continue
            text = partial.pop(path, "") + chunk
            if text and not text.endswith("\n"):
                text, _, rest = text.rpartition("\n")
                partial[path] = rest
                if not text:
                    continue
            first = current.get(path, first_of_job.get(job_id, 0))
            n = first
            for n, line in split_attempts(text, job_id, by_key, {job_id: first}):
                echo(f"[attempt {n}] [rank {r}] {redact(line)}")
            current[path] = n
        if final or (max_s is not None and time.time() - start > max_s):
            return
        time.sleep(interval)
