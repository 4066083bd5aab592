"""The QA JSONL format: each answer form, and errors that name file:line and the reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orchestrator.errors import ConfigIssue, DataFileError
from orchestrator.spec.qa_format import QAExample, check_data_files, normalize_answer, read_qa_file
from orchestrator.spec.schema import RunConfig


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def qa(question: str = "What is 2 plus 2?", answer: Any = "4", **extra: Any) -> str:
    return json.dumps({"question": question, "answer": answer, **extra})


def config(tmp_path: Path, **data: Any) -> RunConfig:
    return RunConfig.model_validate(
        {"name": "t", "model": {"name_or_path": "tiny"}, "training": {"precision": "fp32"}, "data": data},
        context={"base_dir": str(tmp_path)},
    )


def only_issue(exc: pytest.ExceptionInfo[DataFileError]) -> ConfigIssue:
    assert len(exc.value.issues) == 1, exc.value.issues
    return exc.value.issues[0]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Paris", "Paris"),
        ("  Paris \n", "Paris"),
        (["red", "yellow", "blue"], "red, yellow, blue"),
        ({"text": "Au"}, "Au"),
        ({"text": ["Saturday", "Sunday"]}, "Saturday, Sunday"),
    ],
)
def test_normalize_answer_accepts_string_list_and_text_object(answer: Any, expected: str) -> None:
    assert normalize_answer(answer) == expected


def test_each_answer_form_is_read_with_label_and_line(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "d.jsonl",
        [
            qa("Capital of France?", "Paris", expert_label="factual_lookup"),
            qa("Primary colors?", ["red", "blue"], expert_label="list_recall"),
            qa("Symbol of gold?", {"text": "Au"}),
        ],
    )
    assert read_qa_file(path) == [
        QAExample("Capital of France?", "Paris", "factual_lookup", 1),
        QAExample("Primary colors?", "red, blue", "list_recall", 2),
        QAExample("Symbol of gold?", "Au", None, 3),
    ]


def test_blank_lines_are_skipped_and_line_numbers_stay_true(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", ["", qa(answer="1"), "   ", "", qa(answer="2")])
    assert [(ex.answer, ex.line) for ex in read_qa_file(path)] == [("1", 2), ("2", 5)]


def test_max_samples_reads_only_the_first_lines(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [qa(answer=str(i)) for i in range(10)] + ["not json"])
    assert [ex.answer for ex in read_qa_file(path, max_samples=3)] == ["0", "1", "2"]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"question": "q", "answer": ', "not valid JSON"),
        ('["q", "a"]', "expected a JSON object"),
        ('{"answer": "a"}', "missing 'question'"),
        ('{"question": "q"}', "missing 'answer'"),
        ('{"question": "  ", "answer": "a"}', "question is empty"),
        ('{"question": "q", "answer": ""}', "answer is empty"),
        ('{"question": "q", "answer": []}', "answer is empty"),
        ('{"question": 3, "answer": "a"}', "question is a number, expected a string"),
        ('{"question": "q", "answer": 42}', "answer is a number, expected a string"),
        ('{"question": "q", "answer": ["a", 1]}', "answer list item 1 is a number"),
        ('{"question": "q", "answer": {"value": "a"}}', 'answer object needs a "text" key'),
        ('{"question": "q", "answer": {"text": 5}}', 'answer "text" is a number'),
        ('{"question": "q", "answer": "a", "expert_label": 7}', "expert_label is a number"),
    ],
)
def test_each_bad_line_is_reported_with_file_line_and_reason(tmp_path: Path, line: str, reason: str) -> None:
    path = write_lines(tmp_path / "d.jsonl", [qa(), line])
    with pytest.raises(DataFileError) as exc:
        read_qa_file(path)
    issue = only_issue(exc)
    assert (issue.path, issue.file, issue.line) == ("data.train_file", str(path), 2)
    assert reason in issue.message
    assert str(issue).startswith(f"{path}:2: data.train_file: ")


def test_invalid_utf8_is_a_bad_line_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(qa().encode() + b"\n" + b'{"question": "\xff"}\n')
    with pytest.raises(DataFileError) as exc:
        read_qa_file(path)
    assert only_issue(exc).line == 2
    assert "not UTF-8" in only_issue(exc).message


def test_many_bad_lines_list_the_first_five_and_count_the_rest(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [qa()] + ["oops"] * 8)
    with pytest.raises(DataFileError) as exc:
        read_qa_file(path, field="data.eval_file")
    issues = exc.value.issues
    assert [i.line for i in issues[:5]] == [2, 3, 4, 5, 6]
    assert all(i.path == "data.eval_file" for i in issues)
    assert issues[5].line is None and "3 more bad lines (8 in all)" in issues[5].message


def test_missing_file_error_shows_the_resolved_path_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataFileError) as exc:
        read_qa_file(tmp_path / "nope.jsonl")
    message = only_issue(exc).message
    assert str((tmp_path / "nope.jsonl").resolve()) in message
    assert "fix data.train_file" in message


def test_a_folder_instead_of_a_file_is_explained(tmp_path: Path) -> None:
    with pytest.raises(DataFileError) as exc:
        read_qa_file(tmp_path)
    assert "is a folder" in only_issue(exc).message


def test_check_data_files_accepts_good_files_relative_to_the_config_folder(tmp_path: Path) -> None:
    write_lines(tmp_path / "train.jsonl", [qa(answer=str(i)) for i in range(20)])
    write_lines(tmp_path / "eval.jsonl", [qa()])
    assert check_data_files(config(tmp_path, train_file="train.jsonl", eval_file="eval.jsonl")) == []


def test_check_data_files_reports_both_files(tmp_path: Path) -> None:
    write_lines(tmp_path / "train.jsonl", [qa(), "{}"])
    issues = check_data_files(config(tmp_path, train_file="train.jsonl", eval_file="missing.jsonl"))
    assert [(i.path, i.line) for i in issues] == [("data.train_file", 2), ("data.eval_file", None)]
    assert "data file not found" in issues[1].message


def test_check_data_files_refuses_a_file_too_small_for_hold_out_or_one_batch_per_rank(tmp_path: Path) -> None:
    write_lines(tmp_path / "one.jsonl", [qa()])
    issues = check_data_files(config(tmp_path, train_file="one.jsonl"))
    assert [i.path for i in issues] == ["data.eval_fraction"]

    write_lines(tmp_path / "few.jsonl", [qa()] * 5)
    cfg = config(tmp_path, train_file="few.jsonl")
    cfg.training.micro_batch_size = 4  # 5 examples, 1 held out, 4 left: exactly one micro-batch
    assert check_data_files(cfg) == []
    cfg.cluster.tasks_per_node = 2
    assert [i.path for i in check_data_files(cfg)] == ["training.micro_batch_size"]


def test_shipped_sample_file_is_valid(tmp_path: Path) -> None:
    sample = Path(__file__).resolve().parent.parent / "configs" / "data" / "qa_sample.jsonl"
    assert check_data_files(config(tmp_path, train_file=str(sample))) == []
