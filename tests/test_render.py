"""Rendered files: golden copies, and the real readers (DeepSpeed, its hostfile parser, accelerate,
bash) accept them. Goldens are rendered with a fixed run dir and python so they are machine-independent.
"""

from __future__ import annotations

import difflib
import json
import subprocess
from pathlib import Path
from unittest import mock

import pytest

from orchestrator.errors import ConfigError
from orchestrator.render.files import (
    RENDERED_FILES,
    render,
    render_to_dir,
    sbatch_options,
    sbatch_quote,
    write_rendered,
)
from orchestrator.spec.deepspeed import deepspeed_config
from orchestrator.spec.loading import builtin_configs_dir, load_config
from orchestrator.spec.schema import RunConfig

GOLDEN = Path(__file__).parent / "golden"
RUN_DIR = Path("/runs/RUN-ID")
PYTHON = "/opt/moe-orch/bin/python"
# (config, nodelist the goldens are rendered with)
# mpt7b-moe-4x8 asks for GPUs with --gpus-per-node, mpt7b-moe-2x8-a100 with --gres (cluster.gpu_request).
GOLDEN_CONFIGS = [
    ("tiny-slurm", "n[1-2]"),
    ("mpt7b-moe-4x8", "gpu-[01-04]"),
    ("mpt7b-moe-2x8-a100", "a[1-2]"),
]


def rendered(name: str, nodelist: str | None) -> dict[str, str]:
    files = render(load_config(name), run_dir=RUN_DIR, python=PYTHON, nodelist=nodelist)
    # run.yaml holds the data path resolved against the configs folder: make it machine-independent.
    configs = str(builtin_configs_dir().resolve())
    return {k: v.replace(configs, "<configs>") for k, v in files.items()}


@pytest.mark.parametrize("file", RENDERED_FILES)
@pytest.mark.parametrize(("config", "nodelist"), GOLDEN_CONFIGS)
def test_rendered_file_matches_its_golden_copy(config: str, nodelist: str, file: str) -> None:
    text = rendered(config, nodelist)[file]
    golden = GOLDEN / config / file
    if not golden.exists():
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
        pytest.fail(f"recorded {golden}: review it and commit it")
    expected = golden.read_text()
    if text != expected:
        diff = "".join(
            difflib.unified_diff(expected.splitlines(True), text.splitlines(True), str(golden), "rendered")
        )
        pytest.fail(
            f"{file} differs from {golden}; if the change is intended, delete the golden file and "
            f"run the test again to re-record it:\n{diff}"
        )


def test_render_is_pure_and_deterministic() -> None:
    cfg = load_config("tiny-slurm")
    first = render(cfg, run_dir=RUN_DIR, python=PYTHON, nodelist="n[1-2]")
    assert render(cfg, run_dir=RUN_DIR, python=PYTHON, nodelist="n[1-2]") == first
    assert sorted(first) == sorted(RENDERED_FILES)


def test_sbatch_options_are_one_ordered_list_with_every_resource() -> None:
    cfg = load_config("mpt7b-moe-2x8-a100")
    options = sbatch_options(cfg, RUN_DIR)
    keys = [k for k, _ in options]
    assert keys == [
        "job-name", "nodes", "ntasks-per-node", "gres", "cpus-per-task", "mem", "time",
        "partition", "account", "qos", "constraint", "signal", "requeue", "open-mode", "output", "error",
        "mail-type",
    ]  # fmt: skip
    values = dict(options)
    assert values["gres"] == "gpu:8"  # cluster.gpu_request: gres
    assert values["mem"] == "480G"
    assert values["signal"] == "USR2@600"
    assert values["requeue"] == ""
    assert values["output"] == "/runs/RUN-ID/logs/%j_sbatch.out"


def test_sbatch_options_leave_out_what_is_unset_and_convert_fractional_memory() -> None:
    cfg = load_config("tiny-slurm", ["cluster.mem_gb=1.5", "cluster.requeue=false", "cluster.exclude=n3,n4"])
    values = dict(sbatch_options(cfg, RUN_DIR))
    assert "gpus-per-node" not in values and "account" not in values
    assert values["mem"] == "1536M"  # SLURM wants whole units
    assert values["no-requeue"] == "" and "requeue" not in values
    assert values["exclude"] == "n3,n4"


@pytest.mark.parametrize(
    ("value", "quoted"),
    [
        ("debug", "debug"),
        ("/runs/a-1/logs/%j_sbatch.out", "/runs/a-1/logs/%j_sbatch.out"),
        ("a b", '"a b"'),
        ("x#y", '"x#y"'),  # unquoted, sbatch would cut the value at the #
        ("it's", '"it\'s"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
    ],
)
def test_sbatch_quote_escapes_what_sbatch_parses(value: str, quoted: str) -> None:
    assert sbatch_quote(value) == quoted


def test_sbatch_quote_refuses_a_newline() -> None:
    with pytest.raises(ConfigError, match="newline"):
        sbatch_quote("debug\nrm -rf ~")


def test_hostfile_without_nodelist_is_localhost_for_one_node_and_says_so_for_many() -> None:
    one = render(load_config("tiny-cpu"), run_dir=RUN_DIR, python=PYTHON)["hostfile"]
    assert one.splitlines()[-1] == "localhost slots=2"
    many = render(load_config("tiny-slurm"), run_dir=RUN_DIR, python=PYTHON)["hostfile"]
    assert "render again with" in many and many.splitlines()[-1] == "localhost slots=1"


def test_nodelist_must_name_one_node_per_cluster_node() -> None:
    with pytest.raises(ConfigError, match=r"names 3 nodes but cluster\.nodes is 2"):
        render(load_config("tiny-slurm"), run_dir=RUN_DIR, python=PYTHON, nodelist="n[1-3]")


def test_the_rendered_ds_config_is_the_dict_the_worker_gives_deepspeed() -> None:
    for name in ("tiny-slurm", "mpt7b-moe-4x8", "mpt7b-moe-2x8-a100", "tiny-cpu"):
        cfg = load_config(name)
        text = render(cfg, run_dir=RUN_DIR, python=PYTHON)["ds_config.json"]
        assert json.loads(text) == deepspeed_config(cfg)  # worker.setup passes this same dict


# --- the real readers accept the files ------------------------------------------------------------


@pytest.fixture(params=[name for name, _ in GOLDEN_CONFIGS])
def written(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[RunConfig, dict[str, Path]]:
    cfg = load_config(request.param)
    nodes = ",".join(f"node{i}" for i in range(cfg.cluster.nodes))
    return cfg, render_to_dir(cfg, tmp_path / "run", python=PYTHON, nodelist=nodes)


def test_deepspeed_config_accepts_ds_config_json_with_its_batch_assertion(
    written: tuple[RunConfig, dict[str, Path]],
) -> None:
    import deepspeed.runtime.config as ds_config_module

    cfg, paths = written

    class DataParallel:  # DeepSpeed asks an mpu for the data-parallel size (no process group here)
        def get_data_parallel_world_size(self) -> int:
            return cfg.data_parallel_size

    with mock.patch.object(ds_config_module.dist, "get_rank", return_value=0):
        ds = ds_config_module.DeepSpeedConfig(str(paths["ds_config.json"]), mpu=DataParallel())
        assert ds.world_size == cfg.world_size
        assert ds.train_batch_size == cfg.global_batch_size
        assert ds.zero_optimization_stage == cfg.training.zero_stage
        assert ds.bfloat16_config.enabled == (cfg.training.precision == "bf16")
        # The same file with one rank too many fails DeepSpeed's own batch assertion.
        DataParallel.get_data_parallel_world_size = lambda self: cfg.data_parallel_size + 1  # type: ignore[method-assign]
        with pytest.raises(AssertionError, match="train_batch_size is not equal"):
            ds_config_module.DeepSpeedConfig(str(paths["ds_config.json"]), mpu=DataParallel())


def test_deepspeed_launcher_parses_the_hostfile(written: tuple[RunConfig, dict[str, Path]]) -> None:
    from deepspeed.launcher.runner import fetch_hostfile

    cfg, paths = written
    pool = fetch_hostfile(str(paths["hostfile"]))
    assert dict(pool) == {f"node{i}": cfg.cluster.tasks_per_node for i in range(cfg.cluster.nodes)}


def test_accelerate_loads_the_config_and_finds_the_ds_config(
    written: tuple[RunConfig, dict[str, Path]],
) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    cfg, paths = written
    loaded = load_config_from_file(str(paths["accelerate_config.yaml"]))
    assert (
        str(loaded.distributed_type) == "DistributedType.DEEPSPEED" or loaded.distributed_type == "DEEPSPEED"
    )
    assert loaded.num_processes == cfg.world_size
    assert loaded.num_machines == cfg.cluster.nodes
    assert loaded.deepspeed_config["deepspeed_config_file"] == str(paths["ds_config.json"])
    assert Path(loaded.deepspeed_config["deepspeed_config_file"]).is_file()
    assert loaded.mixed_precision == {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.training.precision]


def test_sbatch_script_is_valid_bash_and_executable(written: tuple[RunConfig, dict[str, Path]]) -> None:
    _, paths = written
    script = paths["sbatch.sh"]
    assert script.stat().st_mode & 0o111
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert (script.parent / "logs").is_dir()  # SLURM does not create the --output folder


def test_run_yaml_loads_back_to_the_same_config(written: tuple[RunConfig, dict[str, Path]]) -> None:
    from orchestrator.spec.loading import load_resolved

    cfg, paths = written
    assert load_resolved(paths["run.yaml"]) == cfg


def test_write_rendered_replaces_files_atomically(tmp_path: Path) -> None:
    paths = write_rendered({"a.sh": "echo 1\n", "b.txt": "x"}, tmp_path)
    write_rendered({"a.sh": "echo 2\n"}, tmp_path)
    assert paths["a.sh"].read_text() == "echo 2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.sh", "b.txt"]
