"""Every validation rule: one config it accepts and one it refuses, the error naming field and file:line.

Each case changes one field of a valid tiny config written to a YAML file, then runs the same path as
`moe-orch validate` (load, schema and cross-field rules, data files, sbatch values).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.errors import ConfigError, DataFileError
from orchestrator.lifecycle.validate import validate_file

BASE: dict[str, Any] = {
    "name": "rules",
    "cluster": {"executor": "local", "nodes": 1, "tasks_per_node": 2},
    "model": {"name_or_path": "tiny"},
    "moe": {"num_experts": 4, "ep_size": 2},
    "data": {"train_file": "qa.jsonl", "max_seq_length": 64, "max_target_length": 16},
    "training": {"precision": "fp32", "max_steps": 5, "micro_batch_size": 2},
}

GPU_7B: dict[str, Any] = {
    "model.name_or_path": "mosaicml/mpt-7b",
    "cluster.gpus_per_node": 8,
    "cluster.tasks_per_node": 8,
    "training.precision": "bf16",
    "moe.num_experts": 8,
    "moe.ep_size": 8,
}


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[last] = value


def line_of(text: str, dotted: str) -> int:
    """1-based line of `a.b.c` in block YAML (found by indentation, independently of the loader)."""
    parts = dotted.split(".")
    depth = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("  " * depth + parts[depth] + ":"):
            if depth == len(parts) - 1:
                return number
            depth += 1
    raise AssertionError(f"{dotted} not in the YAML")


def write_config(tmp_path: Path, changes: dict[str, Any]) -> tuple[Path, str]:
    data = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        _set(data, dotted, value)
    text = yaml.safe_dump(data, sort_keys=False)
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path, text


@pytest.fixture(autouse=True)
def qa_file(tmp_path: Path) -> Path:
    lines = [json.dumps({"question": f"What is {i} + {i}?", "answer": str(2 * i)}) for i in range(40)]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


# (id, field whose line the error must name, accepted change, refused change, message fragment)
RULES: list[tuple[str, str, dict[str, Any], dict[str, Any], str]] = [
    (
        "unknown key with did-you-mean",
        "training.learning_rat",
        {"training.learning_rate": 1e-3},
        {"training.learning_rat": 1e-3},
        "unknown key; did you mean `learning_rate`?",
    ),
    ("wrong type", "cluster.nodes", {"cluster.nodes": 1}, {"cluster.nodes": "two"}, "valid integer"),
    (
        "range",
        "training.micro_batch_size",
        {"training.micro_batch_size": 1},
        {"training.micro_batch_size": 0},
        "greater than or equal to 1 (got 0)",
    ),
    ("choice", "training.precision", {"training.precision": "fp32"}, {"training.precision": "fp8"}, "'fp32'"),
    (
        "num_experts divisible by ep_size",
        "moe.ep_size",
        {"moe.num_experts": 6, "moe.ep_size": 2},
        {"moe.num_experts": 6, "moe.ep_size": 4},
        "num_experts 6 is not divisible by ep_size 4",
    ),
    (
        "world size divisible by ep_size",
        "moe.ep_size",
        {"moe.num_experts": 4, "moe.ep_size": 2},
        {"moe.num_experts": 4, "moe.ep_size": 4},
        "world size 2",
    ),
    (
        "zero_stage 3 refused with MoE",
        "training.zero_stage",
        {"training.zero_stage": 3, "moe.enabled": False},
        {"training.zero_stage": 3},
        "use zero_stage: 2",
    ),
    (
        "max_target_length below max_seq_length",
        "data.max_target_length",
        {"data.max_target_length": 63},
        {"data.max_target_length": 64},
        "must be less than max_seq_length 64",
    ),
    (
        "bf16 on CPU-only",
        "training.precision",
        {"training.precision": "fp32"},
        {"training.precision": "bf16"},
        "fp32",
    ),
    (
        "fp16 on CPU-only",
        "training.precision",
        {"training.precision": "fp32"},
        {"training.precision": "fp16"},
        "GPUs",
    ),
    (
        "memory over gpu_mem_gb",
        "cluster.gpu_mem_gb",
        {**GPU_7B, "cluster.gpu_mem_gb": 141},
        {**GPU_7B, "cluster.gpu_mem_gb": 80},
        "GB per GPU but gpu_mem_gb is 80",
    ),
    (
        "local executor runs one node",
        "cluster.nodes",
        {"cluster.executor": "slurm", "cluster.nodes": 2, "cluster.tasks_per_node": 1},
        {"cluster.executor": "local", "cluster.nodes": 2, "cluster.tasks_per_node": 1},
        "use executor: slurm or nodes: 1",
    ),
    (
        "tasks_per_node at most gpus_per_node",
        "cluster.tasks_per_node",
        {"cluster.gpus_per_node": 2, "cluster.tasks_per_node": 2, "training.precision": "bf16"},
        {"cluster.gpus_per_node": 1, "cluster.tasks_per_node": 2, "training.precision": "bf16"},
        "set tasks_per_node: 1",
    ),
    ("run name characters", "name", {"name": "ok.name-1_x"}, {"name": "my run!"}, "e.g. mpt7b-moe-4x8"),
    (
        "tiny heads divide d_model",
        "model.tiny.n_heads",
        {"model.tiny.n_heads": 4},
        {"model.tiny.n_heads": 3},
        "do not divide d_model",
    ),
    (
        "MoE layer indices exist",
        "moe.layers",
        {"moe.layers": [0, 1]},
        {"moe.layers": [0, 5]},
        "[5] do not exist",
    ),
    (
        "env names",
        "cluster.env",
        {"cluster.env": {"GOOD_NAME": "1"}},
        {"cluster.env": {"BAD-NAME": "1"}},
        "BAD-NAME",
    ),
    (
        "sbatch_extra key form",
        "cluster.sbatch_extra",
        {"cluster.sbatch_extra": {"mail-user": "a@b.c"}},
        {"cluster.sbatch_extra": {"--mail-user": "a@b.c"}},
        "no dashes in front",
    ),
    (
        "prompt template needs {question}",
        "data.prompt_template",
        {"data.prompt_template": "Q: {question}\nA:"},
        {"data.prompt_template": "Q: ?\nA:"},
        "must contain {question}",
    ),
]


@pytest.mark.parametrize(
    ("field", "good", "bad", "fragment"), [r[1:] for r in RULES], ids=[r[0] for r in RULES]
)
def test_rule_accepts_the_good_value_and_refuses_the_bad_one_at_its_line(
    tmp_path: Path, field: str, good: dict[str, Any], bad: dict[str, Any], fragment: str
) -> None:
    good_path, _ = write_config(tmp_path, good)
    summary = validate_file(good_path)
    assert summary.name == yaml.safe_load(good_path.read_text())["name"]

    bad_path, text = write_config(tmp_path, bad)
    with pytest.raises(ConfigError) as info:
        validate_file(bad_path)
    issues = info.value.issues
    assert len(issues) == 1, issues
    issue = issues[0]
    assert issue.path == field
    assert fragment in issue.message
    assert issue.file == str(bad_path)
    assert issue.line == line_of(text, field)
    assert str(issue).startswith(f"{bad_path}:{issue.line}: {field}")


def test_sbatch_extra_cannot_override_an_option_moe_orch_sets(tmp_path: Path) -> None:
    path, _ = write_config(tmp_path, {"cluster.executor": "slurm", "cluster.sbatch_extra": {"nodes": "3"}})
    with pytest.raises(ConfigError, match=r"set cluster\.nodes instead") as info:
        validate_file(path)
    assert info.value.issues[0].path == "cluster.sbatch_extra.nodes"


def test_a_newline_in_a_slurm_value_is_refused_before_it_reaches_sbatch(tmp_path: Path) -> None:
    path, _ = write_config(
        tmp_path, {"cluster.executor": "slurm", "cluster.partition": "debug\ntouch /tmp/x"}
    )
    with pytest.raises(ConfigError, match="newline") as info:
        validate_file(path)
    assert info.value.issues[0].path == "cluster.partition"


def test_set_overrides_are_validated_like_the_file(tmp_path: Path) -> None:
    path, _ = write_config(tmp_path, {})
    assert validate_file(path, ["moe.top_k=2"]).params is not None
    with pytest.raises(ConfigError, match="did you mean `top_k`"):
        validate_file(path, ["moe.topk=2"])


def test_missing_data_file_names_the_field_and_resolved_path(tmp_path: Path) -> None:
    good, _ = write_config(tmp_path, {"data.train_file": "qa.jsonl"})
    assert validate_file(good).world_size == 2
    bad, _ = write_config(tmp_path, {"data.train_file": "missing.jsonl"})
    with pytest.raises(DataFileError) as info:
        validate_file(bad)
    (issue,) = info.value.issues
    assert issue.path == "data.train_file"
    assert str(tmp_path / "missing.jsonl") in issue.message


def test_bad_data_line_is_reported_at_file_and_line(tmp_path: Path, qa_file: Path) -> None:
    lines = qa_file.read_text().splitlines()
    lines[2] = '{"question": "no answer here"}'
    qa_file.write_text("\n".join(lines) + "\n")
    path, _ = write_config(tmp_path, {})
    with pytest.raises(DataFileError) as info:
        validate_file(path)
    (issue,) = info.value.issues
    assert (issue.file, issue.line) == (str(qa_file), 3)
    assert str(issue).startswith(f"{qa_file}:3: data.train_file")
    assert "missing 'answer'" in issue.message


def test_data_checks_can_be_skipped_for_a_config_whose_data_lives_on_the_cluster(tmp_path: Path) -> None:
    path, _ = write_config(tmp_path, {"data.train_file": "/cluster/only/data.jsonl"})
    assert validate_file(path, check_data=False).world_size == 2


# Strings that must hold a value: "" or only whitespace is refused at the field's line.
REQUIRED_STRINGS = ["name", "model.name_or_path", "data.train_file", "data.prompt_template"]
# Strings that may be unset: unset means leaving the key out (or null), never "".
OPTIONAL_STRINGS = [
    "cluster.partition",
    "cluster.account",
    "cluster.qos",
    "cluster.constraint",
    "cluster.python",
    "model.revision",
    "data.eval_file",
    "data.tokenizer",
]


@pytest.mark.parametrize("blank", ["", "  \t"], ids=["empty", "blank"])
@pytest.mark.parametrize("field", REQUIRED_STRINGS)
def test_an_empty_or_blank_required_string_is_refused_at_its_line(
    tmp_path: Path, field: str, blank: str
) -> None:
    path, text = write_config(tmp_path, {field: blank})
    with pytest.raises(ConfigError) as info:
        validate_file(path)
    (issue,) = info.value.issues
    assert (issue.path, issue.file, issue.line) == (field, str(path), line_of(text, field))
    assert issue.message == f"must not be empty or blank (got {blank!r})"
    assert str(issue).startswith(f"{path}:{issue.line}: {field}: must not be empty")


@pytest.mark.parametrize("blank", ["", " "], ids=["empty", "blank"])
@pytest.mark.parametrize("field", OPTIONAL_STRINGS)
def test_an_optional_string_set_to_empty_is_refused_with_how_to_leave_it_unset(
    tmp_path: Path, field: str, blank: str
) -> None:
    path, text = write_config(tmp_path, {field: blank})
    with pytest.raises(ConfigError) as info:
        validate_file(path)
    (issue,) = info.value.issues
    assert (issue.path, issue.line) == (field, line_of(text, field))
    assert "must not be empty or blank; leave the key out (or write null) to leave it unset" in issue.message


def test_an_optional_string_set_to_null_is_unset(tmp_path: Path) -> None:
    path, _ = write_config(tmp_path, dict.fromkeys(OPTIONAL_STRINGS))
    assert validate_file(path).name == "rules"


def test_set_with_an_empty_value_is_refused_like_the_file(tmp_path: Path) -> None:
    path, _ = write_config(tmp_path, {})
    with pytest.raises(ConfigError, match=r"model\.name_or_path: must not be empty"):
        validate_file(path, ["model.name_or_path="])
