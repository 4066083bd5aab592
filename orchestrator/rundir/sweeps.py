"""The sweep folder on disk: `<home>/<sweep-id>/sweep.json` and one run directory per element.

A sweep is a grid of config values (`moe-orch sweep`); each element of the cartesian product is a
full run of its own (run.json, run.yaml, events, checkpoints) in `<home>/<sweep-id>/<run-id>/`,
and `<home>/<sweep-id>/elements/<k>` is a symlink to element k's run directory: the job array's
paths name the element by its array index (`%a`), and `elements/%a/logs` is that run's `logs/`.

`sweep.json` (written once at submission, then only to record the array job) holds the grid, the
elements (index, run id, values) and the array job id. This module is its one reader and writer;
the run directories are `runs.py`'s.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import RunNotFoundError
from orchestrator.rundir.atomic import atomic_write_text

SWEEP_FILE = "sweep.json"
ELEMENTS_DIR = "elements"
"""`elements/<k>` -> `../<run-id>`: element k's run directory, by array index."""
ARRAY_SCRIPT = "array.sh"
"""The job array's batch script (SLURM), as sbatch received it."""


@dataclass
class SweepElement:
    index: int
    run_id: str
    values: dict[str, Any] = field(default_factory=dict)  # grid key -> this element's value

    def label(self) -> str:
        """`training.learning_rate=0.001, moe.top_k=2`."""
        return ", ".join(f"{k}={json.dumps(v)}" for k, v in self.values.items())


@dataclass
class SweepRecord:
    sweep_id: str
    name: str
    created: float
    executor: str
    sweep_dir: str
    config_source: str | None
    grid: dict[str, list[Any]]
    max_parallel: int | None
    elements: list[SweepElement] = field(default_factory=list)
    array_job_id: str | None = None  # SLURM: the array's id (`<id>_<k>` per element)
    schema_version: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        rec = cls(**{k: v for k, v in data.items() if k in names and k != "elements"})
        rec.elements = [SweepElement(**e) for e in data.get("elements", [])]
        return rec

    def element_dir(self, index: int) -> Path:
        return Path(self.sweep_dir) / self.elements[index].run_id


def write_sweep(sweep_dir: Path, record: SweepRecord) -> None:
    atomic_write_text(sweep_dir / SWEEP_FILE, json.dumps(record.to_dict(), indent=2) + "\n", private=True)


def read_sweep(sweep_dir: Path) -> SweepRecord:
    try:
        data = json.loads((sweep_dir / SWEEP_FILE).read_text())
    except FileNotFoundError:
        raise RunNotFoundError(f"{sweep_dir} has no {SWEEP_FILE}: not a moe-orch sweep folder") from None
    return SweepRecord.from_dict(data)


def is_sweep_dir(path: Path) -> bool:
    return (path / SWEEP_FILE).is_file()


def list_sweeps(home: Path) -> list[Path]:
    """Sweep folders under `home`, by name."""
    if not home.is_dir():
        return []
    return sorted(p for p in home.iterdir() if is_sweep_dir(p))


def find_sweep(home: Path, spec: str) -> Path | None:
    """The sweep folder named by `spec` (a sweep id, a unique prefix of one, or its path); None when
    `spec` names no sweep (it may name a run). Several matching sweeps: RunNotFoundError."""
    direct = Path(spec).expanduser()
    if is_sweep_dir(direct):
        return direct.resolve()
    if is_sweep_dir(home / spec):
        return home / spec
    matches = [p for p in list_sweeps(home) if p.name.startswith(spec)]
    if len(matches) > 1:
        names = ", ".join(p.name for p in matches)
        raise RunNotFoundError(f"{spec!r} matches several sweeps ({names}); give more of the sweep id")
    return matches[0] if matches else None


def element_run_dir(home: Path, run_id: str) -> Path | None:
    """The run directory of a sweep element named by its run id (`<home>/<sweep-id>/<run-id>`)."""
    for sweep_dir in list_sweeps(home):
        if (sweep_dir / run_id / "run.json").is_file():
            return sweep_dir / run_id
    return None
