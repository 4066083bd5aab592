"""How the job's processes start: the environment sbatch.sh exports by default and the collective
timeout. One definition for the rendered script (orchestrator/render/files.py) and the worker
(worker/dist.py), like spec/deepspeed.py for ds_config.json. Standard library only.

On GPUs (`cluster.gpus_per_node` > 0) the job runs one rank per GPU over NCCL:
- `TORCH_NCCL_ASYNC_ERROR_HANDLING=1`: a failed or timed-out collective aborts the communicator
  and ends the rank (torch's watchdog), so the job fails and is requeued instead of hanging;
- `MOE_ORCH_COLLECTIVE_TIMEOUT_S`: the process group's timeout, which the worker passes to
  `init_process_group` (`collective_timeout_s`: twice `cluster.stall_timeout_s`, so the stall
  watchdog, which writes every thread's stack and ends the attempt as hung, acts first);
- `NCCL_DEBUG=WARN`: NCCL says why it failed in the rank's .err log;
- `OMP_NUM_THREADS`: `training.num_threads` or `cluster.cpus_per_task`, so eight ranks of a node do
  not each start a thread per core.
Site settings (`NCCL_SOCKET_IFNAME`, `NCCL_IB_HCA`, ...) go in `cluster.env`, which overrides
every default here.
"""

from __future__ import annotations

from collections.abc import Mapping

from orchestrator.errors import ConfigError, ConfigIssue
from orchestrator.spec.schema import RunConfig

COLLECTIVE_TIMEOUT_ENV = "MOE_ORCH_COLLECTIVE_TIMEOUT_S"
"""The variable sbatch.sh exports with the collective timeout in seconds (worker/dist.py reads it)."""

DEFAULT_COLLECTIVE_TIMEOUT_S = 3600
"""Without `cluster.stall_timeout_s`: twice the derived stall limit before the first step (1,800 s,
which covers loading a 7B model before the first collective)."""


def collective_timeout_s(cfg: RunConfig) -> int:
    """Seconds a rank waits in one collective before NCCL aborts it: twice `cluster.stall_timeout_s`
    when set (the stall watchdog acts first and leaves stacks behind), else 3,600."""
    stall = cfg.cluster.stall_timeout_s
    if stall is None:
        return DEFAULT_COLLECTIVE_TIMEOUT_S
    return max(1, round(2 * stall))


def collective_timeout_from_env(env: Mapping[str, str], cfg: RunConfig) -> int:
    """`MOE_ORCH_COLLECTIVE_TIMEOUT_S` when the job script (or `cluster.env`) set it, else the
    config's `collective_timeout_s`: the same number either way, as for MASTER_PORT."""
    value = env.get(COLLECTIVE_TIMEOUT_ENV, "").strip()
    if not value:
        return collective_timeout_s(cfg)
    try:
        seconds = int(float(value))
    except ValueError:
        seconds = 0
    if seconds <= 0:
        raise ConfigError(
            [
                ConfigIssue(
                    f"cluster.env.{COLLECTIVE_TIMEOUT_ENV}",
                    f"{value!r} is not a positive number of seconds; leave it out to derive it from "
                    "cluster.stall_timeout_s",
                )
            ]
        )
    return seconds


def job_env_defaults(cfg: RunConfig) -> dict[str, str]:
    """The variables sbatch.sh exports before `cluster.env` (a key there replaces the default)."""
    threads = str(cfg.training.num_threads or cfg.cluster.cpus_per_task)
    if cfg.cpu_only:
        return {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": threads}
    return {
        "OMP_NUM_THREADS": threads,
        "NCCL_DEBUG": "WARN",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        COLLECTIVE_TIMEOUT_ENV: str(collective_timeout_s(cfg)),
    }
