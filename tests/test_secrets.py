"""Secrets stay secret: a run takes them by name from the submitting shell (`cluster.env_passthrough`),
a literal value under a secret-looking key of `cluster.env` is refused, and no file under the run
home (rendered files, run.yaml, the bundle, submitit's pickle) ever holds a passed-through value.

Against the fake SLURM, and one real job of submitit's local executor whose job function is a probe
(no worker, no torch). The localhost SLURM run is in test_secrets_slurm.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from fakes import FakeSlurm
from helpers import REPO, wait_for
from typer.testing import CliRunner

from orchestrator.backends.local import controller_alive
from orchestrator.cli import app
from orchestrator.errors import ConfigError, PassthroughMissingError
from orchestrator.lifecycle import submit
from orchestrator.rundir import runs
from orchestrator.rundir.runs import RunState
from orchestrator.spec.loading import load_config
from orchestrator.spec.secrets import looks_secret, not_exported

TINY_SLURM = str(REPO / "configs" / "tiny-slurm.yaml")
TINY_CPU = str(REPO / "configs" / "tiny-cpu.yaml")
PASSED = "MOE_ORCH_TEST_PASSTHROUGH"  # no secret-looking word: env.json must redact it by the list
SHELL_ONLY = "MOE_ORCH_TEST_SHELL_TOKEN"  # only in the submitting shell, not in the config

runner = CliRunner()


@pytest.fixture
def fake() -> Iterator[FakeSlurm]:
    with FakeSlurm().context() as f:
        yield f


@pytest.fixture
def tokens(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Two fresh values in this process's environment (the submitting shell): PASSED and SHELL_ONLY."""
    values = {PASSED: f"passed-{secrets.token_hex(16)}", SHELL_ONLY: f"shell-{secrets.token_hex(16)}"}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def files_holding(root: Path, values: Mapping[str, str]) -> list[str]:
    """`relative path: NAME` for every file under `root` whose bytes hold one of the values."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        found += [f"{path.relative_to(root)}: {name}" for name, v in values.items() if v.encode() in data]
    return found


def config_with_env(tmp_path: Path, env_lines: str) -> Path:
    """tiny-slurm.yaml with its `cluster.env` block replaced; the first env key is on line 5."""
    path = tmp_path / "secret.yaml"
    path.write_text(
        "name: tiny-slurm\n"
        "cluster:\n"
        "  executor: slurm\n"
        "  env:\n"
        f"{env_lines}"
        "data:\n"
        f"  train_file: {REPO / 'configs' / 'data' / 'qa_sample.jsonl'}\n"
        "training:\n"
        "  precision: fp32\n"
    )
    return path


# --- which names look secret ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "PGPASSWORD",
     "MYSQL_PASSWD", "GOOGLE_APPLICATION_CREDENTIALS", "GH_AUTH", "SSH_PRIVATE", "ssh_key", "Gpg_Passphrase"],
)  # fmt: skip
def test_a_name_with_a_secret_word_looks_secret(name: str) -> None:
    assert looks_secret(name)


@pytest.mark.parametrize(
    "name", ["TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS", "HF_HUB_OFFLINE", "NCCL_ASYNC_ERROR_HANDLING"]
)
def test_ordinary_training_variables_do_not_look_secret(name: str) -> None:
    assert not looks_secret(name)


@pytest.mark.parametrize(
    ("export", "withheld"),
    [
        ("ALL", []),
        ("all,EXTRA=1", []),
        ("NONE", ["HF_TOKEN", "WANDB_API_KEY"]),
        ("NIL", ["HF_TOKEN", "WANDB_API_KEY"]),
        ("HF_TOKEN,PATH", ["WANDB_API_KEY"]),
        ("HF_TOKEN,WANDB_API_KEY=x", []),
    ],
)
def test_slurm_export_lists_pass_what_they_name_and_all_passes_everything(
    export: str, withheld: list[str]
) -> None:
    assert not_exported(export, ["HF_TOKEN", "WANDB_API_KEY"]) == withheld


# --- the schema -------------------------------------------------------------------------------------


def test_env_passthrough_takes_variable_names() -> None:
    cfg = load_config(TINY_SLURM, ["cluster.env_passthrough=[HF_TOKEN, WANDB_API_KEY]"])
    assert cfg.cluster.env_passthrough == ["HF_TOKEN", "WANDB_API_KEY"]
    assert "HF_TOKEN" not in cfg.cluster.env


@pytest.mark.parametrize("bad", ["hf-token", "1TOKEN", "HF TOKEN", "HF_TOKEN=x", ""])
def test_env_passthrough_refuses_what_is_not_a_variable_name(bad: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(TINY_SLURM, [f'cluster.env_passthrough=["{bad}"]'])
    (issue,) = caught.value.issues
    assert issue.path == "cluster.env_passthrough.0"
    assert "is not valid: use letters, digits and _" in issue.message


def test_a_name_both_literal_and_passed_through_is_refused() -> None:
    with pytest.raises(ConfigError, match="comes either from the config or from the submitting shell"):
        load_config(TINY_SLURM, ["cluster.env_passthrough=[HF_HUB_OFFLINE]"])


def test_env_not_secret_must_name_a_key_of_env() -> None:
    with pytest.raises(ConfigError, match=r"names NCCL_IB_PKEY, which cluster\.env does not set"):
        load_config(TINY_SLURM, ["cluster.env_not_secret=[NCCL_IB_PKEY]"])


def test_an_sbatch_export_list_must_pass_the_passthrough_names() -> None:
    sets = ["cluster.env_passthrough=[HF_TOKEN]"]
    with pytest.raises(ConfigError, match=r"does not pass HF_TOKEN \(cluster.env_passthrough\)"):
        load_config(TINY_SLURM, [*sets, "cluster.sbatch_extra.export=NONE"])
    assert load_config(TINY_SLURM, [*sets, "cluster.sbatch_extra.export=HF_TOKEN,PATH"])
    assert load_config(TINY_SLURM, [*sets, "cluster.sbatch_extra.export=ALL"])


def test_an_sbatch_export_list_may_not_carry_a_literal_secret() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(TINY_SLURM, ["cluster.sbatch_extra.export=ALL,HF_TOKEN=hf_literal"])
    (issue,) = caught.value.issues
    assert issue.path == "cluster.sbatch_extra.export"
    assert "name it in cluster.env_passthrough" in issue.message
    assert "hf_literal" not in str(issue)


# --- a literal secret in cluster.env: refused, with the fix, before anything is written ------------


def test_validate_refuses_a_literal_secret_naming_the_field_its_line_and_the_fix(tmp_path: Path) -> None:
    config = config_with_env(tmp_path, '    OMP_NUM_THREADS: "1"\n    HF_TOKEN: hf_literal_value\n')
    result = runner.invoke(app, ["validate", str(config)])
    assert result.exit_code == 2, result.output
    (line,) = [ln for ln in result.output.splitlines() if ln.strip()]
    assert line.startswith(f"error: {config}:6: cluster.env.HF_TOKEN: looks like a secret")
    assert "move it to cluster.env_passthrough: [HF_TOKEN] and `export HF_TOKEN=...`" in line
    assert "list it in cluster.env_not_secret: [HF_TOKEN]" in line
    assert "hf_literal_value" not in result.output, "an error line never shows the value"


def test_submit_refuses_a_literal_secret_given_with_set_and_writes_nothing(
    fake: FakeSlurm, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    result = runner.invoke(
        app, ["submit", TINY_SLURM, "--set", "cluster.env.HF_TOKEN=hf_literal_value", "--home", str(home)]
    )
    assert result.exit_code == 2, result.output
    assert "cluster.env.HF_TOKEN: looks like a secret" in result.output
    assert "cluster.env_passthrough" in result.output and "hf_literal_value" not in result.output
    assert not home.exists(), "nothing is created under the home"
    assert fake.calls == [], "nothing is submitted"


def test_every_secret_key_is_named_in_one_line(tmp_path: Path) -> None:
    config = config_with_env(tmp_path, "    WANDB_API_KEY: a\n    DB_PASSWORD: b\n")
    result = runner.invoke(app, ["validate", str(config)])
    assert result.exit_code == 2
    assert "WANDB_API_KEY, DB_PASSWORD look like secrets" in result.output
    assert "cluster.env_passthrough: [WANDB_API_KEY, DB_PASSWORD]" in result.output


def test_env_not_secret_lets_a_secret_looking_name_keep_its_value(fake: FakeSlurm, tmp_path: Path) -> None:
    config = config_with_env(tmp_path, '    NCCL_IB_PKEY: "0x8001"\n')
    refused = runner.invoke(app, ["validate", str(config)])
    assert refused.exit_code == 2 and "cluster.env.NCCL_IB_PKEY: looks like a secret" in refused.output
    marked = ["--set", "cluster.env_not_secret=[NCCL_IB_PKEY]"]
    assert runner.invoke(app, ["validate", str(config), *marked]).exit_code == 0
    run_dir = submit.submit(config, marked[1:], home=str(tmp_path / "home"), echo=lambda _: None)
    assert "export NCCL_IB_PKEY=0x8001" in (run_dir / "rendered" / "sbatch.sh").read_text()


# --- passthrough: names on disk, values only in the process environment --------------------------


def test_validate_shows_the_passthrough_names_and_warns_about_unset_ones(
    tokens: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MOE_ORCH_TEST_UNSET", raising=False)
    result = runner.invoke(
        app, ["validate", TINY_SLURM, "--set", f"cluster.env_passthrough=[{PASSED}, MOE_ORCH_TEST_UNSET]"]
    )
    assert result.exit_code == 0, result.output
    lines = [line.rstrip() for line in result.output.splitlines()]
    assert f"env passthrough     {PASSED}, MOE_ORCH_TEST_UNSET" in lines
    assert "warning: cluster.env_passthrough: MOE_ORCH_TEST_UNSET not set in this shell" in result.output
    assert tokens[PASSED] not in result.output


def test_submit_with_passthrough_writes_no_value_anywhere_under_the_home(
    fake: FakeSlurm, tmp_path: Path, tokens: dict[str, str]
) -> None:
    home = tmp_path / "home"
    run_dir = submit.submit(
        TINY_SLURM, [f"cluster.env_passthrough=[{PASSED}]"], home=str(home), echo=lambda _: None
    )
    assert files_holding(home, tokens) == []
    assert not any(value in fake.jobs["100"].script for value in tokens.values()), "nor does the job script"
    # The names are written down, where a reader of the run looks for them.
    assert f"env_passthrough:\n  - {PASSED}" in (run_dir / "run.yaml").read_text()
    assert f': "${{{PASSED}?is not set' in (run_dir / "rendered" / "sbatch.sh").read_text()
    env_json = json.loads((run_dir / "attempts" / "1" / "env.json").read_text())
    assert env_json[PASSED] == env_json[SHELL_ONLY] == "<redacted>"


def test_the_pickled_job_arguments_hold_cluster_env_only(
    fake: FakeSlurm, tmp_path: Path, tokens: dict[str, str]
) -> None:
    run_dir = submit.submit(
        TINY_SLURM, [f"cluster.env_passthrough=[{PASSED}]"], home=str(tmp_path / "home"), echo=lambda _: None
    )
    (pickled,) = (run_dir / "logs").glob("*_submitted.pkl")
    delayed = pickle.loads(pickled.read_bytes())
    run_yaml, job_run_dir, env = delayed.args
    assert (run_yaml, job_run_dir) == (str(run_dir / "run.yaml"), str(run_dir))
    cfg = load_config(TINY_SLURM)
    assert env == submit.job_env(cfg) == {"DS_ACCELERATOR": "cpu", **cfg.cluster.env}
    assert PASSED not in env and SHELL_ONLY not in env


def test_submit_refuses_a_passthrough_name_the_shell_does_not_set_and_creates_nothing(
    fake: FakeSlurm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MOE_ORCH_TEST_UNSET", raising=False)
    home = tmp_path / "home"
    sets = ["--set", "cluster.env_passthrough=[MOE_ORCH_TEST_UNSET]"]
    result = runner.invoke(app, ["submit", TINY_SLURM, *sets, "--home", str(home)])
    assert result.exit_code == 2, result.output
    assert "cluster.env_passthrough names MOE_ORCH_TEST_UNSET, which this shell does not set" in result.output
    assert "`export MOE_ORCH_TEST_UNSET=...` before submitting" in result.output
    assert not home.exists() and fake.calls == []


def test_submit_refuses_when_sbatch_export_in_the_shell_withholds_a_name(
    fake: FakeSlurm, tmp_path: Path, tokens: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SBATCH_EXPORT", "NONE")
    with pytest.raises(PassthroughMissingError, match=f"SBATCH_EXPORT in this shell keeps {PASSED}"):
        submit.submit(
            TINY_SLURM, [f"cluster.env_passthrough=[{PASSED}]"], home=str(tmp_path / "h"), echo=print
        )
    assert not (tmp_path / "h").exists() and fake.calls == []


def test_a_resubmission_from_a_shell_without_the_name_is_recorded_as_refused(
    fake: FakeSlurm, tmp_path: Path, tokens: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = submit.submit(
        TINY_SLURM, [f"cluster.env_passthrough=[{PASSED}]"], home=str(tmp_path / "home"), echo=lambda _: None
    )
    monkeypatch.delenv(PASSED)
    with pytest.raises(PassthroughMissingError, match=f"names {PASSED}, which this shell does not set"):
        submit.resubmit(run_dir, note="resumed from another shell")
    rec = runs.read_run(run_dir)
    assert fake.count("sbatch") == 1, "no second job"
    assert rec.state == RunState.FAILED and PASSED in (rec.state_reason or "")
    assert [a.job_id for a in rec.attempts] == ["100", None]


def test_dry_run_lists_the_names_and_says_submit_would_refuse_a_missing_one(
    fake: FakeSlurm, tmp_path: Path, tokens: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MOE_ORCH_TEST_UNSET", raising=False)
    sets = ["--set", f"cluster.env_passthrough=[{PASSED}, MOE_ORCH_TEST_UNSET]"]
    result = runner.invoke(app, ["submit", TINY_SLURM, "--dry-run", *sets, "--home", str(tmp_path / "h")])
    assert result.exit_code == 0, result.output
    assert f"environment passed from the submitting shell (names only):\n  {PASSED}\n" in result.output
    assert "# submit would refuse: cluster.env_passthrough names MOE_ORCH_TEST_UNSET" in result.output
    assert tokens[PASSED] not in result.output
    assert [c[:2] for c in fake.calls] == [["sbatch", "--test-only"]], "only SLURM's start estimate"


# --- the local executor: a real job whose function reports what its environment holds -------------


def probe_environment(run_yaml: str, run_dir: str, env: Mapping[str, str]) -> int:
    """Stands in for `run_worker` in a local job: records, for PASSED and SHELL_ONLY, the sha256 of
    the value this process sees (never the value), and which names came as pickled arguments."""
    seen = {
        name: hashlib.sha256(os.environ[name].encode()).hexdigest() if name in os.environ else None
        for name in (PASSED, SHELL_ONLY)
    }
    report = {"environ": seen, "argument_names": sorted(env)}
    rank = os.environ.get("SUBMITIT_LOCAL_GLOBALID", "?")
    Path(run_dir, f"probe-rank{rank}.json").write_text(json.dumps(report))
    return 0


def test_a_local_job_gets_the_names_from_its_environment_and_no_file_holds_their_values(
    tmp_path: Path, tokens: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The job function is pickled by reference: its process must import this module.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setattr("orchestrator.lifecycle.job.run_worker", probe_environment)
    home = tmp_path / "home"
    run_dir = submit.submit(
        TINY_CPU, [f"cluster.env_passthrough=[{PASSED}]"], home=str(home), echo=lambda _: None
    )
    job_id = runs.read_run(run_dir).attempts[0].job_id
    assert job_id is not None
    wait_for("the local job to end", lambda: not controller_alive(job_id), timeout=60, interval=0.2)

    reports = [json.loads(path.read_text()) for path in sorted(run_dir.glob("probe-rank*.json"))]
    assert len(reports) == 2, "tiny-cpu runs two ranks"
    digest = {name: hashlib.sha256(value.encode()).hexdigest() for name, value in tokens.items()}
    for report in reports:
        assert report["environ"] == digest, "both the passed name and the shell-only one reach the job"
        assert PASSED not in report["argument_names"] and SHELL_ONLY not in report["argument_names"]
    assert files_holding(home, tokens) == []
