"""SLURM, both sides (like submitit's `slurm/`).

Login node:
- `backend.py`: `SlurmBackend` (the `Backend` interface): the submitit executor with the rendered
  `#SBATCH` block, submitit's parameters, one look at many runs' jobs per poll, cancel, bad nodes;
- `scheduler.py`: squeue/sacct/sinfo/scancel calls (one batched call each per poll) and parsers;
- `attempts.py`: attempts closed or updated from a squeue/sacct snapshot;
- `task_reports.py`: srun's reports of the ranks that ended badly, and a failed attempt's error.

Inside the job (every rank; standard library only):
- `injob.py`: `SlurmRunningJob` (the `RunningJob` interface): the time limit, `scontrol requeue`,
  whether a SIGTERM was `scancel`; SLURM's time formats.

Nothing is imported here, so the worker's `import orchestrator.backends.slurm.injob` stays light.
"""
