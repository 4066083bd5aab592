"""The seed's QA JSONL format: parsing, and errors that name `file:line` and the reason.

One JSON object per line:

    {"question": "What is the capital of France?", "answer": "Paris", "expert_label": "factual_lookup"}

`answer` is a string, a list of strings (joined with ", ") or `{"text": <string or list>}`;
`expert_label` is optional (a string or null). Blank lines are skipped. No torch here: `validate`
reads data files on the login node.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import ConfigIssue, DataFileError
from orchestrator.spec.schema import RunConfig

logger = logging.getLogger(__name__)

MAX_REPORTED_LINES = 5
"""How many bad lines an error lists (the rest are counted)."""


@dataclass(frozen=True)
class QAExample:
    """One question/answer pair, with the 1-based line it came from."""

    question: str
    answer: str  # normalised: always a non-empty string
    expert_label: str | None
    line: int


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", dict: "an object", list: "a list"}.get(
        type(value), type(value).__name__
    )


def _join_strings(items: list[Any], where: str) -> str:
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ValueError(f"{where} item {i} is {_type_name(item)}, expected a string")
    return ", ".join(s.strip() for s in items if s.strip())


def normalize_answer(value: Any) -> str:
    """The answer as one string: a string, a list of strings joined with ", ", or `{"text": ...}`.

    Raises ValueError with the reason when the value has none of these forms. The result may be
    empty (the caller decides whether that is an error).
    """
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list):
        return _join_strings(value, "answer list")
    if isinstance(value, dict):
        if "text" not in value:
            keys = ", ".join(sorted(map(str, value))) or "none"
            raise ValueError(f'answer object needs a "text" key (has: {keys})')
        text = value["text"]
        if isinstance(text, str):
            return text.strip()
        if isinstance(text, list):
            return _join_strings(text, 'answer "text" list')
        raise ValueError(f'answer "text" is {_type_name(text)}, expected a string or a list of strings')
    raise ValueError(
        f'answer is {_type_name(value)}, expected a string, a list of strings or {{"text": ...}}'
    )


def _parse_line(text: str, line: int) -> QAExample:
    """One non-blank line as an example; ValueError carries the reason shown to the user."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f'expected a JSON object {{"question": ..., "answer": ...}}, got {_type_name(obj)}')
    missing = [key for key in ("question", "answer") if key not in obj]
    if missing:
        present = ", ".join(sorted(map(str, obj))) or "none"
        raise ValueError(f"missing {' and '.join(repr(k) for k in missing)} (keys present: {present})")
    question = obj["question"]
    if not isinstance(question, str):
        raise ValueError(f"question is {_type_name(question)}, expected a string")
    if not question.strip():
        raise ValueError("question is empty")
    answer = normalize_answer(obj["answer"])
    if not answer:
        raise ValueError("answer is empty")
    label = obj.get("expert_label")
    if label is not None and not isinstance(label, str):
        raise ValueError(f"expert_label is {_type_name(label)}, expected a string or null")
    # NOTE: an empty label means "no label", like null: it gets the label id -1 in the worker.
    label = label.strip() if label is not None and label.strip() else None
    return QAExample(question=question.strip(), answer=answer, expert_label=label, line=line)


def _missing_file_issue(path: Path, field: str) -> ConfigIssue:
    resolved = path.expanduser().resolve()
    if resolved.is_dir():
        message = f"{resolved} is a folder, not a JSONL file; point {field} at the .jsonl file inside it"
    else:
        message = (
            f"data file not found: {resolved} (relative paths resolve against the config file's "
            f"folder); fix {field} or create the file"
        )
    return ConfigIssue(path=field, message=message, file=str(path))


def read_qa_file(
    path: str | Path, max_samples: int | None = None, *, field: str = "data.train_file"
) -> list[QAExample]:
    """Every example of a QA JSONL file, in file order; with `max_samples`, only the first N
    non-blank lines are read (and checked).

    Raises DataFileError naming `file:line` and the reason for the first bad lines (up to
    MAX_REPORTED_LINES, plus a count of the rest), or the resolved path when the file is missing.
    `field` is the config field the path came from, shown in the error.
    """
    p = Path(path)
    try:
        with p.open("rb") as fh:
            raw_lines = fh.read().split(b"\n")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise DataFileError([_missing_file_issue(p, field)]) from None
    except PermissionError:
        message = f"cannot read data file: permission denied; check its mode and owner (ls -l {p})"
        raise DataFileError([ConfigIssue(path=field, message=message, file=str(p))]) from None
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise DataFileError(
            [ConfigIssue(path=field, message=f"cannot read data file: {reason}", file=str(p))]
        ) from None

    examples: list[QAExample] = []
    issues: list[ConfigIssue] = []
    bad = 0
    for number, raw in enumerate(raw_lines, start=1):
        if max_samples is not None and len(examples) + bad >= max_samples:
            break
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            byte, column = raw[exc.start], exc.start + 1
            reason = f"not UTF-8 text (byte 0x{byte:02x} at column {column}); save the file as UTF-8"
        else:
            try:
                examples.append(_parse_line(text, number))
                continue
            except ValueError as exc:
                reason = str(exc)
        bad += 1
        if len(issues) < MAX_REPORTED_LINES:
            issues.append(ConfigIssue(path=field, message=reason, file=str(p), line=number))
    if bad:
        if bad > len(issues):
            issues.append(
                ConfigIssue(
                    path=field,
                    message=f"{bad - len(issues)} more bad lines ({bad} in all); each line must be "
                    '{"question": str, "answer": str | [str] | {"text": ...}, "expert_label": str}',
                    file=str(p),
                )
            )
        raise DataFileError(issues)
    logger.debug("read %d examples from %s", len(examples), p)
    return examples


def held_out_count(n_examples: int, eval_fraction: float) -> int:
    """How many examples `make_splits` holds out for evaluation when there is no eval file.

    At least 1 when `eval_fraction` > 0, never all of them (training keeps at least one).
    """
    if eval_fraction <= 0 or n_examples < 2:
        return 0
    return min(max(1, round(eval_fraction * n_examples)), n_examples - 1)


def check_data_files(cfg: RunConfig) -> list[ConfigIssue]:
    """Problems with the config's data files (for `validate`); an empty list means they are usable."""
    d = cfg.data
    issues: list[ConfigIssue] = []
    train: list[QAExample] = []
    try:
        train = read_qa_file(d.train_file, d.max_samples, field="data.train_file")
    except DataFileError as exc:
        issues.extend(exc.issues)
    else:
        if not train:
            issues.append(ConfigIssue("data.train_file", "has no examples; add QA lines", d.train_file))
    n_eval = 0
    if d.eval_file is not None:
        try:
            n_eval = len(read_qa_file(d.eval_file, field="data.eval_file"))
        except DataFileError as exc:
            issues.extend(exc.issues)
    elif train:
        n_eval = held_out_count(len(train), d.eval_fraction)
        if d.eval_fraction > 0 and n_eval == 0:
            issues.append(
                ConfigIssue(
                    "data.eval_fraction",
                    f"the training file has {len(train)} example, too few to hold one out for "
                    "evaluation; add examples, set data.eval_file, or set data.eval_fraction: 0",
                    d.train_file,
                )
            )
    if train:
        n_train = len(train) - (0 if d.eval_file is not None else n_eval)
        per_round = cfg.training.micro_batch_size * cfg.data_parallel_size
        if n_train < per_round:
            issues.append(
                ConfigIssue(
                    "training.micro_batch_size",
                    f"the training split has {n_train} examples but one micro-batch on every rank "
                    f"needs {per_round} (micro_batch_size {cfg.training.micro_batch_size} x "
                    f"{cfg.data_parallel_size} ranks); add data or lower micro_batch_size",
                )
            )
    return issues
