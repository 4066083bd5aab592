"""The configs shipped with moe-orch (`moe-orch configs`): names and what each one is for."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from orchestrator.spec.loading import builtin_configs_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShippedConfig:
    name: str  # what the CLI accepts in place of a path, e.g. `tiny-cpu`
    path: Path
    description: str  # the file's first comment line


def _description(path: Path) -> str:
    try:
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith("#"):
                return stripped.lstrip("#").strip()
            if stripped:
                break
    except OSError as exc:
        logger.debug("cannot read %s: %s", path, exc)
    return ""


def shipped_configs() -> list[ShippedConfig]:
    """Every shipped config, by name."""
    return [
        ShippedConfig(path.stem, path, _description(path))
        for path in sorted(builtin_configs_dir().glob("*.yaml"))
    ]
