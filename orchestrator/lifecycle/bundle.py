"""The reproducibility bundle of an attempt: `<run>/attempts/<n>/`.

- `git.txt` and `git.diff`: commit, branch and uncommitted changes of the checkout the config
  file lives in (absent when it is not in a git checkout);
- `pip-freeze.txt`: the interpreter's packages (`pip freeze` runs once per submit; a resubmit
  copies the first attempt's file, since the interpreter is the same);
- `run.yaml` and `rendered/`: the resolved config and the files rendered for this attempt;
- `env.json`: the submitting environment, values of secret-looking names (TOKEN, KEY, SECRET,
  PASSWORD, ...: `orchestrator.spec.secrets`) and of `cluster.env_passthrough` replaced by
  `<redacted>`.

A bundle is made to be kept and shared: every file in it goes through `orchestrator.redact` (a
token in a `cluster.setup` line, a `pip freeze` URL with credentials, a diff). The run's own
`run.yaml` and `rendered/` stay as the job needs them, protected by the run directory's mode.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Collection, Mapping
from pathlib import Path

from orchestrator.redact import redact, redact_env

logger = logging.getLogger(__name__)


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None


def git_info(config_file: Path | None) -> tuple[str, str] | None:
    """(summary text, diff) of the checkout holding `config_file`; None outside git."""
    if config_file is None:
        return None
    where = config_file.resolve().parent
    top = _git(["rev-parse", "--show-toplevel"], where)
    if top is None:
        return None
    commit = (_git(["rev-parse", "HEAD"], where) or "(no commit)").strip()
    branch = (_git(["rev-parse", "--abbrev-ref", "HEAD"], where) or "").strip()
    status = _git(["status", "--porcelain"], where) or ""
    diff = _git(["diff", "HEAD"], where) or ""
    summary = (
        f"toplevel: {top.strip()}\ncommit: {commit}\nbranch: {branch}\n"
        f"dirty: {'yes' if status.strip() else 'no'}\n\n{status}"
    )
    return summary, diff


def pip_freeze(python: str | None = None) -> str:
    """`pip freeze` of `python` (default: this interpreter); an explanatory line if it fails."""
    exe = python or sys.executable
    try:
        res = subprocess.run(
            [exe, "-m", "pip", "freeze", "--disable-pip-version-check"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"# pip freeze failed: {exc}\n"
    if res.returncode != 0:
        return f"# pip freeze failed ({res.returncode}): {res.stderr.strip()}\n"
    return res.stdout


def write_bundle(
    run_dir: Path,
    number: int,
    *,
    rendered: Mapping[str, str],
    config_file: Path | None,
    freeze: str | None,
    env: Mapping[str, str] | None = None,
    passthrough: Collection[str] = (),
) -> Path:
    """Write `attempts/<number>/`; `freeze` None copies attempt 1's pip-freeze.txt; the values of
    the `passthrough` names (`cluster.env_passthrough`) are redacted in env.json."""
    out = run_dir / "attempts" / str(number)
    (out / "rendered").mkdir(parents=True, exist_ok=True)
    for name, text in rendered.items():
        (out / "rendered" / name).write_text(redact(text))
    (out / "run.yaml").write_text(redact((run_dir / "run.yaml").read_text()))
    if freeze is not None:
        (out / "pip-freeze.txt").write_text(redact(freeze))
    else:
        first = run_dir / "attempts" / "1" / "pip-freeze.txt"
        if first.is_file() and number != 1:
            shutil.copyfile(first, out / "pip-freeze.txt")
    info = git_info(config_file)
    if info is not None:
        (out / "git.txt").write_text(redact(info[0]))
        (out / "git.diff").write_text(redact(info[1]))
    (out / "env.json").write_text(
        json.dumps(redact_env(env if env is not None else os.environ, passthrough), indent=2) + "\n"
    )
    return out
