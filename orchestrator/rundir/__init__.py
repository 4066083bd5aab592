"""The run directory on disk, one owner module per file (docs/design.md): `runs` (run.json and the
attempt key), `reports` (events.jsonl, progress.json, metrics.jsonl), `checkpoints` (checkpoint
folders, manifest.json, latest), `exitcodes` (the worker's exit codes) and `atomic` (durable writes).
Shared by the orchestrator and the worker: no torch, jinja2, typer or rich here."""
