"""`sweep` against a fake SLURM: the grid, the validation of every element, ONE array submission,
the sweep folder, the array job ids in the scheduler's output, `status SWEEP` (also for 100
elements, under a second), a sweep's one row in the plain `status` table, `cancel SWEEP`,
`logs SWEEP --element`, and `--dry-run`."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes import FakeSlurm
from helpers import REPO
from typer.testing import CliRunner

from orchestrator.backends.slurm import scheduler
from orchestrator.cli import app
from orchestrator.errors import ConfigError
from orchestrator.lifecycle import status, sweep, sweep_ops
from orchestrator.lifecycle.logs import _FILE_RE
from orchestrator.rundir import reports, runs, sweeps
from orchestrator.rundir.runs import Attempt, AttemptState, RunRecord, RunState, StopReason
from worker.dist import resolve_dist

TINY_SLURM = str(REPO / "configs" / "tiny-slurm.yaml")
GRID = ["training.learning_rate=1.0e-3,3e-3", "moe.top_k=1,2"]
runner = CliRunner()


@pytest.fixture
def fake() -> Iterator[FakeSlurm]:
    with FakeSlurm().context() as f:
        yield f


def _sweep(home: Path, grid: list[str] = GRID, *sets: str, max_parallel: int | None = 2) -> Path:
    lines: list[str] = []
    sweep_dir = sweep.submit_sweep(
        TINY_SLURM, list(sets), grid, max_parallel=max_parallel, home=str(home), echo=lines.append
    )
    assert lines[0] == sweep_dir.name, "the sweep id first, then one line per element"
    return sweep_dir


# --- the grid -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "key", "values"),
    [
        ("training.learning_rate=1e-3,3.0e-4", "training.learning_rate", [0.001, 0.0003]),
        ("moe.top_k=1,2", "moe.top_k", [1, 2]),
        ("training.lr_schedule=linear,cosine", "training.lr_schedule", ["linear", "cosine"]),
        ("training.bf16_on_cpu=true,false", "training.bf16_on_cpu", [True, False]),
    ],
)
def test_a_grid_option_is_a_key_and_yaml_values(item: str, key: str, values: list[object]) -> None:
    assert sweep.parse_grid(item) == (key, values)


def test_the_grid_is_the_cartesian_product_of_the_configs_grid_and_the_options(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    data = str(REPO / "configs" / "data" / "qa_sample.jsonl")
    text = Path(TINY_SLURM).read_text().replace("data/qa_sample.jsonl", data)
    config.write_text(text + "sweep:\n  grid:\n    training.seed: [1, 2, 3]\n  max_parallel: 3\n")
    plan = sweep.plan_sweep(config, [], ["moe.top_k=1,2"])
    assert plan.grid == {"training.seed": [1, 2, 3], "moe.top_k": [1, 2]}
    assert plan.values[:2] == [{"training.seed": 1, "moe.top_k": 1}, {"training.seed": 1, "moe.top_k": 2}]
    assert [(c.training.seed, c.moe.top_k) for c in plan.configs] == [
        (s, k) for s in (1, 2, 3) for k in (1, 2)
    ]
    assert plan.max_parallel == 3 and all(c.sweep is None for c in plan.configs)
    assert sweep.plan_sweep(config, [], ["training.seed=7"], max_parallel=1).grid == {"training.seed": [7]}


def test_every_bad_element_is_named_with_its_field_and_nothing_is_created(
    fake: FakeSlurm, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    result = runner.invoke(
        app,
        ["sweep", TINY_SLURM, "--grid", "training.learning_rate=1.0e-3,-1", "--grid", "moe.ep_size=2,3",
         "--home", str(home)],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 3, result.output  # elements 1, 2 and 3; element 0 is valid
    assert lines[0].startswith(
        "error: sweep element 1 (training.learning_rate=0.001, moe.ep_size=3): moe.ep_size:"
    )
    assert "sweep element 2 (training.learning_rate=-1, moe.ep_size=2): training.learning_rate:" in lines[1]
    assert "Traceback" not in result.output
    assert not home.exists() and fake.count("sbatch") == 0


def test_a_grid_that_changes_the_slurm_options_is_refused(fake: FakeSlurm, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        sweep.plan_sweep(TINY_SLURM, [], ["cluster.time_min=5,10"])
    assert (
        "sweep element 1 (cluster.time_min=10): its SLURM options differ from element 0's (--time=10)"
        in str(info.value)
    )


def test_no_grid_is_an_error_that_shows_the_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pass --grid KEY=V1,V2"):
        sweep.plan_sweep(TINY_SLURM, [], [])


# --- one array ----------------------------------------------------------------------------------


def test_a_sweep_is_one_array_submission_with_a_run_per_element(fake: FakeSlurm, tmp_path: Path) -> None:
    sweep_dir = _sweep(tmp_path)
    assert fake.count("sbatch") == 1
    script = fake.array_scripts["100"]
    assert "#SBATCH --array=0-3%2" in script
    assert f"#SBATCH --output={sweep_dir}/elements/%a/logs/%A_%a_sbatch.out" in script
    assert f"-m submitit.core._submit {sweep_dir}/elements/%a/logs" in script
    assert script == (sweep_dir / "array.sh").read_text()
    rec = sweeps.read_sweep(sweep_dir)
    assert rec.array_job_id == "100" and rec.max_parallel == 2
    rendered = (sweep_dir / rec.elements[0].run_id / "rendered" / "sbatch.sh").read_text()
    own = [
        ln
        for ln in rendered.splitlines()
        if ln.startswith("#SBATCH") and "--output" not in ln and "--error" not in ln
    ]
    assert [ln for ln in script.splitlines() if ln in own] == own, "the rendered options, in order"
    for k, element in enumerate(rec.elements):
        run_dir = sweep_dir / element.run_id
        assert (sweep_dir / "elements" / str(k)).resolve() == run_dir.resolve()
        r = runs.read_run(run_dir)
        assert [a.job_id for a in r.attempts] == [f"100_{k}"] and r.state == RunState.PENDING
        assert (run_dir / "logs" / f"100_{k}_submitted.pkl").is_file()
        assert runs.find_run(tmp_path, element.run_id) == run_dir, "an element is found by its run id"
    assert [e.values["moe.top_k"] for e in rec.elements] == [1, 2, 1, 2]


def test_array_task_ids_in_squeue_sacct_and_log_names() -> None:
    queue = scheduler.parse_squeue(
        "12_3|RUNNING|None|n[1-2]|2026-11-28T15:20:01|2026-11-28T15:20:05\n"
        "12_[4-5%2]|PENDING|JobArrayTaskLimit|(null)|2026-11-28T15:20:01|N/A\n"
    )
    assert list(queue) == ["12_3"]
    acct = scheduler.parse_sacct(
        "12_3|REQUEUED|0:0|2026-11-28T15:20:01|2026-11-28T15:20:05|2026-11-28T15:21:00|n[1-2]\n"
        "12_3|RUNNING|0:0|2026-11-28T15:20:01|2026-11-28T15:21:12|Unknown|n[1-2]\n"
        "12_3.batch|COMPLETED|0:0|2026-11-28T15:20:01|2026-11-28T15:20:05|2026-11-28T15:21:00|n1\n"
    )
    assert [r.state for r in acct["12_3"]] == ["REQUEUED", "RUNNING"]
    assert sorted(["12_10", "9", "12_2", "12"], key=scheduler.job_sort_key) == ["9", "12", "12_2", "12_10"]
    m = _FILE_RE.match("12_3_1_log.err")
    assert m and m.groups() == ("12_3", "1", "err")
    m = _FILE_RE.match("12_1_log.out")
    assert m and m.groups() == ("12", "1", "out")


def test_a_poll_asks_squeue_for_every_array_task_one_per_line(fake: FakeSlurm, tmp_path: Path) -> None:
    sweep_dir = _sweep(tmp_path)
    fake.set_state("100_1", "RUNNING")
    sweep_ops.sweep_status(sweep_dir)
    (squeue,) = [c for c in fake.calls if c[0] == "squeue"]
    assert "-r" in squeue and squeue[squeue.index("-j") + 1] == "100_0,100_1,100_2,100_3"
    assert fake.count("sacct") == 1


def test_an_array_task_knows_its_job_id_and_derives_its_port_from_its_own_id() -> None:
    env = {
        "SLURM_JOB_ID": "1236", "SLURM_ARRAY_JOB_ID": "1234", "SLURM_ARRAY_TASK_ID": "2", "SLURM_PROCID": "0",
        "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_RESTART_COUNT": "1",
    }  # fmt: skip
    info = resolve_dist(env)
    assert info.job_id == "1234_2" and info.attempt_key == "1234_2.1"
    assert info.master_port == 20000 + 1236, "unique per task: two tasks on one node never collide"


# --- the commands on a sweep --------------------------------------------------------------------


def _finish(run_dir: Path, step: int, eval_loss: float) -> None:
    key = runs.read_run(run_dir).attempts[0].job_id
    reports.append_event(run_dir, "start", job_id=key, restart=0, attempt_key=f"{key}.0", nodes=["n1", "n2"])
    reports.append_eval(run_dir, step, eval_loss)
    reports.write_progress(
        run_dir, step=step, total_steps=30, epoch=0, loss=eval_loss + 0.5, tokens_per_s=1.0, step_time_s=0.1,
        attempt_key=f"{key}.0",
    )  # fmt: skip
    reports.append_event(run_dir, "exit", reason="completed", step=step, requeued=False, error=None)


def test_status_sweep_has_a_row_per_element_and_marks_the_lowest_eval_loss(
    fake: FakeSlurm, tmp_path: Path
) -> None:
    sweep_dir = _sweep(tmp_path)
    dirs = sweep_ops.element_dirs(sweep_dir)
    for run_dir, loss in zip(dirs[:3], (2.5, 1.25, 3.0), strict=True):
        _finish(run_dir, 30, loss)
    result = runner.invoke(app, ["status", sweep_dir.name, "--json", "--home", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["best"] == 1 and [e["best"] for e in data["elements"]] == [False, True, False, False]
    assert [e["state"] for e in data["elements"]] == ["completed"] * 3 + ["pending"]
    assert [e["eval_loss"] for e in data["elements"]] == [2.5, 1.25, 3.0, None]
    assert data["elements"][1]["values"] == {"training.learning_rate": 0.001, "moe.top_k": 2}
    assert data["elements"][1]["step"] == 30 and data["elements"][1]["loss"] == 1.75
    shown = runner.invoke(app, ["status", sweep_dir.name, "--home", str(tmp_path)]).output
    header = shown.splitlines()[1].split()
    assert header[:3] == ["k", "training.learning_rate", "moe.top_k"] and "goodput" in header
    best_row = next(ln for ln in shown.splitlines() if ln.startswith("1 "))
    assert best_row.rstrip().endswith("*") and "1.2500" in best_row
    assert "best (lowest eval loss): element 1" in shown


def test_status_of_a_sweep_of_100_elements_takes_under_a_second(fake: FakeSlurm, tmp_path: Path) -> None:
    sweep_dir = _sweep(tmp_path, ["training.seed=" + ",".join(str(s) for s in range(100))], max_parallel=10)
    assert "#SBATCH --array=0-99%10" in fake.array_scripts["100"]
    # NOTE: the first poll after the submission rewrites every run.json (scheduler state seen):
    # 100 atomic, fsynced writes; later polls write only the records that changed.
    first = runner.invoke(app, ["status", sweep_dir.name, "--home", str(tmp_path)])
    assert first.exit_code == 0, first.output
    assert fake.count("squeue") == 1 and fake.count("sacct") == 1, "one batched query for all elements"
    started = time.perf_counter()
    result = runner.invoke(app, ["status", sweep_dir.name, "--home", str(tmp_path)])
    took = time.perf_counter() - started
    assert result.exit_code == 0, result.output
    assert result.output.count("pending") == 100
    assert took < 1.0, f"status SWEEP of 100 elements took {took:.2f} s"


# --- the plain `status` table: one row per sweep ---------------------------------------------------

TABLE_HEADER = ["run", "state", "attempts", "step", "progress", "loss", "tokens/s", "eta", "age"]


def _completed(fake: FakeSlurm, run_dir: Path, eval_loss: float) -> None:
    """An element that finished: its worker's events, and SLURM's final record of its job."""
    _finish(run_dir, 30, eval_loss)
    job = runs.read_run(run_dir).attempts[0].job_id
    assert job is not None
    fake.set_state(job, None)  # gone from squeue
    fake.add_acct(job, "COMPLETED")


def _local_run(home: Path, name: str, *, created: float) -> str:
    """A completed local run beside the sweep (ended 30 s after it was created)."""
    run_id = runs.new_run_id(name, now=created)
    run_dir = home / run_id
    run_dir.mkdir()
    attempt = Attempt(
        number=1, job_id="1", attempt_key="1.0", submitted=created, started=created + 1, ended=created + 30,
        state=AttemptState.ENDED, stop_reason=StopReason.COMPLETED,
    )  # fmt: skip
    rec = RunRecord(
        run_id=run_id, name=name, config_hash="x", created=created, executor="local", run_dir=str(run_dir),
        home=str(home), attempts=[attempt], state=RunState.COMPLETED,
    )  # fmt: skip
    runs.write_run(run_dir, rec)
    return run_id


def _cells(header: str, line: str) -> list[str]:
    """A table line cut at the header's column starts."""
    starts = [i for i, c in enumerate(header) if c != " " and (i == 0 or header[i - 1] == " ")]
    return [line[a:b] for a, b in zip(starts, [*starts[1:], None], strict=True)]


def test_the_status_table_shows_a_sweep_as_one_row_that_counts_its_elements(
    fake: FakeSlurm, tmp_path: Path
) -> None:
    older = _local_run(tmp_path, "older", created=time.time() - 7200)
    sweep_dir = _sweep(tmp_path)  # 4 elements: array job 100
    dirs = sweep_ops.element_dirs(sweep_dir)
    _completed(fake, dirs[0], 2.5)
    _completed(fake, dirs[1], 1.25)
    fake.set_state("100_2", "RUNNING")  # element 3 is still pending
    result = runner.invoke(app, ["status", "--home", str(tmp_path)])
    assert result.exit_code == 0, result.output
    header, *lines = result.stdout.splitlines()
    assert header.split() == TABLE_HEADER, "the same columns as a home without sweeps"
    assert [line.split()[0] for line in lines] == [older, sweep_dir.name], "no row per element"
    row = dict(zip(TABLE_HEADER, (cell.strip() for cell in _cells(header, lines[1])), strict=True))
    assert row == {
        "run": sweep_dir.name, "state": "sweep", "attempts": "4",
        "step": "1 pending, 1 running, 2 completed",  # the elements, by state
        "progress": "██████░░░░░░",  # 2 of 4 elements finished
        "loss": "eval 1.2500",  # the lowest eval loss (`status SWEEP` names the element)
        "tokens/s": "-", "eta": "-", "age": row["age"],
    }  # fmt: skip
    assert fake.count("squeue") == 1 and fake.count("sacct") == 1, "one query for the runs and all elements"


def test_a_finished_sweep_comes_from_the_row_cache_and_counts_as_one_finished_run(
    fake: FakeSlurm, tmp_path: Path
) -> None:
    sweep_dir = _sweep(tmp_path)
    for run_dir, loss in zip(sweep_ops.element_dirs(sweep_dir), (2.5, 1.25, 3.0, 2.0), strict=True):
        _completed(fake, run_dir, loss)
    cold = status.list_status(tmp_path)
    (row,) = cold.rows
    assert (row["state"], row["step"], row["loss"]) == ("sweep", "4 completed", "eval 1.2500")
    assert cold.polled == 4
    # Every element is final and settled: its row (and eval loss) is cached like a finished run's,
    # and the next `status` asks the scheduler nothing.
    queries = fake.count("squeue") + fake.count("sacct")
    warm = status.list_status(tmp_path)
    assert (warm.polled, warm.cached) == (0, 4)
    assert [{**r, "age": ""} for r in warm.rows] == [{**r, "age": ""} for r in cold.rows]
    assert fake.count("squeue") + fake.count("sacct") == queries
    # A finished sweep is one finished entry among the runs: with a newer finished run and room
    # for one, it is the one left out.
    newer = _local_run(tmp_path, "newer", created=time.time() + 60)
    latest = status.list_status(tmp_path, recent=1)
    assert [r["run"] for r in latest.rows] == [newer] and latest.hidden_finished == 1


def test_cancel_sweep_cancels_every_element_and_logs_take_an_element(fake: FakeSlurm, tmp_path: Path) -> None:
    sweep_dir = _sweep(tmp_path)
    dirs = sweep_ops.element_dirs(sweep_dir)
    _finish(dirs[0], 30, 1.0)
    runner.invoke(app, ["status", sweep_dir.name, "--home", str(tmp_path)])  # element 0: completed
    (dirs[2] / "logs" / "100_2_0_log.out").write_text("hello from element 2\n")
    logs = runner.invoke(app, ["logs", sweep_dir.name, "--element", "2", "--home", str(tmp_path)])
    assert logs.exit_code == 0 and "hello from element 2" in logs.output, logs.output
    bad = runner.invoke(app, ["logs", sweep_dir.name, "--element", "9", "--home", str(tmp_path)])
    assert bad.exit_code == 2 and "elements 0..3" in bad.output
    missing = runner.invoke(app, ["logs", sweep_dir.name, "--home", str(tmp_path)])
    assert missing.exit_code == 2 and "--element K" in missing.output
    result = runner.invoke(app, ["cancel", sweep_dir.name, "--home", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "already completed" in result.output
    assert sorted(c[-1] for c in fake.calls if c[0] == "scancel") == ["100_1", "100_2", "100_3"]
    assert [runs.read_run(d).state for d in dirs] == [RunState.COMPLETED] + [RunState.CANCELLED] * 3


def test_dry_run_prints_the_elements_the_rendered_files_and_slurms_estimate(
    fake: FakeSlurm, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    result = runner.invoke(app, ["sweep", TINY_SLURM, *(a for g in GRID for a in ("--grid", g)), "--dry-run",
                                 "--home", str(home)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "# 4 elements, one job array --array=0-3%4" in result.output
    assert "element 3: training.learning_rate=0.003, moe.top_k=2" in result.output
    assert result.output.count("rendered/sbatch.sh ---") == 4 and "top_k: 2" in result.output
    assert "# queue estimate (sbatch --test-only): Job 4242 to start at 2031-01-01T00:00:00" in result.output
    (test_only,) = [c for c in fake.calls if c[0] == "sbatch"]
    assert "--test-only" in test_only
    assert not home.exists()
    single = runner.invoke(app, ["submit", TINY_SLURM, "--dry-run", "--home", str(home)])
    assert "# queue estimate (sbatch --test-only): Job 4242" in single.output


def test_watch_follows_the_elements_of_a_sweep_by_name_and_by_default(
    fake: FakeSlurm, tmp_path: Path
) -> None:
    sweep_dir = _sweep(tmp_path)
    names = [d.name for d in sweep_ops.element_dirs(sweep_dir)]
    for args in (["watch", sweep_dir.name], ["watch"]):
        result = runner.invoke(app, [*args, "--once", "--home", str(tmp_path)])
        assert result.exit_code == 0, result.output
        assert all(f"{name}: pending" in result.output for name in names), result.output
