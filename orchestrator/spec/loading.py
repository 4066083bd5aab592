"""Reading a run config from YAML: `--set` overrides, and errors that name field, file and line."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from orchestrator.errors import ConfigError, ConfigFileError, ConfigIssue
from orchestrator.packaged import packaged_dir
from orchestrator.spec.schema import RunConfig

Loc = tuple[str | int, ...]


def _compose_lines(node: yaml.Node, loc: Loc, lines: dict[Loc, int]) -> None:
    lines[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            lines[(*loc, key)] = key_node.start_mark.line + 1
            _compose_lines(value_node, (*loc, key), lines)
            lines[(*loc, key)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _compose_lines(item, (*loc, i), lines)


def _yaml_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return type(value).__name__


def _yaml_error_issue(exc: yaml.YAMLError, text: str, file: str) -> ConfigIssue:
    """One line for a YAML syntax error, at its line (PyYAML's own text spans several lines)."""
    if isinstance(exc, yaml.reader.ReaderError):
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        problem = f"unacceptable character #x{code:04x} ({exc.reason})"
        return ConfigIssue("", f"not valid YAML: {problem}", file, text.count("\n", 0, exc.position) + 1)
    mark = getattr(exc, "problem_mark", None)
    line = mark.line + 1 if mark is not None else None
    problem = getattr(exc, "problem", None) or str(exc)
    return ConfigIssue("", f"not valid YAML: {' '.join(str(problem).split())}", file, line)


_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_yaml(text: str, file: str) -> tuple[dict[str, Any], dict[Loc, int]]:
    """The YAML mapping and the line of every key in it.

    Raises ConfigFileError for text that is not valid YAML, holds nothing, or is not a mapping.
    """
    # NOTE: one parse for both the node tree (lines) and the data, with libyaml when PyYAML has it:
    # the pure-Python parser, run twice, was ~14 ms of every `validate` (issue 14).
    loader = _LOADER(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        raise ConfigFileError([_yaml_error_issue(exc, text, file)]) from None
    finally:
        loader.dispose()
    if node is None:
        message = "the config file is empty; start from a shipped config (`moe-orch configs` lists them)"
        raise ConfigFileError([ConfigIssue("", message, file)])
    if not isinstance(data, dict):
        message = f"the config must be a YAML mapping (key: value lines), not {_yaml_kind(data)}"
        raise ConfigFileError([ConfigIssue("", message, file, node.start_mark.line + 1)])
    lines: dict[Loc, int] = {}
    _compose_lines(node, (), lines)
    return data, lines


def parse_override(item: str) -> tuple[list[str], Any]:
    """`training.learning_rate=1e-4` -> (["training", "learning_rate"], 1e-4); values are YAML."""
    if "=" not in item:
        message = f"--set {item!r}: expected section.key=value, e.g. training.max_steps=20"
        raise ConfigError([ConfigIssue("", message)])
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError([ConfigIssue("", f"--set {item!r}: the key is empty")])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of `data` with every `--set` applied (unknown keys are caught by validation)."""
    out: dict[str, Any] = _deep_copy(data)
    for item in overrides:
        parts, value = parse_override(item)
        cursor = out
        for part in parts[:-1]:
            nxt = cursor.get(part)
            if not isinstance(nxt, dict):
                nxt = {}
                cursor[part] = nxt
            cursor = nxt
        cursor[parts[-1]] = value
    return out


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _model_at(loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The pydantic section class that holds the field at `loc[:-1]`."""
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        if not isinstance(part, str) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _did_you_mean(loc: Sequence[str | int]) -> str:
    model = _model_at(loc)
    if model is None:
        return ""
    names = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
    if close:
        return f"; did you mean `{close[0]}`?"
    return f"; valid keys: {', '.join(names)}"


def _issue_from_error(err: Mapping[str, Any], file: str | None, lines: dict[Loc, int]) -> ConfigIssue:
    loc: Loc = tuple(err["loc"])
    # pydantic adds the union member's tag to the loc (e.g. "list[...]", "literal[...]"); drop it.
    loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
    ctx = err.get("ctx") or {}
    if err["type"] == "moe_orch_rule":
        path = str(ctx["field"])
        field_loc: Loc = tuple(path.split("."))
        line = _nearest_line(field_loc, lines)
        return ConfigIssue(path, str(ctx["msg"]), file, line)
    path = ".".join(str(p) for p in loc)
    line = _nearest_line(loc, lines)
    if err["type"] == "extra_forbidden":
        return ConfigIssue(path, f"unknown key{_did_you_mean(loc)}", file, line)
    if err["type"] == "missing":
        return ConfigIssue(path, "required field is missing", file, line)
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    given = err.get("input")
    if err["type"] not in ("value_error",) and not isinstance(given, (dict, list)):
        msg = f"{msg} (got {given!r})"
    return ConfigIssue(path, msg, file, line)


def _nearest_line(loc: Loc, lines: dict[Loc, int]) -> int | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines and end > 0:
            return lines[loc[:end]]
    return None


def validate_data(
    data: dict[str, Any],
    *,
    file: str | None = None,
    lines: dict[Loc, int] | None = None,
    base_dir: Path | None = None,
) -> RunConfig:
    """Validate a config mapping; raise ConfigError with every issue located in the file."""
    try:
        return RunConfig.model_validate(data, context={"base_dir": str(base_dir) if base_dir else None})
    except ValidationError as exc:
        issues = [_issue_from_error(e, file, lines or {}) for e in exc.errors()]
        # One line per field: unions report every member's failure for the same field.
        seen: set[str] = set()
        unique = []
        for issue in issues:
            if issue.path not in seen:
                seen.add(issue.path)
                unique.append(issue)
        raise ConfigError(unique) from None


def builtin_configs_dir() -> Path:
    """configs/ shipped with the package (wheel) or beside it (source checkout)."""
    return packaged_dir("configs")


def resolve_config_path(spec: str | Path) -> Path:
    """A config path, or the name of a shipped config (`tiny-cpu`), so the CLI works anywhere."""
    path = Path(spec).expanduser()
    try:
        if path.is_file():
            return path
        is_dir = path.is_dir()
    except PermissionError:
        return path  # read_config_text reports it, naming the file
    for candidate in (builtin_configs_dir() / f"{spec}.yaml", builtin_configs_dir() / str(spec)):
        if candidate.is_file():
            return candidate
    if is_dir:
        message = "is a folder, not a config file; give the .yaml file inside it"
        raise ConfigFileError([ConfigIssue("", message, str(spec))])
    shipped = sorted(p.stem for p in builtin_configs_dir().glob("*.yaml"))
    raise ConfigFileError(
        [ConfigIssue("", f"config file not found: {spec} (shipped configs: {', '.join(shipped)})", str(spec))]
    )


def read_config_text(path: Path) -> str:
    """The text of a config file; ConfigFileError names the file (and line) when it cannot be read.

    Every config is read here: `validate`, `render`, `submit`, the worker and run.yaml.
    """
    try:
        with path.open("rb") as fh:
            raw = fh.read()
    except IsADirectoryError:
        message = "is a folder, not a config file; give the .yaml file inside it"
        raise ConfigFileError([ConfigIssue("", message, str(path))]) from None
    except PermissionError:
        message = f"cannot read the config: permission denied; check its mode and owner (ls -l {path})"
        raise ConfigFileError([ConfigIssue("", message, str(path))]) from None
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise ConfigFileError([ConfigIssue("", f"cannot read the config: {reason}", str(path))]) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = raw.rfind(b"\n", 0, exc.start) + 1
        line = raw.count(b"\n", 0, exc.start) + 1
        message = (
            f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start - line_start + 1}); "
            "save the file as UTF-8"
        )
        raise ConfigFileError([ConfigIssue("", message, str(path), line)]) from None


def load_config(spec: str | Path, overrides: Iterable[str] = ()) -> RunConfig:
    """Read, override and validate a config file. Relative data paths resolve against its folder."""
    path = resolve_config_path(spec)
    data, lines = parse_yaml(read_config_text(path), str(path))
    data = apply_overrides(data, overrides)
    return validate_data(data, file=str(path), lines=lines, base_dir=path.resolve().parent)


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (run.yaml): every field, defaults included."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=False)


def load_resolved(path: str | Path) -> RunConfig:
    """Load a run.yaml written by `dump_config` (paths already absolute)."""
    p = Path(path)
    data, lines = parse_yaml(read_config_text(p), str(p))
    return validate_data(data, file=str(p), lines=lines, base_dir=p.resolve().parent)
