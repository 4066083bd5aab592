"""Reading a run config from YAML: `--set` overrides, and errors that name field, file and line."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from orchestrator.config import RunConfig
from orchestrator.errors import ConfigError, ConfigIssue

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


def parse_yaml(text: str, file: str) -> tuple[dict[str, Any], dict[Loc, int]]:
    """The YAML mapping and the line of every key in it."""
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigIssue("", f"not valid YAML: {problem}", file, line)]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue("", "the config must be a YAML mapping (key: value lines)", file, 1)])
    lines: dict[Loc, int] = {}
    if node is not None:
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
    here = Path(__file__).resolve().parent
    for candidate in (here / "_data" / "configs", here.parent / "configs"):
        if candidate.is_dir():
            return candidate
    return here.parent / "configs"


def resolve_config_path(spec: str | Path) -> Path:
    """A config path, or the name of a shipped config (`tiny-cpu`), so the CLI works anywhere."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    for candidate in (builtin_configs_dir() / f"{spec}.yaml", builtin_configs_dir() / str(spec)):
        if candidate.is_file():
            return candidate
    shipped = sorted(p.stem for p in builtin_configs_dir().glob("*.yaml"))
    raise ConfigError(
        [ConfigIssue("", f"config file not found: {spec} (shipped configs: {', '.join(shipped)})", str(spec))]
    )


def load_config(spec: str | Path, overrides: Iterable[str] = ()) -> RunConfig:
    """Read, override and validate a config file. Relative data paths resolve against its folder."""
    path = resolve_config_path(spec)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([ConfigIssue("", f"cannot read config: {exc.strerror}", str(path))]) from None
    data, lines = parse_yaml(text, str(path))
    data = apply_overrides(data, overrides)
    return validate_data(data, file=str(path), lines=lines, base_dir=path.resolve().parent)


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (run.yaml): every field, defaults included."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=False)


def load_resolved(path: str | Path) -> RunConfig:
    """Load a run.yaml written by `dump_config` (paths already absolute)."""
    p = Path(path)
    data, lines = parse_yaml(p.read_text(), str(p))
    return validate_data(data, file=str(p), lines=lines, base_dir=p.resolve().parent)
