"""A config or data file that cannot be read is one line naming the file (and line), exit code 2.

`validate`, `submit --dry-run` and `render` all read a config through
`orchestrator.spec.loading.load_config`, so every way a read can fail (not UTF-8, a folder, no
permission, empty, not YAML, not a mapping) is checked through all three commands.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from orchestrator.cli import app
from orchestrator.errors import ConfigFileError
from orchestrator.spec.loading import load_config, load_resolved

runner = CliRunner()

COMMANDS: dict[str, Callable[[Path, Path], list[str]]] = {
    "validate": lambda config, tmp: ["validate", str(config)],
    "submit --dry-run": lambda config, tmp: ["submit", "--dry-run", str(config), "--home", str(tmp / "runs")],
    "render": lambda config, tmp: ["render", str(config), "--out", str(tmp / "rendered")],
}


def one_error_line(result: Result) -> str:
    """The single `error: ...` line of a failed command (exit 2, no traceback)."""
    assert "Traceback" not in result.output
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0][len("error: ") :]


def refuse_to_open(monkeypatch: pytest.MonkeyPatch, target: Path) -> None:
    """Make opening `target` fail as it does for a file the user may not read (tests run as root)."""
    real_open = Path.open

    def fake_open(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self.absolute() == target.absolute():
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", fake_open)


# (id, file content, whether the message names a line, fragment of the message)
UNREADABLE: list[tuple[str, bytes, int | None, str]] = [
    (
        "not UTF-8",
        b"# a run\nname: caf\xe9\n",
        2,
        "not UTF-8 text (byte 0xe9 at column 10); save the file as UTF-8",
    ),
    (
        "UTF-16 from a Windows editor",
        "name: x\n".encode("utf-16"),
        1,
        "not UTF-8 text (byte 0xff at column 1)",
    ),
    ("empty", b"", None, "the config file is empty"),
    ("only comments", b"# name: x\n\n", None, "the config file is empty"),
    ("a list at the top", b"- name: x\n", 1, "must be a YAML mapping (key: value lines), not a list"),
    (
        "a scalar at the top",
        b"just some text\n",
        1,
        "must be a YAML mapping (key: value lines), not a string",
    ),
    ("a control character", b"name: x\nmodel:\x00\n", 2, "not valid YAML: unacceptable character #x0000"),
    ("broken YAML", b"name: x\nmodel: [tiny\n", 3, "not valid YAML"),
]


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize(
    ("content", "line", "fragment"), [c[1:] for c in UNREADABLE], ids=[c[0] for c in UNREADABLE]
)
def test_a_config_that_cannot_be_read_is_one_line_with_file_and_line_and_exit_2(
    tmp_path: Path, command: str, content: bytes, line: int | None, fragment: str
) -> None:
    config = tmp_path / "run.yaml"
    config.write_bytes(content)
    message = one_error_line(runner.invoke(app, COMMANDS[command](config, tmp_path)))
    where = f"{config}:{line}: " if line else f"{config}: "
    assert message.startswith(where), message
    assert fragment in message


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_folder_given_as_the_config_is_named_as_a_folder(tmp_path: Path, command: str) -> None:
    folder = tmp_path / "run.yaml"
    folder.mkdir()
    message = one_error_line(runner.invoke(app, COMMANDS[command](folder, tmp_path)))
    assert message.startswith(f"{folder}: ")
    assert "is a folder, not a config file" in message


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_config_without_read_permission_is_one_line_and_exit_2(
    tmp_path: Path, command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("name: x\n")
    refuse_to_open(monkeypatch, config)
    message = one_error_line(runner.invoke(app, COMMANDS[command](config, tmp_path)))
    assert message.startswith(f"{config}: cannot read the config: permission denied")


def test_a_config_without_read_permission_on_disk_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("name: x\n")
    config.chmod(0)
    if os.access(config, os.R_OK):
        pytest.skip("running as root: a mode-000 file is still readable")
    with pytest.raises(ConfigFileError, match="permission denied"):
        load_config(config)


def test_every_read_failure_is_a_config_file_error_naming_file_and_line(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_bytes(b"name: x\nmodel:\n  name_or_path: \xff\n")
    with pytest.raises(ConfigFileError) as info:
        load_config(config)
    (issue,) = info.value.issues
    assert (issue.file, issue.line) == (str(config), 3)
    assert info.value.exit_code == 2


def test_a_run_yaml_is_read_the_same_way(tmp_path: Path) -> None:
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_bytes(b"")
    with pytest.raises(ConfigFileError, match="the config file is empty"):
        load_resolved(run_yaml)


# --- data files (data.train_file, read by orchestrator/spec/qa_format.py) --------------------------------


def write_config_with_data(tmp_path: Path, data_lines: bytes) -> tuple[Path, Path]:
    qa = tmp_path / "qa.jsonl"
    qa.write_bytes(data_lines)
    config = tmp_path / "run.yaml"
    config.write_text(
        "name: reads\nmodel:\n  name_or_path: tiny\ntraining:\n  precision: fp32\n"
        "data:\n  train_file: qa.jsonl\n  max_seq_length: 64\n  max_target_length: 16\n"
    )
    return config, qa


GOOD_LINE = json.dumps({"question": "What is 1 + 1?", "answer": "2"}).encode() + b"\n"


@pytest.mark.parametrize("command", ["validate", "submit --dry-run"])
def test_a_data_file_that_is_not_utf8_names_file_and_line(tmp_path: Path, command: str) -> None:
    config, qa = write_config_with_data(
        tmp_path, GOOD_LINE * 3 + b'{"question": "caf\xe9?", "answer": "x"}\n' + GOOD_LINE * 20
    )
    message = one_error_line(runner.invoke(app, COMMANDS[command](config, tmp_path)))
    assert message.startswith(f"{qa}:4: data.train_file: not UTF-8 text (byte 0xe9 at column 18)")


def test_a_data_file_without_read_permission_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, qa = write_config_with_data(tmp_path, GOOD_LINE * 20)
    refuse_to_open(monkeypatch, qa)
    message = one_error_line(runner.invoke(app, ["validate", str(config)]))
    assert message.startswith(f"{qa}: data.train_file: cannot read data file: permission denied")
