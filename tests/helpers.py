"""Helpers for the tests: the repository root, a free port, and for end-to-end tests the CLI as a
subprocess, run files, waits and the localhost SLURM. Test modules import them (`from helpers import
REPO`): pytest puts tests/ on sys.path, as tests/ is not a package.

Every wait polls with a deadline and fails with what it last saw, never sleeps blindly.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from orchestrator.rundir import reports

REPO = Path(__file__).resolve().parents[1]
NODE_SH = REPO / "tools" / "slurm-local" / "node.sh"
FINAL = ("completed", "failed", "cancelled")

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a rendezvous or a gloo group)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cluster_up() -> bool:
    """Whether the localhost SLURM answers (`scontrol ping` says UP)."""
    if shutil.which("scontrol") is None or not os.environ.get("SLURM_CONF"):
        return False
    try:
        res = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0 and "UP" in res.stdout


def moe_orch(*args: str, home: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would (a subprocess), with the runs under `home`."""
    env = dict(os.environ, MOE_ORCH_HOME=str(home), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def submit(home: Path, *sets: str) -> tuple[str, Path]:
    """`moe-orch submit configs/tiny-slurm.yaml --set ...` (no --wait); returns (run id, run dir)."""
    args = ["submit", "configs/tiny-slurm.yaml"]
    for s in sets:
        args += ["--set", s]
    res = moe_orch(*args, home=home)
    assert res.returncode == 0, res.stdout + res.stderr
    run_id = res.stdout.splitlines()[0].strip()
    return run_id, home / run_id


def status_json(run_id: str, home: Path) -> dict[str, Any]:
    """`moe-orch status RUN --json` (which also reconciles run.json)."""
    res = moe_orch("status", run_id, "--json", home=home)
    assert res.returncode == 0, res.stdout + res.stderr
    data: dict[str, Any] = json.loads(res.stdout)
    return data


def run_json(run_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((run_dir / "run.json").read_text())
    return data


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.5) -> T:
    """Call `probe` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.time() + timeout
    last: T | None = None
    while time.time() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def events(run_dir: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """events.jsonl (a torn last line is skipped), optionally only one kind."""
    return [ev for ev in reports.read_events(run_dir) if kind is None or ev["event"] == kind]


def progress_step(run_dir: Path) -> int:
    """The step in progress.json (0 before the first one)."""
    step = (reports.read_progress(run_dir) or {}).get("step")
    return step if isinstance(step, int) else 0


def wait_step(run_dir: Path, step: int, timeout: float = 120) -> int:
    """Wait until the worker reported optimizer step >= `step` (progress.json)."""
    wait_for(f"step {step} in {run_dir.name}", lambda: progress_step(run_dir) >= step, timeout)
    return progress_step(run_dir)


def wait_final(run_id: str, home: Path, timeout: float = 240, interval: float = 2) -> dict[str, Any]:
    """Poll `status --json` until the run is completed, failed or cancelled."""

    def probe() -> dict[str, Any] | None:
        rec = status_json(run_id, home)
        return rec if rec["state"] in FINAL else None

    return wait_for(f"{run_id} to end", probe, timeout, interval)


def wait_state(run_id: str, home: Path, states: tuple[str, ...], timeout: float = 90) -> dict[str, Any]:
    """Poll `status --json` until the run's state is one of `states` (or final); returns it."""

    def probe() -> dict[str, Any] | None:
        rec = status_json(run_id, home)
        return rec if rec["state"] in (*states, *FINAL) else None

    return wait_for(f"{run_id} to be {'/'.join(states)}", probe, timeout, 1)


def watch_until_final(run_id: str, home: Path, timeout: float = 300) -> tuple[dict[str, Any], str]:
    """`moe-orch watch RUN --interval 2` (it exits when the run is final); its output too."""
    res = moe_orch("watch", run_id, "--interval", "2", home=home, timeout=timeout)
    assert res.returncode == 0, res.stdout + res.stderr
    return status_json(run_id, home), res.stdout


def run_report(run_id: str, home: Path, tail: int = 30) -> str:
    """What a user would look at for a run that went wrong: `moe-orch status RUN`, the last lines
    of every rank's stdout and stderr (each attempt) and of events.jsonl, and the nodes' states."""
    parts: list[str] = []
    for title, args in (
        ("status", ("status", run_id)),
        ("logs", ("logs", run_id, "--tail", str(min(tail, 10)))),
        ("logs --stderr", ("logs", run_id, "--stderr", "--tail", str(tail))),
    ):
        try:
            res = moe_orch(*args, home=home, timeout=60)
            text = res.stdout + res.stderr
        except (OSError, subprocess.SubprocessError) as exc:
            text = f"({exc})"
        parts.append(f"--- moe-orch {title}\n{text.rstrip()}")
    try:
        lines = (home / run_id / "events.jsonl").read_text().splitlines()[-tail:]
    except OSError as exc:
        lines = [f"({exc})"]
    parts.append("--- events.jsonl\n" + "\n".join(lines))
    nodes = subprocess.run(
        ["sinfo", "-N", "-h", "-o", "%N %T %E"], capture_output=True, text=True, check=False
    )
    parts.append(f"--- sinfo\n{(nodes.stdout + nodes.stderr).rstrip()}")
    return "\n".join(parts)


@contextlib.contextmanager
def report_on_failure(run_id: str, home: Path) -> Iterator[None]:
    """A failure inside (an assertion, a wait that timed out) also shows `run_report`: pytest
    deletes old tmp folders, so the failure message is all that is left of a rare failure."""
    try:
        yield
    except Exception as exc:
        exc.add_note(run_report(run_id, home))
        raise


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every training line of metrics.jsonl, in file order (eval lines skipped)."""
    return [(int(rec["step"]), float(rec["loss"])) for rec in reports.read_metrics(run_dir) if "loss" in rec]


def checkpoint_tensors(ckpt: Path) -> dict[str, Any]:
    """Every weight tensor of a checkpoint: the non-expert module and each expert file (torch)."""
    import torch

    tensors: dict[str, Any] = {}
    for path in sorted(ckpt.glob("*model_states.pt")):
        state = torch.load(path, map_location="cpu", weights_only=False)
        # mp_rank_00_model_states.pt: {"module": non-expert weights, ...}; expert files: the weights
        for key, value in (state["module"] if "module" in state else state).items():
            tensors[f"{path.name}:{key}"] = value
    assert tensors, f"no model states in {ckpt}"
    return tensors


def scontrol(*args: str) -> str:
    res = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, f"scontrol {' '.join(args)}: {res.stderr}"
    return res.stdout


def job_field(job_id: str, field: str) -> str | None:
    """One `Key=Value` of `scontrol show job` (None once the job is gone)."""
    res = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=False)
    for token in res.stdout.split():
        key, _, value = token.partition("=")
        if key == field:
            return value
    return None


def queue_state(job_id: str) -> str:
    """The job's state in squeue (`PENDING`, `RUNNING`, ...; "" once it is gone)."""
    res = subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, check=False
    )
    return res.stdout.strip()


def sacct_rows(job_id: str) -> list[dict[str, str]]:
    """`sacct -D -X` rows of a job (one per run of a requeued job), oldest first."""
    fields = ["JobIDRaw", "State", "ExitCode", "Start", "End", "NodeList", "Partition"]
    res = subprocess.run(
        ["sacct", "-D", "-X", "-P", "-n", "-j", job_id, f"--format={','.join(fields)}"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    return [dict(zip(fields, ln.split("|"), strict=True)) for ln in res.stdout.splitlines() if ln.strip()]


def slurm_epoch(text: str) -> float:
    return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))


def rank_pid(job_id: str, rank: int) -> int | None:
    """The pid of the python process running global rank `rank` of SLURM job `job_id`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            # NOTE: the python itself, not `srun ... python -m submitit.core._submit` (same env).
            is_python = Path(cmdline[0].decode()).name.startswith("python")
            if b"submitit.core._submit" not in cmdline or not is_python:
                continue
            env = dict(
                item.split(b"=", 1) for item in (entry / "environ").read_bytes().split(b"\0") if b"=" in item
            )
        except OSError:
            continue
        if env.get(b"SLURM_JOB_ID") == job_id.encode() and env.get(b"SLURM_PROCID") == str(rank).encode():
            return int(entry.name)
    return None


def node_sh(action: str, node: str) -> None:
    subprocess.run(["bash", str(NODE_SH), action, node], check=True, capture_output=True, timeout=120)


def node_state(node: str) -> str:
    res = subprocess.run(
        ["sinfo", "-h", "-N", "-n", node, "-o", "%T"], capture_output=True, text=True, check=False
    )
    return res.stdout.strip().splitlines()[0] if res.stdout.strip() else ""


def write_event(run_dir: Path, **ev: Any) -> None:
    """Append one worker event to events.jsonl, as rank 0 would (`time` defaults to now)."""
    ev.setdefault("time", time.time())
    with (run_dir / "events.jsonl").open("a") as f:
        f.write(json.dumps(ev) + "\n")


def write_start(run_dir: Path, job: str, restart: int = 0, step: int = 0) -> None:
    """A `start` event of a 2-rank attempt on n1,n2 of SLURM job `job`."""
    write_event(
        run_dir, event="start", job_id=job, restart=restart, attempt_key=f"{job}.{restart}",
        nodes=["n1", "n2"], world_size=2, resumed_from=None, resumed_step=step, steps_redone=0,
    )  # fmt: skip


class WebhookServer:
    """A local webhook (http://127.0.0.1:<port>/hook): every JSON body POSTed to it, in arrival
    order, answered with `status`. `shutdown()` when done."""

    def __init__(self, status: int = 200) -> None:
        from http.server import BaseHTTPRequestHandler, HTTPServer

        self.bodies: list[dict[str, Any]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                hook.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def shutdown(self) -> None:
        self.server.shutdown()
