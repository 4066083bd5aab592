"""`python -m worker --config run.yaml --run-dir DIR`, or the seed script's flags.

Launch it with any of: `torchrun --nproc_per_node N -m worker ...`, `accelerate launch
--config_file X -m worker ...` (a DEEPSPEED config starts torchrun; ACCELERATE_* is ignored),
`deepspeed --num_accelerators N -m worker ...` (passes `--local_rank`), `srun python -m worker ...`,
or in-process from the orchestrator's submitit job: `worker.__main__.main(argv)`, which returns the
exit code (see worker.signals) instead of exiting.

Seed flags (`--model_id --data_file --output_dir --epochs --learning_rate --max_seq_length
--per_device_batch_size --gradient_accumulation_steps --logging_steps --save_steps --max_samples
--max_target_length --warmup_steps --max_grad_norm --seed --convert_to_moe`) map onto the same
RunConfig fields. With `--config` they override the file's values; without it they start from the
schema defaults, with:
- `--output_dir` as the run directory (`--run-dir` wins when both are given);
- the cluster sized to the launched job (one node, WORLD_SIZE tasks) and, without a GPU,
  precision fp32 (the schema's bf16 default needs a GPU);
- NOTE: MoE only with `--convert_to_moe`, as in the seed, whose default trained the dense model
  (`moe.enabled: false`). `--convert_to_moe` upcycles into the schema's default MoE (4 experts,
  top-1, ep_size 1).
Rank 0 writes the resolved config to `<run_dir>/run.yaml` (when absent) so a resume or
`moe-orch export` sees the same settings.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from orchestrator.errors import ExitWithoutProgress, MoeOrchError
from orchestrator.rundir.exitcodes import EXIT_FAILED, EXIT_USAGE
from orchestrator.spec.loading import apply_overrides, dump_config, load_config, validate_data
from orchestrator.spec.schema import RunConfig

logger = logging.getLogger(__name__)

# seed flag -> (config path, type)
SEED_FLAGS: dict[str, tuple[str, type]] = {
    "model_id": ("model.name_or_path", str),
    "data_file": ("data.train_file", str),
    "epochs": ("training.epochs", int),
    "learning_rate": ("training.learning_rate", float),
    "max_seq_length": ("data.max_seq_length", int),
    "per_device_batch_size": ("training.micro_batch_size", int),
    "gradient_accumulation_steps": ("training.gradient_accumulation_steps", int),
    "logging_steps": ("training.logging_steps", int),
    "save_steps": ("training.save_steps", int),
    "max_samples": ("data.max_samples", int),
    "max_target_length": ("data.max_target_length", int),
    "warmup_steps": ("training.warmup_steps", int),
    "max_grad_norm": ("training.max_grad_norm", float),
    "seed": ("training.seed", int),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="run config YAML (the orchestrator's run.yaml, or any config file)")
    parser.add_argument("--run-dir", "--run_dir", dest="run_dir", help="run directory (checkpoints, metrics)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set training.max_steps=20 (repeatable)",
    )
    seed = parser.add_argument_group("seed script flags (train_mpt7b_moe_accelerate.py)")
    for flag, (path, kind) in SEED_FLAGS.items():
        seed.add_argument(f"--{flag}", type=kind, default=None, help=f"sets {path}")
    seed.add_argument("--output_dir", default=None, help="run directory (same as --run-dir)")
    seed.add_argument("--convert_to_moe", action="store_true", default=None, help="sets moe.enabled: true")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def _seed_overrides(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for flag, (path, _) in SEED_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            values[path] = value
    if args.convert_to_moe:
        values["moe.enabled"] = True
    return values


def _set_path(data: dict[str, Any], path: str, value: Any) -> None:
    cursor = data
    parts = path.split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value


def _job_world_size() -> int:
    for key in ("WORLD_SIZE", "SLURM_NTASKS", "SUBMITIT_LOCAL_NTASKS"):
        if os.environ.get(key):
            return int(os.environ[key])
    return 1


def _has_gpu() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def config_from_args(args: argparse.Namespace) -> tuple[RunConfig, Path]:
    """The RunConfig and run directory the arguments describe."""
    seed_values = _seed_overrides(args)
    run_dir_arg = args.run_dir or args.output_dir
    if args.config:
        cfg = load_config(args.config, args.overrides)
        if seed_values:
            data = cfg.model_dump(mode="json")
            for path, value in seed_values.items():
                _set_path(data, path, value)
            # Paths given on the command line are relative to the working directory.
            if "data.train_file" in seed_values:
                _set_path(data, "data.train_file", str(Path(seed_values["data.train_file"]).resolve()))
            cfg = validate_data(data)
        run_dir = Path(run_dir_arg) if run_dir_arg else None
        if run_dir is None:
            raise MoeOrchError("--run-dir is required with --config, e.g. --run-dir runs/my-run")
        return cfg, run_dir
    run_dir = Path(run_dir_arg or "./mpt7b_moe_finetune")
    name = re.sub(r"[^A-Za-z0-9._-]", "-", run_dir.resolve().name)[:64] or "seed-run"
    gpus = _has_gpu()
    fields: dict[str, Any] = {
        "name": name,
        "cluster": {
            "nodes": 1,
            "tasks_per_node": _job_world_size(),
            "gpus_per_node": _job_world_size() if gpus else 0,
        },
        "moe": {"enabled": False},
        "training": {} if gpus else {"precision": "fp32"},
    }
    # The seed's defaults where they differ from the schema's.
    _set_path(fields, "model.name_or_path", "mosaicml/mpt-7b")
    for path, value in seed_values.items():
        _set_path(fields, path, value)
    if "data.train_file" in seed_values:
        _set_path(fields, "data.train_file", str(Path(seed_values["data.train_file"]).resolve()))
    fields = apply_overrides(fields, args.overrides)
    return validate_data(fields), run_dir


def _setup_logging(rank: int) -> None:
    """Rank 0: INFO to stdout; every rank: warnings and errors to stderr."""
    root = logging.getLogger()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    err.setFormatter(fmt)
    root.addHandler(err)
    if rank == 0:
        out = logging.StreamHandler(sys.stdout)
        out.setLevel(logging.INFO)
        out.addFilter(lambda record: record.levelno < logging.WARNING)
        out.setFormatter(fmt)
        root.addHandler(out)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # NOTE: submitit logs through its own handler already (the job runs us in-process); letting
    # its records reach ours too printed every submitit line twice.
    logging.getLogger("submitit").propagate = False


def _rank_from_env() -> int:
    for key in ("RANK", "SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID"):
        if os.environ.get(key):
            return int(os.environ[key])
    return 0


def exit_process(code: int) -> NoReturn:
    """End this rank's process with `code` once everything it wrote is flushed, without the
    interpreter's teardown.

    NOTE: the root cause of a rank aborting at exit (SIGABRT after a good save, 1 exit in ~20;
    exit code 134 under SLURM). DeepSpeed keeps references to its process groups, so gloo's worker
    threads outlive `destroy_process_group`; such a thread drops its last collective's work (and
    the Python tensors in it) a moment after the collective returned. When that moment falls
    after the main thread began finalizing, taking the GIL calls `pthread_exit` inside a noexcept
    C++ destructor: "terminate called without an active exception", SIGABRT (core dump:
    `~AsyncAllgatherWork` -> `decref_pyobject` -> `take_gil` -> `PyThread_exit_thread`). Every file
    the worker writes is fsynced and closed before this point, so nothing is lost by skipping it.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, train, and return the exit code (never raises for training errors)."""
    rank = _rank_from_env()
    _setup_logging(rank)
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    try:
        cfg, run_dir = config_from_args(args)
    except MoeOrchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if rank == 0:
        # The resolved config beside the checkpoints: resume and export read it.
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "run.yaml").exists():
            (run_dir / "run.yaml").write_text(dump_config(cfg))
    from orchestrator import notify
    from worker.train import run

    notify.install("job")  # notifications on the events this rank writes (cfg.notify)
    try:
        return run(cfg, run_dir)
    except ExitWithoutProgress:
        return EXIT_FAILED
    except MoeOrchError as exc:
        print(f"[rank{rank}] error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception:
        print(f"[rank{rank}] training failed:\n{traceback.format_exc()}", file=sys.stderr, end="")
        return EXIT_FAILED


if __name__ == "__main__":
    exit_process(main())
