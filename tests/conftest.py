"""Test groups, by what a test needs to run:

- `unit`: the orchestrator's own dependencies only: no torch, no DeepSpeed, no SLURM. Seconds:
  `python -m pytest -m unit`.
- `worker`: the worker extra (`pip install -e '.[worker]'`: torch, DeepSpeed, transformers), real
  ranks on CPU.
- `cluster`: the localhost SLURM (tools/slurm-local/start.sh) and the worker extra.
- `gpu`: CUDA GPUs and the worker extra: `python -m pytest -m gpu` (bench/gpu.sh runs it on the GPU
  machine). Skipped with the reason where torch sees no GPU, so a run without `-m` (CI) reports them
  skipped and never runs one.

Every test is in exactly one group, assigned here (MODULES, and TESTS where a module mixes groups),
never with a mark in the test module. One table is one place to read, and it lets pytest leave out
the modules that a `-m` expression cannot select without importing them: `-m unit` never imports
torch. A collected test without a group is a collection error.

Without the worker extra, `worker` and `cluster` tests are skipped with the reason; a module whose
tests all need the extra is not even imported (its imports would fail). `cluster` tests are also
skipped when the localhost SLURM does not answer `scontrol ping` (asked once per session).

`slow` (launches real ranks or jobs; minutes) is orthogonal: `-m "unit"`, `-m "worker and not slow"`.
Shared constants and helpers (REPO, free_port, ...) live in tests/helpers.py, imported as `helpers`.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import re
from collections.abc import Callable
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
GROUPS = ("unit", "worker", "cluster", "gpu")

MODULES: dict[str, str] = {
    "test_architecture.py": "unit",
    "test_backends.py": "unit",
    "test_bf16_cpu.py": "worker",
    "test_bench_smoke.py": "unit",
    "test_checkpoint.py": "unit",
    "test_checkpoint_async.py": "worker",  # torch.save through the hashing writer, kill -9 mid-save
    "test_cli.py": "unit",
    "test_config_read_errors.py": "unit",
    "test_data.py": "worker",  # worker.data and worker.tokenizer: numpy, tokenizers, transformers
    "test_datafile.py": "unit",
    "test_dist.py": "unit",
    "test_elastic_slurm.py": "cluster",
    "test_export.py": "worker",
    "test_gpu.py": "gpu",
    "test_gpu_launch.py": "unit",
    "test_hangs.py": "unit",
    "test_hangs_slurm.py": "cluster",
    "test_hangs_worker.py": "worker",
    "test_local_executor.py": "worker",
    "test_meta_model.py": "worker",
    "test_model.py": "worker",
    "test_moe_dropless.py": "worker",
    "test_nodelist.py": "unit",
    "test_preemption_slurm.py": "cluster",
    "test_preemption_unit.py": "unit",
    "test_rank_failure_slurm.py": "cluster",
    "test_redact.py": "unit",
    "test_status_listing.py": "unit",
    "test_routing.py": "worker",  # the real DeepSpeed MoE and the dropless layer; 2-rank label routing
    "test_routing_mi.py": "unit",  # the MI metric, label assignment, status/plot display
    "test_render.py": "unit",
    "test_render_accelerate.py": "worker",
    "test_render_gpu_slurm.py": "cluster",
    "test_render_hostile.py": "unit",
    "test_render_slurm.py": "cluster",
    "test_reshard.py": "worker",
    "test_run_dir_modes.py": "unit",
    "test_rundir_files.py": "unit",
    "test_runs.py": "unit",
    "test_secrets.py": "unit",
    "test_secrets_slurm.py": "cluster",
    "test_slurm_integration.py": "cluster",
    "test_slurm_parse.py": "unit",
    "test_topology.py": "unit",
    "test_submit_unit.py": "unit",
    "test_sweep.py": "unit",
    "test_sweep_slurm.py": "cluster",
    "test_chain_slurm.py": "cluster",
    "test_chain_notify.py": "unit",
    "test_validate_rules.py": "unit",
    "test_validate_summary.py": "unit",
    "test_watch.py": "unit",
    "test_wheel.py": "unit",
    "test_worker_e2e.py": "worker",
}
"""Each test module's group."""

TESTS: dict[str, str] = {
    # The benchmarks' smoke modes that train through the worker.
    "test_bench_smoke.py::test_gpu_train_dry_trains_the_dense_parent_and_the_dropless_moe_on_cpu": "worker",
    "test_bench_smoke.py::test_checkpoint_smoke_saves_through_the_worker_and_counts_bytes_per_parameter": (
        "worker"
    ),
    "test_bench_smoke.py::test_resume_smoke_times_a_real_resume_against_a_fresh_start": "worker",
    "test_bench_smoke.py::test_learning_smoke_trains_dense_and_top2_through_the_worker": "worker",
    # The rendered files, read by DeepSpeed's and accelerate's own parsers.
    "test_render.py::test_deepspeed_config_accepts_ds_config_json_with_its_batch_assertion": "worker",
    "test_render.py::test_deepspeed_launcher_parses_the_hostfile": "worker",
    "test_render.py::test_accelerate_loads_the_config_and_finds_the_ds_config": "worker",
    "test_validate_summary.py::test_dense_bf16_zero2_estimate_equals_deepspeeds_estimator": "worker",
    # The worker's argument mapping and schedules: no launch, no torch. (Mapping the seed's flags
    # without a config asks torch whether there is a GPU: a worker test.)
    "test_worker_e2e.py::test_seed_flags_override_a_config_file": "unit",
    "test_worker_e2e.py::test_deepspeed_config_follows_the_run_config": "unit",
    "test_worker_e2e.py::test_lr_warms_up_linearly_then_decays": "unit",
    "test_worker_e2e.py::test_micro_batch_seeds_differ_by_step_micro_and_rank_and_repeat": "unit",
}
"""`module::test function` -> group, for the tests of a module that mixes groups: not the module's."""

WORKER_EXTRA = importlib.util.find_spec("deepspeed") is not None
NO_WORKER_EXTRA = "needs the worker extra (DeepSpeed is not installed): pip install -e '.[worker]'"
NO_CLUSTER = "localhost SLURM is not up (tools/slurm-local/start.sh)"
NO_GPU = "needs a CUDA GPU (torch sees none): `python -m pytest -m gpu` on a GPU machine (bench/gpu.sh)"


@functools.cache
def cluster_answers() -> bool:
    """Whether the localhost SLURM answers `scontrol ping`: asked once, and only when a `cluster`
    test was collected."""
    from helpers import cluster_up

    return cluster_up()


@functools.cache
def cuda_present() -> bool:
    """Whether torch sees a CUDA GPU: asked once, and only when a `gpu` test was collected."""
    import torch

    return bool(torch.cuda.is_available())


def _module_key(path: Path) -> str | None:
    """The table key of a test module ("test_cli.py"), or None for a path outside tests/."""
    try:
        return path.resolve().relative_to(TESTS_DIR).as_posix()
    except ValueError:
        return None


def module_groups(key: str) -> set[str]:
    """Every group that a test of this module can be in (empty: the module is not in the table)."""
    if key not in MODULES:
        return set()
    return {MODULES[key]} | {group for name, group in TESTS.items() if name.split("::")[0] == key}


def _can_select(markexpr: str, groups: set[str]) -> bool:
    """Whether `-m markexpr` can select a test of one of `groups`, whatever its other marks.

    Conservative: True when in doubt (an expression this cannot read collects everything).
    """
    if not markexpr:
        return True
    try:
        # NOTE: pytest's own evaluator (private, unchanged in use since pytest 6); the fallback
        # only costs the imports that leaving modules out saves.
        from _pytest.mark.expression import Expression

        expr = Expression.compile(markexpr)
    except Exception:
        return True
    free = sorted(set(re.findall(r"[A-Za-z_]\w*", markexpr)) - {"and", "or", "not", "True", "False", *GROUPS})
    if len(free) > 8:
        return True

    def matcher(group: str, on: set[str]) -> Callable[..., bool]:
        return lambda name, /, **kwargs: name == group if name in GROUPS else name in on

    for group in groups:
        for bits in itertools.product((False, True), repeat=len(free)):
            on = {name for name, bit in zip(free, bits, strict=True) if bit}
            if expr.evaluate(matcher(group, on)):
                return True
    return False


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Leave out (without importing) a module whose groups the `-m` expression cannot select."""
    key = _module_key(collection_path)
    if key is None or key not in MODULES:
        return None
    return True if not _can_select(config.option.markexpr, module_groups(key)) else None


class NeedsWorkerExtra(pytest.Module):
    """A module whose tests all need the worker extra, when it is missing: not imported (its imports
    would fail); one placeholder stands for its tests and is skipped with the reason."""

    def collect(self) -> list[pytest.Item | pytest.Collector]:
        return [WorkerExtraMissing.from_parent(self, name="needs_the_worker_extra")]


class WorkerExtraMissing(pytest.Item):
    def runtest(self) -> None:
        pytest.skip(NO_WORKER_EXTRA)

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, 0, self.name  # a skip is reported at the module's first line


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    key = _module_key(module_path)
    groups = module_groups(key) if key is not None else set()
    if not WORKER_EXTRA and groups and groups <= {"worker", "cluster", "gpu"}:
        return NeedsWorkerExtra.from_parent(parent, path=module_path)
    return None


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by these marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its group; refuse a test without exactly one."""
    problems: dict[str, str] = {}  # one line per module or per TESTS entry
    for item in items:
        key = _module_key(item.path)
        function = getattr(item, "originalname", item.name)
        marked = sorted({mark.name for mark in item.iter_markers() if mark.name in GROUPS})
        if marked:
            problems[item.nodeid] = (
                f"{item.nodeid} is marked {', '.join(marked)} in its module; groups are assigned only"
                " in tests/conftest.py (MODULES, TESTS)"
            )
            continue
        group = TESTS.get(f"{key}::{function}") or MODULES.get(key or "")
        if group is None:
            problems[str(item.path)] = (
                f"{key or item.path} has no test group: add it to MODULES in tests/conftest.py with one of"
                f" {', '.join(GROUPS)}"
            )
            continue
        item.add_marker(group)
        if group in ("worker", "cluster", "gpu") and not WORKER_EXTRA:
            item.add_marker(pytest.mark.skip(reason=NO_WORKER_EXTRA))
        elif group == "cluster" and not cluster_answers():
            item.add_marker(pytest.mark.skip(reason=NO_CLUSTER))
        elif group == "gpu" and not cuda_present():
            item.add_marker(pytest.mark.skip(reason=NO_GPU))
    modules = {_module_key(item.path): getattr(item, "module", None) for item in items}
    for name in TESTS:
        key, function = name.split("::")
        module = modules.get(key)
        if module is not None and not hasattr(module, function):
            problems[name] = f"TESTS in tests/conftest.py names {name}; {key} defines no such test (renamed?)"
    if problems:
        raise pytest.UsageError("every test needs exactly one group:\n  " + "\n  ".join(problems.values()))
