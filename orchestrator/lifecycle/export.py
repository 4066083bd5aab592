"""`moe-orch export`: a run's checkpoint -> a Hugging Face folder (weights, config, modeling code,
tokenizer).

The conversion belongs to the worker (worker/export.py: it needs torch and transformers). This module
is the orchestrator's one way in, and imports it only when called, so that the CLI never loads torch.
"""

from __future__ import annotations

from pathlib import Path


def export_run(run_dir: Path, out_dir: Path | None = None, tag: str | None = None) -> Path:
    """Export the checkpoint `tag` of `run_dir` (default: the newest valid one) to `out_dir` (default:
    `<run_dir>/export`); returns the folder written."""
    # NOTE: imported here: the export needs torch and transformers, which the CLI never loads.
    from worker.export import export_run as export_with_worker

    return export_with_worker(run_dir, out_dir, tag=tag)
