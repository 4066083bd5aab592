"""Where the data shipped with moe-orch lives (templates/, configs/): under `orchestrator/_data/`
in the wheel (pyproject's force-include), beside the package in a source checkout."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def packaged_dir(name: str) -> Path:
    """`templates` or `configs`: the wheel's copy when installed, else the checkout's."""
    for candidate in (PACKAGE_DIR / "_data" / name, PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    return PACKAGE_DIR.parent / name
