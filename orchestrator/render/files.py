"""Config in, files out: sbatch.sh, hostfile, ds_config.json, accelerate_config.yaml, run.yaml.

`render` is pure (no environment, no disk writes) so `render`, `submit --dry-run` and the golden
tests see exactly what `submit` sends. `write_rendered` puts the files on disk. `sbatch_options` is
the one ordered list of `#SBATCH` options: the template prints it and `submit` maps it onto
submitit, so what is submitted is what `render` showed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.backends.nodelist import expand_nodelist
from orchestrator.errors import ConfigError, ConfigIssue, MoeOrchError
from orchestrator.packaged import packaged_dir
from orchestrator.spec.deepspeed import deepspeed_config
from orchestrator.spec.launch import job_env_defaults
from orchestrator.spec.loading import dump_config
from orchestrator.spec.schema import RunConfig

if TYPE_CHECKING:
    import jinja2

logger = logging.getLogger(__name__)

RENDERED_FILES = ("sbatch.sh", "hostfile", "ds_config.json", "accelerate_config.yaml", "run.yaml")
DEFAULT_ACCELERATE_PORT = 29500
"""accelerate's own default rendezvous port, used when `cluster.master_port` is unset."""

# Characters that need no escaping in an `#SBATCH` value (sbatch's own parser treats quotes,
# backslashes, `#` and whitespace specially).
_SBATCH_PLAIN = re.compile(r"^[A-Za-z0-9._%/:=@,+-]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# The sbatch options moe-orch sets itself; sbatch_extra may not override them.
_OWN_SBATCH_KEYS = {
    "job-name": "name",
    "nodes": "cluster.nodes",
    "ntasks-per-node": "cluster.tasks_per_node",
    "gpus-per-node": "cluster.gpus_per_node",
    "gpus": "cluster.gpus_per_node",
    "gpus-per-task": "cluster.gpus_per_node",
    "cpus-per-task": "cluster.cpus_per_task",
    "mem": "cluster.mem_gb",
    "time": "cluster.time_min",
    "partition": "cluster.partition",
    "account": "cluster.account",
    "qos": "cluster.qos",
    "constraint": "cluster.constraint",
    "exclude": "cluster.exclude",
    "signal": "cluster.signal_delay_s",
    "requeue": "cluster.requeue",
    "no-requeue": "cluster.requeue",
    "open-mode": "",
    "output": "",
    "error": "",
}


def templates_dir() -> Path:
    """templates/ shipped with the package (wheel) or beside it (source checkout)."""
    return packaged_dir("templates")


def sbatch_quote(value: str) -> str:
    """A value for an `#SBATCH --key=value` line, quoted the way sbatch's own parser unquotes it.

    sbatch reads `#SBATCH` lines itself, not through a shell: whitespace ends a value and `#`
    starts a comment unless inside quotes, and within double quotes a backslash escapes the next
    character (checked against SLURM 22.05: a backslash-escaped space outside quotes is refused).
    A newline cannot be written at all: it would end the comment line and make the rest a shell
    command, so it is refused, as is any other control character.
    """
    if _CONTROL.search(value):
        raise ConfigError(
            [ConfigIssue("", f"{value!r} holds a newline or control character; SLURM cannot take it")]
        )
    if _SBATCH_PLAIN.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _mem(mem_gb: float) -> str:
    # NOTE: SLURM's --mem takes an integer with a unit suffix (K, M, G, T; powers of 1024), so a
    # fractional GB value becomes whole megabytes, rounded up.
    if float(mem_gb).is_integer():
        return f"{int(mem_gb)}G"
    return f"{math.ceil(mem_gb * 1024)}M"


def sbatch_options(cfg: RunConfig, run_dir: Path) -> list[tuple[str, str]]:
    """The job's `#SBATCH` options, in order, as (key, value); value "" is a flag (`--requeue`).

    Values are raw (unquoted): the template escapes them and submit hands them to submitit.
    Raises ConfigError (naming the field) for a value SLURM cannot take, e.g. one with a newline.
    """
    c = cfg.cluster
    logs = Path(run_dir) / "logs"
    opts: list[tuple[str, str, str]] = [  # (key, value, field it came from)
        ("job-name", cfg.name, "name"),
        ("nodes", str(c.nodes), "cluster.nodes"),
        ("ntasks-per-node", str(c.tasks_per_node), "cluster.tasks_per_node"),
    ]
    if c.gpus_per_node > 0 and c.gpu_request == "gres":
        opts.append(("gres", f"gpu:{c.gpus_per_node}", "cluster.gpus_per_node"))
    elif c.gpus_per_node > 0:
        opts.append(("gpus-per-node", str(c.gpus_per_node), "cluster.gpus_per_node"))
    opts.append(("cpus-per-task", str(c.cpus_per_task), "cluster.cpus_per_task"))
    if c.mem_gb is not None:
        opts.append(("mem", _mem(c.mem_gb), "cluster.mem_gb"))
    opts.append(("time", str(c.time_min), "cluster.time_min"))  # minutes, as submitit's timeout_min
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(c, key)
        if value is not None:
            opts.append((key, value, f"cluster.{key}"))
    if c.exclude:
        opts.append(("exclude", ",".join(c.exclude), "cluster.exclude"))
    if c.continue_with != "chain":
        # NOTE: chain: the job stops itself signal_delay_s before its limit (worker/signals.py);
        # slurmctld checks limits every ~30 s, so its signal would come up to 30 s early (with a
        # short limit, before the ranks installed their handlers).
        opts.append(("signal", f"USR2@{c.signal_delay_s}", "cluster.signal_delay_s"))
    opts.append(("requeue" if c.requeue else "no-requeue", "", "cluster.requeue"))
    opts.append(("open-mode", "append", ""))
    opts.append(("output", str(logs / "%j_sbatch.out"), "run directory"))
    opts.append(("error", str(logs / "%j_sbatch.err"), "run directory"))
    for key, value in c.sbatch_extra.items():
        if key in _OWN_SBATCH_KEYS or (key == "gres" and any(k == "gres" for k, _, _ in opts)):
            own = _OWN_SBATCH_KEYS.get(key, "cluster.gpus_per_node (with cluster.gpu_request: gres)")
            hint = f"set {own} instead" if own else "moe-orch sets it itself"
            issue = ConfigIssue(f"cluster.sbatch_extra.{key}", f"--{key} cannot be set here; {hint}")
            raise ConfigError([issue])
        opts.append((key, value, f"cluster.sbatch_extra.{key}"))
    issues = [
        ConfigIssue(field or key, f"{value!r} holds a newline or control character; SLURM cannot take it")
        for key, value, field in opts
        if _CONTROL.search(value)
    ]
    if issues:
        raise ConfigError(issues)
    return [(key, value) for key, value, _ in opts]


def srun_args(cfg: RunConfig) -> list[str]:
    """Options of the `srun` that starts the ranks, besides tasks and CPUs: on GPUs, every task sees
    all GPUs of its node (`--gpu-bind=none`; NCCL then uses NVLink/P2P between them) and the worker
    binds local rank r to cuda:r. sbatch.sh and submit (submitit's `srun_args`) both use it."""
    return [] if cfg.cpu_only else ["--gpu-bind=none"]


def accelerate_config(cfg: RunConfig, ds_config_path: Path, hosts: list[str] | None) -> dict[str, Any]:
    """An `accelerate launch --config_file` config that runs the same DeepSpeed job."""
    c = cfg.cluster
    out: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "DEEPSPEED",
        "deepspeed_config": {
            "deepspeed_config_file": str(ds_config_path),
            "deepspeed_multinode_launcher": "standard",
            "zero3_init_flag": False,
        },
        "mixed_precision": {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.training.precision],
        "machine_rank": 0,
        "num_machines": c.nodes,
        "num_processes": cfg.world_size,
        "main_process_port": c.master_port or DEFAULT_ACCELERATE_PORT,
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
    }
    if hosts and c.nodes > 1:
        out["main_process_ip"] = hosts[0]
    return out


def hostfile_hosts(cfg: RunConfig, nodelist: str | None) -> list[str] | None:
    """The nodes of `nodelist`, checked against `cluster.nodes`; None when there is no list."""
    if nodelist is None:
        return None
    hosts = expand_nodelist(nodelist)
    if len(hosts) != cfg.cluster.nodes:
        raise ConfigError(
            [
                ConfigIssue(
                    "nodelist",
                    f"{nodelist!r} names {len(hosts)} nodes but cluster.nodes is {cfg.cluster.nodes}; "
                    "pass one node per cluster.nodes",
                )
            ]
        )
    return hosts


def nodelist_from_env() -> str | None:
    """SLURM_JOB_NODELIST when rendering inside an allocation, else None (the CLI's default)."""
    return os.environ.get("SLURM_JOB_NODELIST") or None


def _environment() -> jinja2.Environment:
    import jinja2  # NOTE: here, not at the top: `validate` reads `sbatch_options` and draws nothing

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["q"] = lambda value: shlex.quote(str(value))
    env.filters["sq"] = lambda value: sbatch_quote(str(value))
    # NOTE: not Jinja's `tojson`, which HTML-escapes <, >, & and ' into \u003c etc.
    env.filters["json"] = lambda value: json.dumps(value, indent=2)
    return env


def render(
    cfg: RunConfig,
    *,
    run_dir: Path,
    python: str,
    nodelist: str | None = None,
    rendered_dir: Path | None = None,
) -> dict[str, str]:
    """Every rendered file as {filename: text}; pure (reads no environment, writes nothing).

    `run_dir` is where the job writes (logs/, checkpoints/) and where it reads `run.yaml`;
    `rendered_dir` is where these files will lie (default `<run_dir>/rendered`), which
    accelerate_config.yaml points at. `python` is the interpreter on the compute nodes.
    """
    run_dir = Path(run_dir)
    rendered_dir = Path(rendered_dir) if rendered_dir is not None else run_dir / "rendered"
    hosts = hostfile_hosts(cfg, nodelist)
    c = cfg.cluster
    ds = deepspeed_config(cfg)
    defaults = job_env_defaults(cfg)  # spec/launch.py: NCCL settings and the collective timeout on GPUs
    exports = [(k, v) for k, v in defaults.items() if k not in c.env] + list(c.env.items())
    context: dict[str, Any] = {
        "cfg": cfg,
        "sbatch_options": sbatch_options(cfg, run_dir),
        "srun_args": srun_args(cfg),
        "exports": exports,
        "python": python,
        "run_dir": str(run_dir),
        "run_yaml": str(run_dir / "run.yaml"),
        "logs_dir": str(run_dir / "logs"),
        "hosts": hosts if hosts is not None else ["localhost"],
        "hosts_known": hosts is not None,
        "ds_config": ds,
        "accelerate_config": accelerate_config(cfg, rendered_dir / "ds_config.json", hosts),
    }
    env = _environment()
    files = {
        name: env.get_template(name).render(context)
        for name in ("sbatch.sh", "hostfile", "ds_config.json", "accelerate_config.yaml")
    }
    files["run.yaml"] = dump_config(cfg)
    return files


def write_rendered(files: dict[str, str], out_dir: Path) -> dict[str, Path]:
    """Write rendered files into `out_dir` (sbatch.sh executable); returns their paths."""
    out_dir = Path(out_dir)
    paths: dict[str, Path] = {}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            path = out_dir / name
            tmp = path.with_name(f".{name}.tmp")
            tmp.write_text(text)
            if name.endswith(".sh"):
                # Executable by whoever may read it (`chmod +x`): 0755 under umask 022, 0700 in
                # a run directory, whose files `submit` creates owner-only (rundir/access.py).
                mode = tmp.stat().st_mode & 0o777
                tmp.chmod(mode | (mode & 0o444) >> 2)
            tmp.replace(path)
            paths[name] = path
    except OSError as exc:
        raise MoeOrchError(f"cannot write the rendered files into {out_dir}: {exc.strerror or exc}") from None
    logger.debug("wrote %s into %s", ", ".join(files), out_dir)
    return paths


def render_to_dir(cfg: RunConfig, out: Path, *, python: str, nodelist: str | None = None) -> dict[str, Path]:
    """`moe-orch render`: `out` serves as the run directory, so `sbatch <out>/sbatch.sh` just works.

    The files and run.yaml go into `out`, and `out/logs/` is created (SLURM does not create the
    folder of `--output`; without it the job fails before it starts).
    """
    out = Path(out).expanduser().absolute()
    files = render(cfg, run_dir=out, python=python, nodelist=nodelist, rendered_dir=out)
    paths = write_rendered(files, out)
    try:
        (out / "logs").mkdir(exist_ok=True)
    except OSError as exc:
        raise MoeOrchError(f"cannot create {out / 'logs'}: {exc.strerror or exc}") from None
    return paths
