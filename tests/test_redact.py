"""Secrets stay out of what moe-orch prints and bundles: `orchestrator.redact` and where it applies.

`redact` replaces credentials in URLs, secret `NAME=value` pairs and well-known token shapes, and
leaves ordinary training output byte for byte as it was. It runs on `moe-orch logs` lines, on
`status` (text and `--json`), on the CLI's error line and on the bundle.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.lifecycle.job import marker_line
from orchestrator.redact import (
    REDACTED,
    RedactingFilter,
    redact,
    redact_env,
    redact_values,
    secret_key_in_text,
)
from orchestrator.rundir import reports, runs
from orchestrator.rundir.runs import Attempt, AttemptState, RunRecord, RunState, StopReason
from orchestrator.spec.catalog import shipped_configs
from orchestrator.spec.loading import load_config

runner = CliRunner()

HF_TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"
URL_WITH_PASSWORD = "https://user:s3cret@huggingface.co/api/models/org/model"
LEAKY_ERROR = f"OSError: 401 Client Error for url {URL_WITH_PASSWORD} (token {HF_TOKEN})"
"""A worker's exception message as `requests` and `huggingface_hub` write them."""


# --- what is redacted ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (URL_WITH_PASSWORD, "https://<redacted>@huggingface.co/api/models/org/model"),
        ("git+https://x-access-token:ghs_abc@github.com/o/r", "git+https://<redacted>@github.com/o/r"),
        (f"https://{'a1' * 20}@github.com/o/r.git", "https://<redacted>@github.com/o/r.git"),
        ("GET /resolve/main?token=abc123&revision=main", "GET /resolve/main?token=<redacted>&revision=main"),
        ("https://h/x?download=1&access_token=abc", "https://h/x?download=1&access_token=<redacted>"),
        ("url: https://h/x?api_key=abc", "url: https://h/x?api_key=<redacted>"),
        ("HF_TOKEN=abc123 OTHER=1", "HF_TOKEN=<redacted> OTHER=1"),
        ("export WANDB_API_KEY=0123456789abcdef", "export WANDB_API_KEY=<redacted>"),
        ('{"hf_token": "abc", "step": 3}', '{"hf_token": "<redacted>", "step": 3}'),
        ("{'api_key': 'abc', 'max_tokens': 5}", "{'api_key': '<redacted>', 'max_tokens': 5}"),
        ("Login(hfToken='abc', clientSecret='d')", "Login(hfToken='<redacted>', clientSecret='<redacted>')"),
        ("db_password: hunter2", "db_password: <redacted>"),
        ("PGPASSWORD=x1 GOOGLE_CREDENTIALS=y", "PGPASSWORD=<redacted> GOOGLE_CREDENTIALS=<redacted>"),
        ("push --token abc123 --max-tokens 5", "push --token <redacted> --max-tokens 5"),
        ("Authorization: Bearer abcdefghijklmnop", "Authorization: Bearer <redacted>"),
        ("-H 'Authorization: Basic dXNlcjpwYXNz'", "-H 'Authorization: Basic <redacted>'"),
        (f"using {HF_TOKEN} now", "using <redacted> now"),
        ("ghp_" + "a" * 36, REDACTED),
        ("github_pat_" + "A1_" * 10, REDACTED),
        ("key sk-proj-" + "x" * 40, "key <redacted>"),
        ("AKIAIOSFODNN7EXAMPLE", REDACTED),
        ("xoxb-1234567890-abcdef", REDACTED),
    ],
)
def test_redact_replaces_credentials(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert redact(expected) == expected, "redacting twice changes nothing more"


@pytest.mark.parametrize(
    "text",
    [
        "[rank 0] step 120/400 loss=2.3141 tokens_per_s=12,345 lr=3.0e-04 step_time_s=0.41",
        "max_tokens=512 max_tokens: 512 num_tokens=3 pad_token_id=0 eos_token_id=2 token_type_ids=[0]",
        "tokenizer: bpe vocab_size=2048 TOKENIZERS_PARALLELISM=false NCCL_IB_PKEY=0x8001",
        "KeyError: 'model'",
        "InvalidTokenError: bad header",
        "author=alice monkey=1 keys=3",
        "/home/u/runs/tiny-cpu-20261128-152000-3fa2/checkpoints/step-000120/manifest.json",
        "https://huggingface.co/gpt2/resolve/main/config.json?download=true&revision=main",
        "git@github.com:org/repo.git ssh://git@github.com/org/repo",
        marker_line("123.0", "0"),
        "the config must be a YAML mapping (key: value lines), not a list",
        "`export HF_TOKEN=...` in the shell that runs submit; token=$HF_TOKEN",
        "cluster.env.HF_TOKEN: looks like a secret (its name holds TOKEN)",
        '    token = os.environ["HF_TOKEN"]',
        "usage: worker [--config CONFIG] [--hub-token TOKEN]",
        "HF_TOKEN_PATH=/home/u/.cache/huggingface/token",
        "task-sk-1 disk-usage",
    ],
)
def test_redact_leaves_ordinary_text_as_it_is(text: str) -> None:
    assert redact(text) == text


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("HF_TOKEN", True),
        ("hfToken", True),
        ("apikey", True),
        ("x-api-key", True),
        ("client_secret", True),
        ("AWS_SECRET_ACCESS_KEY", True),
        ("CREDENTIALS", True),
        ("tokens_per_s", False),
        ("max_tokens", False),
        ("pad_token_id", False),
        ("KeyError", False),
        ("author", False),
        ("monkey", False),
        ("TOKENIZERS_PARALLELISM", False),
    ],
)
def test_a_name_in_text_is_secret_only_when_a_secret_word_stands_alone(name: str, secret: bool) -> None:
    assert secret_key_in_text(name) is secret


def test_redact_env_replaces_secret_names_and_passthrough_and_redacts_other_values() -> None:
    env = {
        "HF_TOKEN": "hf_x",
        "SSH_KEY": "k",
        "MY_SETTING": "passed through",
        "PIP_INDEX_URL": "https://me:pw@pypi.example.com/simple",
        "TOKENIZERS_PARALLELISM": "false",
        "PATH": "/bin",
    }
    assert redact_env(env, also=["MY_SETTING"]) == {
        "HF_TOKEN": REDACTED,
        "MY_SETTING": REDACTED,
        "PATH": "/bin",
        "PIP_INDEX_URL": "https://<redacted>@pypi.example.com/simple",
        "SSH_KEY": REDACTED,
        "TOKENIZERS_PARALLELISM": "false",
    }


def test_redact_values_redacts_strings_and_keeps_keys() -> None:
    data = {"attempt_key": "5.0", "attempts": [{"error": LEAKY_ERROR, "exit_code": None, "step": 3}]}
    assert redact_values(data) == {
        "attempt_key": "5.0",
        "attempts": [{"error": redact(LEAKY_ERROR), "exit_code": None, "step": 3}],
    }
    assert "s3cret" not in json.dumps(redact_values(data))


def test_the_cli_log_filter_redacts_messages_and_their_arguments() -> None:
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "fetching %s", (URL_WITH_PASSWORD,), None)
    assert RedactingFilter().filter(record)
    assert record.getMessage() == "fetching https://<redacted>@huggingface.co/api/models/org/model"


# --- where it applies ------------------------------------------------------------------------------


def leaky_run(home: Path) -> tuple[str, Path]:
    """A (local) run under `home` whose rank 0 printed a URL with a password and a token (stdout and
    stderr) and whose record quotes them in an attempt's error; returns (run id, run directory)."""
    run_id = "leaky-20261128-152000-abcd"
    run_dir = home / run_id
    (run_dir / "logs").mkdir(parents=True)
    att = Attempt(
        number=1, job_id="5", attempt_key="5.0", state=AttemptState.ENDED, stop_reason=StopReason.FAILED,
        error=LEAKY_ERROR,
    )  # fmt: skip
    rec = RunRecord(
        run_id=run_id, name="leaky", config_hash="x", created=0.0, executor="local", run_dir=str(run_dir),
        home=str(home), state=RunState.FAILED, state_reason=f"attempt 1 failed: {LEAKY_ERROR}",
        attempts=[att],
    )  # fmt: skip
    runs.write_run(run_dir, rec)
    printed = [marker_line("5.0", "0"), f"downloading {URL_WITH_PASSWORD}", f"HF_TOKEN={HF_TOKEN}"]
    printed.append("step 1 loss=2.0")
    for stream in ("out", "err"):
        (run_dir / "logs" / f"5_0_log.{stream}").write_text("\n".join(printed) + "\n")
    return run_id, run_dir


def assert_no_secret(text: str) -> None:
    assert "s3cret" not in text and HF_TOKEN not in text, text


@pytest.mark.parametrize("stderr", [False, True])
def test_logs_shows_urls_and_tokens_redacted(tmp_path: Path, stderr: bool) -> None:
    run_id, _ = leaky_run(tmp_path)
    result = runner.invoke(app, ["logs", run_id, "--home", str(tmp_path), *(["--stderr"] if stderr else [])])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "[rank 0] downloading https://<redacted>@huggingface.co/api/models/org/model",
        "[rank 0] HF_TOKEN=<redacted>",
        "[rank 0] step 1 loss=2.0",
    ]


def test_status_json_and_status_run_show_the_error_redacted(tmp_path: Path) -> None:
    run_id, _ = leaky_run(tmp_path)
    as_json = runner.invoke(app, ["status", run_id, "--json", "--home", str(tmp_path)])
    assert as_json.exit_code == 0, as_json.output
    assert_no_secret(as_json.stdout)
    detail = json.loads(as_json.stdout)
    assert detail["attempts"][0]["error"] == (
        "OSError: 401 Client Error for url https://<redacted>@huggingface.co/api/models/org/model "
        "(token <redacted>)"
    )
    assert detail["attempts"][0]["attempt_key"] == "5.0", "field names and ids are not secrets"
    every_run = runner.invoke(app, ["status", "--json", "--home", str(tmp_path)])
    assert every_run.exit_code == 0 and run_id in every_run.stdout
    assert_no_secret(every_run.stdout)
    text = runner.invoke(app, ["status", run_id, "--home", str(tmp_path)])
    assert text.exit_code == 0, text.output
    assert "error: OSError: 401 Client Error for url https://<redacted>@huggingface.co" in text.stdout
    assert_no_secret(text.stdout)


def test_status_redacts_an_exit_event_error_that_a_worker_wrote_as_it_was(tmp_path: Path) -> None:
    """An `exit` event of a worker that did not redact (an older moe-orch): `status` still does."""
    run_id, run_dir = leaky_run(tmp_path)

    def running(rec: RunRecord) -> None:
        rec.state, rec.state_reason = RunState.RUNNING, None
        rec.attempts = [Attempt(number=1, job_id="999999999")]  # no such process: the job is gone

    runs.update_run(run_dir, running)
    reports.append_event(run_dir, "start", job_id="999999999", restart=0, attempt_key="999999999.0", nodes=[])
    reports.append_event(run_dir, "exit", reason="failed", step=0, requeued=False, error=LEAKY_ERROR)
    result = runner.invoke(app, ["status", run_id, "--json", "--home", str(tmp_path)])
    assert result.exit_code == 0, result.output
    detail = json.loads(result.stdout)
    assert detail["attempts"][0]["stop_reason"] == "failed"
    assert "https://<redacted>@huggingface.co" in detail["attempts"][0]["error"]
    assert_no_secret(result.stdout)


def test_the_cli_error_line_is_redacted() -> None:
    result = runner.invoke(app, ["validate", "https://user:s3cret@example.com/run.yaml"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: https://<redacted>@example.com/run.yaml: config file not found")
    assert_no_secret(result.output)


def test_the_bundle_redacts_its_text_files(tmp_path: Path) -> None:
    from orchestrator.lifecycle.bundle import write_bundle

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.yaml").write_text("name: r\ncluster:\n  setup:\n  - export HF_TOKEN=abc123\n")
    out = write_bundle(
        run_dir,
        1,
        rendered={"sbatch.sh": f"#!/bin/bash\nexport HF_TOKEN={HF_TOKEN}\n"},
        config_file=None,
        freeze=f"private-pkg @ git+{URL_WITH_PASSWORD}\n",
        env={"HF_TOKEN": HF_TOKEN, "PATH": "/bin"},
    )
    assert (out / "run.yaml").read_text() == "name: r\ncluster:\n  setup:\n  - export HF_TOKEN=<redacted>\n"
    assert (out / "rendered" / "sbatch.sh").read_text() == "#!/bin/bash\nexport HF_TOKEN=<redacted>\n"
    assert (out / "pip-freeze.txt").read_text() == (
        "private-pkg @ git+https://<redacted>@huggingface.co/api/models/org/model\n"
    )
    for path in out.rglob("*"):
        if path.is_file():
            assert_no_secret(path.read_text())
    assert "export HF_TOKEN=abc123" in (run_dir / "run.yaml").read_text(), "the run's own file is the job's"


@pytest.mark.parametrize("name", [shipped.name for shipped in shipped_configs()])
def test_the_files_rendered_for_every_shipped_config_pass_unchanged(name: str) -> None:
    """No false alarm in a bundle: what `render` writes for a shipped config holds no secret."""
    from orchestrator.render.files import render

    files = render(load_config(name), run_dir=Path("/runs/r"), python="/usr/bin/python3")
    assert {file: redact(text) for file, text in files.items()} == files
