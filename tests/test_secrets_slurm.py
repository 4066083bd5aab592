"""Secrets on the localhost SLURM cluster (tools/slurm-local/start.sh): a name in
`cluster.env_passthrough` and a variable only in the submitting shell both reach every rank through
SLURM's export of the submitting environment, and no file of the run holds either value.

Skipped unless `scontrol ping` answers (source /tmp/slurm-local/env.sh first).
"""

from __future__ import annotations

import secrets
from functools import partial
from pathlib import Path

import pytest
from helpers import moe_orch, rank_pid, status_json, wait_final, wait_for

pytestmark = pytest.mark.slow  # the localhost SLURM: skipped when it is down (tests/conftest.py)

PASSED = "MOE_ORCH_TEST_PASSTHROUGH"  # named in cluster.env_passthrough (no secret-looking word)
SHELL_ONLY = "MOE_ORCH_TEST_SHELL_TOKEN"  # only in the submitting shell's environment


def rank_environ(job_id: str, rank: int) -> dict[bytes, bytes] | None:
    """The environment global rank `rank` of `job_id` was started with (/proc/<pid>/environ)."""
    pid = rank_pid(job_id, rank)
    if pid is None:
        return None
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # the rank ended in between
        return None
    return dict(item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)


def files_holding(root: Path, values: dict[str, str]) -> list[str]:
    """`relative path: NAME` for every file under `root` whose bytes hold one of the values."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        found += [f"{path.relative_to(root)}: {name}" for name, v in values.items() if v.encode() in data]
    return found


def test_passed_and_shell_variables_reach_every_rank_and_no_run_file_holds_their_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = {PASSED: f"passed-{secrets.token_hex(16)}", SHELL_ONLY: f"shell-{secrets.token_hex(16)}"}
    for name, value in tokens.items():
        monkeypatch.setenv(name, value)  # `moe_orch` runs the CLI with this process's environment
    home = tmp_path / "home"
    res = moe_orch(
        "submit", "configs/tiny-slurm.yaml", "--set", "training.max_steps=5",
        "--set", f"cluster.env_passthrough=[{PASSED}]", home=home,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    run_id = res.stdout.splitlines()[0].strip()

    def job_id() -> str | None:
        attempts = status_json(run_id, home)["attempts"]
        return attempts[0]["job_id"] if attempts else None

    job = wait_for("the job id", job_id, 30)
    for rank in (0, 1):
        environ = wait_for(f"rank {rank} of job {job}", partial(rank_environ, job, rank), 180, 0.2)
        # NOTE: compared here, never shown: a failure names the variable, not its value.
        arrived = sorted(
            name for name, value in tokens.items() if environ.get(name.encode()) == value.encode()
        )
        assert arrived == sorted(tokens), f"rank {rank} started without {sorted(set(tokens) - set(arrived))}"

    record = wait_final(run_id, home, timeout=300)
    assert record["state"] == "completed", record.get("state_reason")
    run_dir = home / run_id
    assert any((run_dir / "logs").glob("*_submitted.pkl")), "the scan covers submitit's pickle"
    assert files_holding(run_dir, tokens) == []
