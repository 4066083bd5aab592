"""The scheduler backend interface: `backend_for(executor)`, each backend's login-node side against
a fake SLURM or this machine's processes, and the in-job side every rank imports."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeSlurm
from helpers import REPO

from orchestrator.backends import EXECUTORS, backend_for
from orchestrator.backends.local import (
    LocalBackend,
    LocalObservation,
    LocalRunningJob,
    children_take_sigint,
    controller_alive,
)
from orchestrator.backends.slurm import scheduler
from orchestrator.backends.slurm.backend import SlurmBackend, SlurmObservation
from orchestrator.backends.slurm.injob import SlurmRunningJob
from orchestrator.errors import SchedulerError, UnknownExecutorError
from orchestrator.rundir.runs import Attempt, AttemptState, RunRecord, RunState
from orchestrator.spec.schema import ClusterConfig
from worker.dist import resolve_dist
from worker.signals import running_job


@pytest.fixture
def fake() -> Iterator[FakeSlurm]:
    with FakeSlurm().context() as f:
        yield f


def record(run_dir: Path, executor: str, *job_ids: str, state: RunState = RunState.RUNNING) -> RunRecord:
    rec = RunRecord(
        run_id=run_dir.name, name="r", config_hash="x", created=time.time() - 100, executor=executor,
        run_dir=str(run_dir), home=str(run_dir.parent), state=state,
    )  # fmt: skip
    for n, job in enumerate(job_ids, start=1):
        rec.attempts.append(Attempt(number=n, job_id=job, submitted=time.time() - 60))
    return rec


# --- backend_for ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("executor", "cls"), [("slurm", SlurmBackend), ("local", LocalBackend)])
def test_backend_for_gives_the_backend_of_each_executor(executor: str, cls: type) -> None:
    backend = backend_for(executor)
    assert isinstance(backend, cls)
    assert backend.name == executor
    assert backend_for(executor) is backend, "one backend object per executor"


def test_every_executor_the_schema_accepts_has_a_backend() -> None:
    choices = typing.get_args(ClusterConfig.model_fields["executor"].annotation)
    assert sorted(choices) == sorted(EXECUTORS)


def test_an_unknown_executor_names_the_valid_ones() -> None:
    with pytest.raises(
        UnknownExecutorError, match=r"unknown executor 'pbs'.*Valid executors are: local, slurm"
    ):
        backend_for("pbs")
    assert UnknownExecutorError.exit_code == 2


def test_lifecycle_code_never_branches_on_the_executor() -> None:
    # docs/design.md (Layering): lifecycle code has no executor branches; each is a backend method.
    branch = re.compile(r"executor\s*[!=]=|[!=]=\s*[\"'](slurm|local)[\"']")
    files = sorted(p for part in ("lifecycle", "cli") for p in (REPO / "orchestrator" / part).glob("*.py"))
    found = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for path in files
        for n, line in enumerate(path.read_text().splitlines(), start=1)
        if branch.search(line)
    ]
    assert not found, "ask the backend instead:\n" + "\n".join(found)


# --- SLURM, login node -------------------------------------------------------------------------------


def test_one_squeue_and_one_sacct_for_the_jobs_of_all_runs(fake: FakeSlurm, tmp_path: Path) -> None:
    for _ in range(3):
        fake._sbatch(["x"])  # jobs 100, 101, 102
    fake.set_state("100", "RUNNING")
    a = record(tmp_path / "a", "slurm", "100")
    b = record(tmp_path / "b", "slurm", "101")
    done = record(tmp_path / "done", "slurm", "102", state=RunState.COMPLETED)
    done.attempts[0].state, done.attempts[0].ended = AttemptState.ENDED, time.time() - 3600
    observed = SlurmBackend().observe([(tmp_path / "a", a), (tmp_path / "b", b), (tmp_path / "done", done)])
    assert fake.count("squeue") == 1 and fake.count("sacct") == 1
    (squeue,) = [c for c in fake.calls if c[0] == "squeue"]
    assert squeue[squeue.index("-j") + 1] == "100,101", "a settled final run is not asked about"
    assert observed[tmp_path / "a"].alive("100")
    assert observed[tmp_path / "b"].alive("101")  # PENDING
    assert not observed[tmp_path / "a"].alive("999")


def test_nothing_to_ask_means_no_scheduler_call(fake: FakeSlurm, tmp_path: Path) -> None:
    observed = SlurmBackend().observe([(tmp_path, record(tmp_path, "slurm"))])
    assert fake.calls == []
    assert not observed[tmp_path].alive("100")


def test_slurm_cancel_tolerates_a_job_that_already_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = {
        "7": "scancel: error: Kill job error on job id 7: Job/step already completing or completed",
        "8": "scancel: error: Invalid job id specified",
        "9": "scancel: error: Access/permission denied",
    }

    def fake_run(args: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(args, 1, "", answers[args[-1]])

    monkeypatch.setattr(scheduler, "_run", fake_run)
    SlurmBackend().cancel("7")
    SlurmBackend().cancel("8")
    with pytest.raises(SchedulerError, match="permission denied"):
        SlurmBackend().cancel("9")


def test_a_cancelled_slurm_job_still_alive_is_cancelled_again(fake: FakeSlurm) -> None:
    fake._sbatch(["x"])
    fake.set_state("100", "RUNNING")
    seen = SlurmObservation(scheduler.query(["100"]))
    assert SlurmBackend().cancel_again("100", seen)
    assert fake.calls[-1] == ["scancel", "100"]
    assert not SlurmBackend().cancel_again("100", SlurmObservation(None))
    assert fake.count("scancel") == 1


def test_slurm_config_checks_and_warnings() -> None:
    from orchestrator.errors import ConfigError
    from orchestrator.spec.loading import load_config

    cfg = load_config("tiny-slurm", ["cluster.time_min=1", "cluster.signal_delay_s=40"])
    warnings = SlurmBackend().config_warnings(cfg)
    assert any("more than half of time_min" in w for w in warnings)
    bad = load_config("tiny-slurm", ['cluster.account="a\\tb"'])
    with pytest.raises(ConfigError):
        SlurmBackend().check_config(bad)
    LocalBackend().check_config(bad)  # no sbatch: nothing SLURM-only to check
    assert LocalBackend().config_warnings(cfg) == []


# --- local executor, login node ----------------------------------------------------------------------


def test_a_local_job_is_alive_only_while_its_submitit_controller_runs(tmp_path: Path) -> None:
    other = subprocess.Popen(["sleep", "30"])  # alive, but not submitit's controller
    try:
        assert not controller_alive(str(other.pid))
        assert not controller_alive("not-a-pid")
        rec = record(tmp_path, "local", str(other.pid))
        backend = LocalBackend()
        (seen,) = backend.observe([(tmp_path, rec)]).values()
        assert not seen.alive(str(other.pid))
        assert not backend.needs_scheduler(rec)
        assert backend.unhealthy_nodes(["n1"]) == []
        assert not backend.cancel_again(str(other.pid), LocalObservation({str(other.pid): True}))
        backend.cancel(str(other.pid))  # not submitit's controller: no signal is sent
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_a_local_controller_pid_is_recognised(tmp_path: Path) -> None:
    # A process whose command line names submitit, like `python -m submitit.local._local <folder>`,
    # started as the local executor starts its controllers.
    code = "import time; time.sleep(30)  # submitit"
    with children_take_sigint():
        proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.time() + 10
        while not controller_alive(str(proc.pid)) and time.time() < deadline:
            time.sleep(0.05)
        rec = record(tmp_path, "local", str(proc.pid))
        assert LocalBackend().observe([(tmp_path, rec)])[tmp_path].alive(str(proc.pid))
        LocalBackend().cancel(str(proc.pid))  # SIGINT, like submitit's LocalJob.cancel()
        assert proc.wait(timeout=10) != 0
    finally:
        proc.kill()
        proc.wait()
    assert not controller_alive(str(proc.pid))


def _ignores_sigint(pid: int) -> bool:
    mask = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("SigIgn:"))
    return bool(int(mask.split()[1], 16) & (1 << (signal.SIGINT - 1)))


def test_a_local_controller_takes_sigint_even_from_a_submitter_that_ignores_it() -> None:
    # `nohup moe-orch submit ... &` (or any background job of a script) ignores SIGINT, and an
    # ignored signal stays ignored in the children: the controller would never see `cancel`.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        sleeper = [sys.executable, "-c", "import time; time.sleep(30)"]
        plain = subprocess.Popen(sleeper)
        with children_take_sigint():
            controller = subprocess.Popen(sleeper)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # this process: as it was
        time.sleep(0.3)  # both have exec'd
        assert _ignores_sigint(plain.pid) and not _ignores_sigint(controller.pid)
        for proc in (plain, controller):
            proc.kill()
            proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_submitit_parameters_of_each_backend(tmp_path: Path) -> None:
    from orchestrator.render.files import sbatch_options
    from orchestrator.spec.loading import load_config

    local = load_config(
        "tiny-slurm", ["cluster.executor=local", "cluster.nodes=1", "cluster.tasks_per_node=2"]
    )
    params = LocalBackend().submitit_parameters(local, [])
    assert params["nodes"] == 1 and params["timeout_min"] == local.cluster.time_min
    cfg = load_config("tiny-slurm")
    params = SlurmBackend().submitit_parameters(cfg, sbatch_options(cfg, tmp_path))
    assert params["nodes"] == cfg.cluster.nodes and "signal" not in params["additional_parameters"]


# --- inside the job ---------------------------------------------------------------------------------


def test_a_rank_under_slurm_asks_slurm_and_one_outside_asks_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    slurm_env = {
        "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "57", "SLURM_JOB_NODELIST": "n1",
        "SLURM_RESTART_COUNT": "2",
    }  # fmt: skip
    assert running_job(resolve_dist(slurm_env)) == SlurmRunningJob("57", 2)
    local_env = {
        "SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "933", "SUBMITIT_LOCAL_NTASKS": "1",
        "SUBMITIT_LOCAL_GLOBALID": "0", "SUBMITIT_LOCAL_LOCALID": "0", "SUBMITIT_LOCAL_TIMEOUT_S": "600",
    }  # fmt: skip
    job = running_job(resolve_dist(local_env, master_port=29500), local_env)
    assert isinstance(job, LocalRunningJob) and job.timeout_s == 600
    assert not job.requeue() and not job.term_is_cancellation()

    def no_scheduler(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a local job must not call SLURM")

    monkeypatch.setattr("orchestrator.backends.slurm.injob.subprocess.run", no_scheduler)
    assert not job.requeue()


@pytest.mark.parametrize(
    ("returncode", "line", "cancelled"),
    [
        (0, "JobId=145 Restarts=0 JobState=COMPLETING PreemptTime=None", True),  # scancel
        (0, "JobId=146 Restarts=1 JobState=COMPLETING PreemptTime=None", False),  # scontrol requeue
        (1, "", False),  # scontrol cannot tell: not a cancellation (the job may be requeued)
    ],
)
def test_a_slurm_job_asks_scontrol_whether_its_sigterm_was_a_cancellation(
    monkeypatch: pytest.MonkeyPatch, returncode: int, line: str, cancelled: bool
) -> None:
    def fake_run(args: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        assert args == ["scontrol", "show", "job", "-o", "145"]
        return subprocess.CompletedProcess(args, returncode, line, "")

    monkeypatch.setattr("orchestrator.backends.slurm.injob.subprocess.run", fake_run)
    assert SlurmRunningJob("145", restart_count=0).term_is_cancellation() is cancelled


def test_the_in_job_side_imports_no_login_node_library() -> None:
    code = (
        "import sys, orchestrator.backends.slurm.injob, orchestrator.backends.local, worker.signals; "
        "heavy = {'jinja2', 'typer', 'rich', 'submitit', 'torch'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
