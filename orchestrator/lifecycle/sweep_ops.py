"""The commands on an existing sweep (`lifecycle/sweep.py` plans and submits one): `status SWEEP`,
`cancel SWEEP`, `plot SWEEP`, and the RUN|SWEEP arguments of the per-run commands.

- `resolve`: whether an argument names a run or a sweep; `element_dir` (`logs SWEEP --element K`),
  `element_dirs`, `sweep_run_dirs` (`watch SWEEP`): a sweep's elements as run directories.
- `sweep_status` (`status SWEEP`, also `--json`): every element refreshed in one poll, its grid
  values, state, step, loss, eval loss and goodput, the best element; `status_rows` its table.
  `last_eval_loss` is also what the plain `status` table's sweep row reads (`lifecycle/status.py`).
- `cancel_sweep`: each element that is not final, recorded first; `plot_sweep`: the elements'
  eval loss curves on one axes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orchestrator.errors import NothingToCancelError, RunNotFoundError
from orchestrator.rundir import reports, runs, sweeps


def resolve(home: Path, spec: str) -> tuple[str, Path]:
    """("sweep", folder) or ("run", run directory) for RUN/SWEEP arguments: an exact sweep or run
    name first, then a unique prefix of a run, then of a sweep."""
    direct = Path(spec).expanduser()
    if sweeps.is_sweep_dir(direct) or sweeps.is_sweep_dir(home / spec):
        found = sweeps.find_sweep(home, spec)
        assert found is not None
        return "sweep", found
    try:
        return "run", runs.find_run(home, spec)
    except RunNotFoundError:
        found = sweeps.find_sweep(home, spec)
        if found is None:
            raise
        return "sweep", found


def element_dirs(sweep_dir: Path) -> list[Path]:
    rec = sweeps.read_sweep(sweep_dir)
    return [sweep_dir / e.run_id for e in rec.elements]


def element_dir(sweep_dir: Path, index: int) -> Path:
    rec = sweeps.read_sweep(sweep_dir)
    if not 0 <= index < len(rec.elements):
        raise RunNotFoundError(
            f"sweep {rec.sweep_id} has elements 0..{len(rec.elements) - 1}; --element {index} is not one"
        )
    return sweep_dir / rec.elements[index].run_id


def last_eval_loss(run_dir: Path) -> float | None:
    """The newest `eval_loss` of metrics.jsonl (read from the end: eval lines are few)."""
    path = Path(run_dir) / reports.METRICS
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            chunk = 1 << 16
            pos = size
            tail = b""
            while pos > 0:
                pos = max(0, pos - chunk)
                f.seek(pos)
                tail = f.read(size - pos)
                for line in reversed(tail.splitlines()):
                    if b"eval_loss" in line:
                        try:
                            value = json.loads(line).get("eval_loss")
                        except ValueError:
                            continue
                        if isinstance(value, (int, float)):
                            return float(value)
                if pos == 0:
                    break
    except OSError:
        return None
    return None


def sweep_status(sweep_dir: Path, *, with_goodput: bool = True) -> dict[str, Any]:
    """Every element refreshed (one scheduler query for all): grid values, state, step, loss, eval
    loss, goodput; `best` is the element with the lowest eval loss."""
    from orchestrator.lifecycle.poll import poll
    from orchestrator.redact import redact_values

    rec = sweeps.read_sweep(sweep_dir)
    dirs = [sweep_dir / e.run_id for e in rec.elements]
    views = poll(dirs)
    rows: list[dict[str, Any]] = []
    for element, view in zip(rec.elements, views, strict=True):
        p = view.progress or {}
        cur = view.record.current
        good: float | None = None
        if with_goodput and view.record.attempts:
            from orchestrator.rundir import goodput

            total, _ = goodput.from_run_dir(view.run_dir)
            good = total.to_dict().get("goodput")
        rows.append(
            {
                "index": element.index, "run_id": element.run_id, "values": element.values,
                "state": str(view.record.state), "state_reason": view.record.state_reason,
                "attempts": len(view.record.attempts), "job_id": cur.job_id if cur else None,
                "step": view.step, "total_steps": view.total_steps,
                "loss": p.get("loss") if isinstance(p.get("loss"), (int, float)) else None,
                "eval_loss": last_eval_loss(view.run_dir), "goodput": good, "best": False,
            }
        )  # fmt: skip
    scored = [r for r in rows if r["eval_loss"] is not None]
    best = min(scored, key=lambda r: r["eval_loss"])["index"] if scored else None
    for r in rows:
        r["best"] = r["index"] == best
    out = {
        "sweep_id": rec.sweep_id, "sweep_dir": rec.sweep_dir, "name": rec.name, "grid": rec.grid,
        "max_parallel": rec.max_parallel, "array_job_id": rec.array_job_id, "executor": rec.executor,
        "best": best, "elements": rows,
    }  # fmt: skip
    result: dict[str, Any] = redact_values(out)
    return result


def status_rows(status: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """`status SWEEP` as a table: header, then one row per element (best marked `*`)."""
    keys = list(status["grid"])
    header = ["k", *keys, "run", "state", "step", "loss", "eval loss", "goodput", "best"]
    rows = []
    for r in status["elements"]:
        step = r["step"]
        total = r["total_steps"]
        rows.append(
            [
                str(r["index"]),
                *(json.dumps(r["values"].get(k)) for k in keys),
                r["run_id"],
                r["state"],
                f"{step}/{total}" if step is not None and total else (str(step) if step is not None else "-"),
                f"{r['loss']:.4f}" if r["loss"] is not None else "-",
                f"{r['eval_loss']:.4f}" if r["eval_loss"] is not None else "-",
                f"{r['goodput']:.0%}" if isinstance(r["goodput"], (int, float)) else "-",
                "*" if r["best"] else "",
            ]
        )
    return header, rows


def cancel_sweep(sweep_dir: Path) -> list[str]:
    """Cancel every element that is not final (each recorded first, then its job); one line each."""
    from orchestrator.lifecycle.control import cancel

    lines = []
    for run_dir in element_dirs(sweep_dir):
        try:
            rec = cancel(run_dir)
        except NothingToCancelError as exc:
            lines.append(f"{run_dir.name}: {exc}")
            continue
        job = rec.current.job_id if rec.current else None
        lines.append(f"{rec.run_id}: cancelled" + (f" (job {job})" if job else ""))
    return lines


def plot_sweep(sweep_dir: Path, out: Path) -> Path:
    """The eval loss of every element over steps, on one axes (PNG)."""
    from orchestrator.errors import PlotError

    rec = sweeps.read_sweep(sweep_dir)
    curves = []
    for element in rec.elements:
        points = [
            (int(m["step"]), float(m["eval_loss"]))
            for m in reports.read_metrics(sweep_dir / element.run_id)
            if isinstance(m.get("eval_loss"), (int, float)) and isinstance(m.get("step"), int)
        ]
        if points:
            curves.append((element, sorted(dict(points).items())))
    if not curves:
        raise PlotError(f"sweep {rec.sweep_id} has no eval loss yet; plot it once an element has evaluated")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for element, pts in curves:
        ax.plot(
            [s for s, _ in pts], [v for _, v in pts], marker="o", label=f"{element.index}: {element.label()}"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss")
    ax.set_title(f"sweep {rec.sweep_id}")
    ax.legend(fontsize="small")
    fig.tight_layout()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
    except OSError as exc:
        raise PlotError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return out


def sweep_run_dirs(home: Path, specs: Sequence[str]) -> list[str]:
    """`watch SWEEP ...`: each sweep named in `specs` becomes its elements' run directories."""
    out: list[str] = []
    for spec in specs:
        kind, path = resolve(home, spec)
        out += [str(d) for d in element_dirs(path)] if kind == "sweep" else [spec]
    return out
