"""The job function's old import path: jobs already queued pickled `orchestrator.job.run_worker`
by reference (submitit), so it must keep importing. The code is in orchestrator.lifecycle.job."""

from orchestrator.lifecycle.job import run_worker as run_worker
