"""The CLI: exit codes, one clear line per error, no traceback, and a fast start (no heavy imports)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.rundir import runs
from orchestrator.rundir.runs import Attempt, RunRecord
from orchestrator.spec.schemadoc import REFERENCE_PATH, config_reference_markdown

runner = CliRunner()


def test_validate_a_shipped_config_by_name_prints_the_summary_and_exits_0() -> None:
    result = runner.invoke(app, ["validate", "mpt7b-moe-4x8"])
    assert result.exit_code == 0, result.output
    assert "32 = 4 nodes x 8 ranks per node" in result.stdout
    assert "256 = 1 micro x 8 accumulation x 32 data-parallel" in result.stdout
    assert "ep_size 8, 4 expert-parallel groups" in result.stdout
    assert "of 80 GB" in result.stdout and "activations" in result.stdout


def test_validate_error_is_one_red_line_with_file_line_and_exit_code_2() -> None:
    result = runner.invoke(app, ["validate", "tiny-slurm", "--set", "moe.ep_size=3"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ") and "tiny-slurm.yaml:" in lines[0]
    assert "moe.ep_size" in lines[0] and "Traceback" not in result.output


def test_validate_reports_every_issue_on_its_own_line() -> None:
    result = runner.invoke(
        app, ["validate", "tiny-slurm", "--set", "cluster.nodez=2", "--set", "training.seed=x"]
    )
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2
    assert any("did you mean `nodes`?" in line for line in lines)
    assert any("training.seed" in line for line in lines)


def test_validate_an_unknown_config_lists_the_shipped_ones() -> None:
    result = runner.invoke(app, ["validate", "no-such-config"])
    assert result.exit_code == 2
    assert "config file not found: no-such-config" in result.stderr
    assert "tiny-slurm" in result.stderr


def test_render_writes_every_file_and_the_logs_folder(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["render", "tiny-slurm", "--out", str(tmp_path / "r"), "--nodelist", "n[1-2]"]
    )
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert written == [
        "accelerate_config.yaml",
        "ds_config.json",
        "hostfile",
        "logs",
        "run.yaml",
        "sbatch.sh",
    ]
    assert (tmp_path / "r" / "hostfile").read_text().splitlines()[-2:] == ["n1 slots=1", "n2 slots=1"]
    assert f"sbatch {tmp_path / 'r' / 'sbatch.sh'}" in result.stdout


def test_render_takes_the_nodelist_from_slurm_inside_an_allocation(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["render", "tiny-slurm", "--out", str(tmp_path)], env={"SLURM_JOB_NODELIST": "c[7-8]"}
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "hostfile").read_text().splitlines()[-2:] == ["c7 slots=1", "c8 slots=1"]


def test_render_with_a_bad_nodelist_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["render", "tiny-slurm", "--out", str(tmp_path), "--nodelist", "n[1-"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: nodelist: cannot read node list 'n[1-': '[' without ']' "
        "(expected e.g. n[1-4] or gpu-[01-03,07])"
    ]


def test_schema_prints_the_json_schema() -> None:
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert schema["title"] == "moe-orch run config"
    assert "cluster" in schema["properties"]


def test_committed_config_reference_is_up_to_date() -> None:
    committed = (REPO / REFERENCE_PATH).read_text()
    assert committed == config_reference_markdown(), (
        f"{REFERENCE_PATH} is stale: run `moe-orch schema --markdown --out {REFERENCE_PATH}`"
    )


def test_schema_markdown_lists_every_section_field() -> None:
    result = runner.invoke(app, ["schema", "--markdown"])
    assert result.exit_code == 0
    for field in (
        "`cluster.signal_delay_s`",
        "`moe.ep_size`",
        "`training.zero_stage`",
        "`model.tiny.d_model`",
    ):
        assert field in result.stdout


def test_configs_lists_the_shipped_configs_with_descriptions() -> None:
    result = runner.invoke(app, ["configs"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in ("tiny-cpu", "tiny-slurm", "mpt7b-moe-4x8", "mpt7b-moe-2x8-a100"):
        assert name in result.stdout
    assert "2 nodes x 1 CPU rank" in result.stdout


HEAVY = ("torch", "deepspeed", "transformers", "submitit", "matplotlib", "accelerate")


@pytest.mark.parametrize(
    ("argv", "absent"),
    [
        # `--help` builds no schema and draws no table
        (["--help"], (*HEAVY, "rich", "pydantic")),
        # plain lines go through click: rich only for the few tables and --watch
        (["validate", "tiny-slurm"], (*HEAVY, "rich")),
        (["render", "tiny-slurm", "--out", "{tmp}"], HEAVY),
        # nothing in `status` validates a config: neither the schema nor typer may import pydantic
        (["status", "--home", "{tmp}"], (*HEAVY, "rich", "pydantic")),
    ],
)
def test_cli_never_imports_what_the_command_does_not_use(
    argv: list[str], absent: tuple[str, ...], tmp_path: Path
) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code = (
        "import atexit, sys\n"
        f"loaded = lambda: sorted(m for m in {absent!r} if m in sys.modules)\n"
        "atexit.register(lambda: print('LOADED', loaded(), file=sys.stderr))\n"
        f"sys.argv = ['moe-orch', *{argv!r}]\n"
        "from orchestrator.cli import main\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stderr


def _moe_orch(*argv: str) -> subprocess.CompletedProcess[str]:
    code = (
        f"import sys\nsys.argv = ['moe-orch', *{list(argv)!r}]\nfrom orchestrator.cli import main\nmain()\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_the_script_builds_only_the_command_it_runs_and_every_help_still_reads_the_same() -> None:
    # `main` keeps only the named command in the app (typer builds every command's options first).
    top = _moe_orch("--help")
    assert top.returncode == 0 and all(f" {cmd} " in top.stdout for cmd in ("validate", "status", "reshard"))
    one = _moe_orch("validate", "--help")
    assert one.returncode == 0 and one.stdout.startswith("Usage: moe-orch validate [OPTIONS]")
    assert "--set" in one.stdout
    unknown = _moe_orch("no-such-command")
    assert unknown.returncode == 2 and "No such command" in unknown.stderr
    wrong = _moe_orch("validate", "--no-such-option", "tiny-slurm")
    assert wrong.returncode == 2 and "No such option" in wrong.stderr


def test_render_into_a_folder_that_cannot_be_written_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = runner.invoke(app, ["render", "tiny-slurm", "--out", str(blocker / "sub")])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: cannot write the rendered files into {blocker / 'sub'}")
    assert "Traceback" not in result.output


def write_run_with_attempts(home: Path, attempts: list[Attempt]) -> str:
    """A run record under `home` with these attempts (no job behind it); returns the run id."""
    run_id = "r-20261128-152000-abcd"
    run_dir = home / run_id
    run_dir.mkdir(parents=True)
    rec = RunRecord(
        run_id=run_id, name="r", config_hash="x", created=0.0, executor="slurm",
        run_dir=str(run_dir), home=str(home), attempts=attempts,
    )  # fmt: skip
    runs.write_run(run_dir, rec)
    return run_id


def test_logs_of_an_attempt_that_does_not_exist_names_the_attempts_and_exits_2(tmp_path: Path) -> None:
    attempts = [
        Attempt(number=1, job_id="5", attempt_key="5.0"),
        Attempt(number=2, job_id="5", attempt_key="5.1", restart=1),
        Attempt(number=3, job_id="9", attempt_key="9.0"),
    ]
    run_id = write_run_with_attempts(tmp_path, attempts)
    result = runner.invoke(app, ["logs", run_id, "--attempt", "7", "--home", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        f"error: run {run_id} has attempts 1..3; no attempt 7 (see `moe-orch status {run_id}`)"
    ]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("source", ["start event", "run.yaml"])
def test_logs_of_a_rank_that_does_not_exist_names_the_ranks_and_exits_2(tmp_path: Path, source: str) -> None:
    run_id = write_run_with_attempts(tmp_path, [Attempt(number=1, job_id="5", attempt_key="5.0")])
    run_dir = tmp_path / run_id
    if source == "start event":
        (run_dir / "events.jsonl").write_text('{"event": "start", "time": 1.0, "world_size": 2}\n')
    else:
        (run_dir / "run.yaml").write_text((REPO / "configs" / "tiny-slurm.yaml").read_text())  # 2 x 1 ranks
    result = runner.invoke(app, ["logs", run_id, "--rank", "2", "--home", str(tmp_path)])
    assert result.exit_code == 2, result.output
    expected = f"error: run {run_id} has ranks 0..1 (world size 2); no rank 2"
    assert result.stderr.strip().splitlines() == [expected]
    assert runner.invoke(app, ["logs", run_id, "--rank", "1", "--home", str(tmp_path)]).exit_code == 0


def test_logs_of_a_run_that_has_no_attempt_yet_says_so(tmp_path: Path) -> None:
    run_id = write_run_with_attempts(tmp_path, [])
    result = runner.invoke(app, ["logs", run_id, "--attempt", "1", "--home", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        f"error: run {run_id} has no attempts yet; no attempt 1 (see `moe-orch status {run_id}`)"
    ]


def test_logs_of_an_existing_attempt_without_output_is_empty_and_exits_0(tmp_path: Path) -> None:
    run_id = write_run_with_attempts(tmp_path, [Attempt(number=1, job_id="5", attempt_key="5.0")])
    result = runner.invoke(app, ["logs", run_id, "--attempt", "1", "--home", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
