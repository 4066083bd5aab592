"""moe-orch's own exception types. The CLI maps each to one clear line and an exit code."""

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


class AttemptNotFoundError(MoeOrchError):
    """A run has no attempt with the number asked for (`logs --attempt N`)."""

    exit_code = 2


class SubmissionError(MoeOrchError):
    """The scheduler refused the job (sbatch failed); the run records the failure."""

    exit_code = 3


class SchedulerError(MoeOrchError):
    """squeue/sacct/scancel failed or is missing."""

    exit_code = 3


class CheckpointError(MoeOrchError):
    """No valid checkpoint where one is needed (missing, incomplete or damaged)."""

    exit_code = 2


class ExportError(MoeOrchError):
    """A checkpoint cannot be turned into a Hugging Face folder (missing files, wrong layout)."""

    exit_code = 2
