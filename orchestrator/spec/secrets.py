"""Which environment variables hold secrets, and the ones a run takes from the submitting shell.

One definition of a secret-looking name (`SECRET_NAME_RE`, `looks_secret`), read by the schema (a
literal value for such a key in `cluster.env` is refused, since it would be written in plaintext
into run.yaml, sbatch.sh and the submitted job), by the bundle's `env.json` and by the redaction of
run files. Secrets reach the ranks by name instead: `cluster.env_passthrough` lists variables taken
from the environment `submit` runs in (SLURM exports it with the job, the local executor's processes
inherit it), so no file under the run home holds their values.

Standard library only: the schema, the login node's lifecycle code and the worker import it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

SECRET_NAME_RE = re.compile(
    # NOTE: `TOKEN(?!IZER)`: TOKENIZERS_PARALLELISM (set by most ML configs) is no secret.
    r"TOKEN(?!IZER)|KEY|SECRET|PASSWORD|PASSWD|PASSPHRASE|CREDENTIAL|AUTH|PRIVATE|COOKIE",
    re.IGNORECASE,
)
"""A name holding any of these words (any case, anywhere in the name) names a secret: HF_TOKEN,
WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, PGPASSWORD, GOOGLE_APPLICATION_CREDENTIALS. Broad on purpose:
a false alarm in `cluster.env` is one line in `cluster.env_not_secret`; a miss is a leaked secret."""


def secret_word(name: str) -> str | None:
    """The word that makes `name` look secret (upper case, e.g. "TOKEN"), or None."""
    match = SECRET_NAME_RE.search(name)
    return match.group(0).upper() if match else None


def looks_secret(name: str) -> bool:
    """Whether the environment variable `name` looks like it holds a secret."""
    return SECRET_NAME_RE.search(name) is not None


def missing_names(names: Iterable[str], environ: Mapping[str, str]) -> list[str]:
    """Those of `names` that `environ` does not set (in order; an empty value counts as set)."""
    return [name for name in names if name not in environ]


def not_exported(export: str, names: Iterable[str]) -> list[str]:
    """Those of `names` that SLURM's `--export=<export>` (or `SBATCH_EXPORT`) keeps from the job.

    `ALL` (sbatch's default) passes the whole submitting environment; `NONE` and `NIL` pass none of
    it; a list (`ALL,A=1,B` or `A,B`) passes the variables it names, and everything with `ALL`.
    """
    items = [item.strip() for item in export.split(",") if item.strip()]
    if any(item.upper() == "ALL" for item in items):
        return []
    listed = {item.split("=", 1)[0] for item in items}
    return [name for name in names if name not in listed]
