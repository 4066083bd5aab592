"""Exit codes of the worker (`python -m worker`, `worker.__main__.main`), read by the job function.

- `EXIT_COMPLETED` 0: training reached its last step (final checkpoint saved).
- `EXIT_FAILED` 1: an error (the traceback is on that rank's stderr; rank 0 writes an `exit` event
  with reason `failed` when it can), including a save that failed after a signal.
- `EXIT_USAGE` 2: bad arguments or config (nothing was trained).
- `EXIT_HUNG` 76: the stall watchdog ended the rank (worker.hang): training made no progress within
  `cluster.stall_timeout_s`; the `hang` and `exit` events say why and whether the job was requeued.
- `EXIT_STOPPED` 75 (EX_TEMPFAIL, "try again"): stopped on a signal after a durable checkpoint;
  the job was requeued (or, outside SLURM, can be resumed by running it again). Not an error:
  `orchestrator.lifecycle.job.run_worker` returns it to submitit as a success.
"""

from __future__ import annotations

from typing import Final

EXIT_COMPLETED: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_STOPPED: Final = 75
EXIT_HUNG: Final = 76
