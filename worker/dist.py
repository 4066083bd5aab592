"""Who am I in the job: rank, world size and rendezvous, from whichever launcher started us.

Sources, in this order (the first that applies wins):

1. `torchrun` / `accelerate launch` (DeepSpeed YAML) / the `deepspeed` launcher: `RANK` and
   `WORLD_SIZE` are set, with `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`. `ACCELERATE_*` is ignored.
2. submitit (`SUBMITIT_EXECUTOR` is `local` or `slurm`): neither executor sets `RANK` & co., so
   they come from `SUBMITIT_LOCAL_*` (local) or `SLURM_*` (slurm), as `submitit.JobEnvironment`
   reads them.
3. `srun` without submitit: `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, `SLURM_JOB_NODELIST`.
4. Otherwise one process.

The port, when the launcher did not choose one, is `cluster.master_port` or
`20000 + job_id % 20000`: the same formula the rendered sbatch.sh uses, so two jobs that share a
node never collide and a requeued job (same id) binds the same port again.

`resolve_dist` is a pure function of the environment (unit-tested with literal values);
`init_distributed` applies it and starts DeepSpeed's process group.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestrator.backends.nodelist import expand_nodelist
from orchestrator.backends.slurm.injob import slurm_job_id
from orchestrator.rundir.runs import attempt_key

logger = logging.getLogger(__name__)

PORT_BASE = 20000
"""Derived ports are `PORT_BASE + job_id % PORT_BASE` (20000..39999)."""


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # torchrun | submitit-local | submitit-slurm | srun | single
    job_id: str
    restart_count: int = 0
    nodes: list[str] = field(default_factory=list)
    slurm_job: bool = False  # inside a SLURM allocation (SLURM_JOB_ID set): requeue is possible

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def attempt_key(self) -> str:
        """`<job_id>.<SLURM_RESTART_COUNT or 0>`: one key per attempt of a run (docs/design.md)."""
        return attempt_key(self.job_id, self.restart_count)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (`n[1-2]` -> `n1`); the rendezvous host."""
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise ValueError(f"empty SLURM node list: {nodelist!r}")
    return hosts[0]


def derived_port(job_id: str, master_port: int | None = None) -> int:
    """`master_port` if set, else `20000 + job_id % 20000` (digits of the job id; `123_4` -> 123)."""
    if master_port is not None:
        return master_port
    digits = re.match(r"\d+", job_id)
    if digits is None:
        raise ValueError(f"cannot derive a port from job id {job_id!r}; set cluster.master_port")
    return PORT_BASE + int(digits.group(0)) % PORT_BASE


def _env_port(env: Mapping[str, str], job_id: str, master_port: int | None) -> int:
    """`MASTER_PORT` when the launcher or sbatch.sh set it, else the derived port."""
    value = env.get("MASTER_PORT")
    return int(value) if value else derived_port(job_id, master_port)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def resolve_dist(env: Mapping[str, str], *, master_port: int | None = None) -> DistInfo:
    """Rank, world and rendezvous from the environment (see the module docstring for the order)."""
    restart = int(env.get("SLURM_RESTART_COUNT", "0") or 0)
    slurm_job = "SLURM_JOB_ID" in env
    if "RANK" in env and "WORLD_SIZE" in env:
        # torchrun / accelerate / deepspeed launcher: the launcher owns the rendezvous.
        job_id = env.get("SLURM_JOB_ID") or str(os.getppid())
        port = _env_port(env, job_id, master_port)
        nodelist = env.get("SLURM_JOB_NODELIST")
        nodes = expand_nodelist(nodelist) if nodelist else [socket.gethostname()]
        return DistInfo(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=port,
            source="torchrun",
            job_id=job_id,
            restart_count=restart,
            nodes=nodes,
            slurm_job=slurm_job,
        )
    executor = env.get("SUBMITIT_EXECUTOR")
    if executor == "local":
        job_id = env["SUBMITIT_LOCAL_JOB_ID"]
        return DistInfo(
            rank=int(env["SUBMITIT_LOCAL_GLOBALID"]),
            world_size=int(env["SUBMITIT_LOCAL_NTASKS"]),
            local_rank=int(env["SUBMITIT_LOCAL_LOCALID"]),
            master_addr="127.0.0.1",
            master_port=derived_port(job_id, master_port),
            source="submitit-local",
            job_id=job_id,
            restart_count=0,
            nodes=[socket.gethostname()],
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job_id = slurm_job_id(env) or "0"  # `<array>_<task>` for a job array's task
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        nodes = expand_nodelist(nodelist)
        return DistInfo(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            # NOTE: sbatch.sh exports the same address and port; an explicit MASTER_* wins.
            master_addr=env.get("MASTER_ADDR") or nodes[0],
            # NOTE: SLURM_JOB_ID is unique per array task: two tasks sharing a node never collide.
            master_port=_env_port(env, env.get("SLURM_JOB_ID", job_id), master_port),
            source="submitit-slurm" if executor == "slurm" else "srun",
            job_id=job_id,
            restart_count=restart,
            nodes=nodes,
            slurm_job=True,
        )
    job_id = env.get("SLURM_JOB_ID") or str(os.getpid())
    return DistInfo(
        rank=0,
        world_size=1,
        local_rank=0,
        master_addr="127.0.0.1",
        master_port=master_port if master_port is not None else _free_port(),
        source="single",
        job_id=job_id,
        restart_count=restart,
        nodes=[socket.gethostname()],
        slurm_job=slurm_job,
    )


def export_env(info: DistInfo, environ: Any = None) -> None:
    """Set the five variables `deepspeed.init_distributed` needs (it tries MPI when one is missing)."""
    target = os.environ if environ is None else environ
    target["RANK"] = str(info.rank)
    target["WORLD_SIZE"] = str(info.world_size)
    target["LOCAL_RANK"] = str(info.local_rank)
    target["MASTER_ADDR"] = info.master_addr
    target["MASTER_PORT"] = str(info.master_port)


def skip_shm_build() -> None:
    """Skip DeepSpeed's 55 s `deepspeed_shm_comm` JIT build on CPU (training never uses it).

    NOTE: `import deepspeed.comm.torch as m` would bind torch itself (deepspeed.comm exports
    `torch`), hence sys.modules (docs/deepspeed-cpu.md, "The shm build").
    """
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # type: ignore[attr-defined]


def gpu_device_index(local_rank: int, visible: int) -> int:
    """The CUDA device a rank binds: local rank r -> cuda:r when the rank sees every GPU of its node
    (sbatch.sh's `srun --gpu-bind=none`, torchrun); cuda:0 when the launcher gave each task its own
    GPU (one visible device, e.g. a site's `srun --gpus-per-task=1`)."""
    if visible == 1:
        return 0
    if 0 <= local_rank < visible:
        return local_rank
    raise RuntimeError(
        f"local rank {local_rank} has no GPU: this process sees {visible} GPU(s) "
        "(CUDA_VISIBLE_DEVICES); start at most one rank per GPU (cluster.tasks_per_node <= gpus_per_node)"
    )


PROCESS_GROUP_BACKEND_GPU = "cpu:gloo,cuda:nccl"
"""NCCL for CUDA tensors (DeepSpeed's gradients and all_to_all), gloo for the CPU tensors of the
worker's own small collectives (step totals, routing statistics, checkpoint verdicts), which NCCL
cannot carry."""


def init_distributed(
    info: DistInfo, *, num_threads: int, use_gpu: bool, timeout_s: int | None = None
) -> None:
    """Start the process group for `info`: gloo on CPU; on GPU, NCCL (and gloo for CPU tensors) with
    this rank bound to its GPU and collectives timing out after `timeout_s`
    (orchestrator/spec/launch.py; None: DeepSpeed's default)."""
    from datetime import timedelta

    import torch

    export_env(info)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        # NOTE: a shared JIT cache gets rebuilt when another build variant overwrites it.
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(
            tempfile.gettempdir(), f"moe-orch-torch-ext-{os.getuid()}"
        )
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(num_threads)
    import deepspeed

    if not use_gpu:
        skip_shm_build()
    else:
        torch.cuda.set_device(gpu_device_index(info.local_rank, torch.cuda.device_count()))
    kwargs: dict[str, Any] = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    deepspeed.init_distributed(dist_backend=PROCESS_GROUP_BACKEND_GPU if use_gpu else "gloo", **kwargs)
    logger.debug(
        "rank %d/%d (local %d) via %s, rendezvous %s:%d",
        info.rank, info.world_size, info.local_rank, info.source, info.master_addr, info.master_port,
    )
