"""Every exception type of moe-orch (orchestrator and worker), in one place.

`MoeOrchError` is the root of the errors a user can fix: the CLI (and the worker's `main`) turns
each into one clear line and its `exit_code`, never a traceback. Three types sit outside that tree
on purpose, because they must NOT be reported as one line (see the end of this file):
`WorkerFailedError` and `InjectedFault` (RuntimeError) and `ExitWithoutProgress` (SystemExit).

Import-light: the login node imports this module, so it needs nothing beyond the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass


class MoeOrchError(Exception):
    """Base of every error the CLI reports without a traceback."""

    exit_code: int = 1


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config: where it is and how to fix it."""

    path: str  # dotted field path, e.g. "moe.ep_size"; "" for the whole document
    message: str
    file: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        field = f"{self.path}: " if self.path and not self.message.startswith(self.path + ":") else ""
        return f"{where}{field}{self.message}"


class ConfigError(MoeOrchError):
    """The config is invalid; nothing was touched."""

    exit_code = 2

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


class ConfigFileError(ConfigError):
    """A config file cannot be read as a YAML mapping: missing, a folder, no permission, not UTF-8,
    empty, not valid YAML, or not `key: value` lines at the top. The issue names the file (and the
    line where there is one)."""


class DataFileError(ConfigError):
    """A data file is missing or has lines not in the seed's QA format."""


class RunNotFoundError(MoeOrchError):
    exit_code = 2


class RunHomeError(MoeOrchError):
    """The run home cannot hold runs safely: users who are not its owner (or, for a home shared
    with the group, not in its group) may write to it, it cannot be created, or
    `MOE_ORCH_HOME_MODE` is neither `owner` nor `group`. Nothing was written."""

    exit_code = 2


class AttemptNotFoundError(MoeOrchError):
    """A run has no attempt with the number asked for (`logs --attempt N`)."""

    exit_code = 2


class RankNotFoundError(MoeOrchError):
    """A run has no rank with the number asked for (`logs --rank N`)."""

    exit_code = 2


class SubmissionError(MoeOrchError):
    """The scheduler refused the job (sbatch failed); the run records the failure."""

    exit_code = 3


class PassthroughMissingError(SubmissionError):
    """A name in `cluster.env_passthrough` would not reach the job: the submitting environment
    does not set it (or `SBATCH_EXPORT` keeps it from the job). A first `submit` creates nothing;
    a resubmission records the refusal like any other."""

    exit_code = 2


class SchedulerError(MoeOrchError):
    """squeue/sacct/scancel failed or is missing."""

    exit_code = 3


class UnknownExecutorError(MoeOrchError):
    """No scheduler backend has this name (`cluster.executor`, or a run.json's `executor`)."""

    exit_code = 2


class CheckpointError(MoeOrchError):
    """No valid checkpoint where one is needed (missing, incomplete or damaged)."""

    exit_code = 2


class ExportError(MoeOrchError):
    """A checkpoint cannot be turned into a Hugging Face folder (missing files, wrong layout)."""

    exit_code = 2


class PlotError(MoeOrchError):
    """`plot`: the run has no `metrics.jsonl`, or no logged step in it yet."""

    exit_code = 2


class NothingToCancelError(MoeOrchError):
    """`cancel`: the run already ended (completed or failed)."""


class TokenizerError(MoeOrchError):
    """No usable tokenizer: the saved one is missing where it must exist, or it lacks an eos token."""

    exit_code = 2


# --- Outside the MoeOrchError tree ------------------------------------------------------------------
# NOTE: these are not user errors with a one-line fix; a MoeOrchError would hide their traceback.


class WorkerFailedError(RuntimeError):
    """The worker returned a non-zero exit code (its traceback is in the rank's .err log).

    Raised by the submitit job function (`orchestrator.lifecycle.job.run_worker`), so submitit
    records the task as failed.
    """


class InjectedFault(RuntimeError):
    """Raised by a `MOE_ORCH_FAULT` hook (tests of crash handling): it must look like a real crash
    (traceback on the rank's stderr, an `exit` event with reason `failed`)."""


class ExitWithoutProgress(SystemExit):
    """`MOE_ORCH_FAULT=exit_without_progress`: leave with code 1, no exit event.

    A SystemExit, so the worker's `except Exception` (which writes the `failed` exit event) lets it
    through; `worker.__main__.main` maps it to exit code 1.
    """
