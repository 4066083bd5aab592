"""Secrets out of the text that leaves the process: one place, standard library only.

`redact(text)` replaces what looks like a secret with `<redacted>`:
- credentials in a URL: `https://user:pass@host` -> `https://<redacted>@host` (also a bare token
  as the user: `https://<40 characters>@github.com`);
- `Authorization: Bearer …` (any scheme) and `Bearer …`;
- secret query parameters: `?token=…`, `&access_token=…`, `?api_key=…`;
- `NAME=value`, `NAME: value`, `"name": "value"`, `name='value'` and `--name value` whose NAME holds
  one of the secret words of `orchestrator.spec.secrets.SECRET_NAME_RE` (the one definition; TOKEN,
  KEY, SECRET, PASSWORD, AUTH, ...) as a word of its own: HF_TOKEN, api_key, hfToken,
  client_secret, db_password; not tokens_per_s, max_tokens, pad_token_id, KeyError or author.
  What reads as prose or code is left: a placeholder (`HF_TOKEN=...`, `token=$HF_TOKEN`), one plain
  word after a colon (`key: value lines`), `token = expression` (a source line in a traceback), a
  dotted field path and its message (`cluster.env.HF_TOKEN: looks like a secret`);
- webhook URLs whose path is the secret (`notify.webhook`): `https://hooks.slack.com/services/<redacted>`,
  Discord's `/api/webhooks/…` and Teams' `webhook.office.com/webhookb2/…`;
- well-known token shapes wherever they stand: Hugging Face `hf_…`, GitHub `ghp_…`/`github_pat_…`,
  OpenAI and Anthropic `sk-…`, GitLab `glpat-…`, Slack `xox?-…`, AWS `AKIA…`, JWTs `eyJ….eyJ….…`.

`redact_env(env)`: an environment for the bundle's `env.json`: the value of every name that looks
secret (`looks_secret`: any TOKEN, KEY, ... in the name) is replaced, other values are redacted as
text (a `PIP_INDEX_URL` with credentials).

Where text leaves the process, it goes through here: `moe-orch logs` (`lifecycle/logs.py`), `status`
and `status --json` (`lifecycle/status.py`), the bundle (`lifecycle/bundle.py`), the CLI's error,
warning and output lines and its log records (`cli/`), and the worker's `exit` event `error`
(`worker/train.py`). The files of a run directory itself are protected by its mode instead
(`orchestrator/rundir/access.py`): the job needs them as written.

Line by line: a secret spread over several lines (a PEM key) is not recognised.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Mapping
from typing import Any

from orchestrator.spec.secrets import SECRET_NAME_RE, looks_secret

REDACTED = "<redacted>"

_GLUED_PREFIXES = ("api", "access", "auth", "bearer", "client", "private", "refresh", "secret", "session")
"""Words that may be glued before TOKEN or KEY and still name a secret: apikey, accesstoken."""

_NOT_A_SECRET_AFTER = re.compile(r"[_.\-]?(?i:ids?|type|len|length|count|size|file|path|dir)(?![A-Za-z])")
"""A word after the secret word that makes the name one of an index or a place, not of a secret:
pad_token_id, token_type_ids, HF_TOKEN_PATH, key_file."""

_STRICT_WORDS = frozenset({"TOKEN", "KEY", "AUTH"})
"""Short secret words that are often part of another word (monkey, author): they count in free
text only with a word boundary before them (or a `_GLUED_PREFIXES` word), and never in a plural."""


def _is_letter(text: str, index: int) -> bool:
    return 0 <= index < len(text) and text[index].isalpha()


def secret_key_in_text(name: str) -> bool:
    """Whether `name`, the key of a `name=value` pair in free text, names a secret.

    A secret word (`SECRET_NAME_RE`) must stand as a word of its own: separated by `_ - .` or a
    digit, or starting a camelCase word (hfToken), and not continued by more letters (KeyError,
    tokens_per_s, author), nor followed by a word that makes it an index or a place (pad_token_id,
    HF_TOKEN_PATH). The longer words (PASSWORD, SECRET, ...) may be glued on after another word
    (PGPASSWORD) and take a plural (CREDENTIALS).
    """
    for match in SECRET_NAME_RE.finditer(name):
        start, end = match.span()
        word = match.group(0).upper()
        camel = start > 0 and name[start - 1].islower() and name[start].isupper()
        glued = name[:start].lower().endswith(_GLUED_PREFIXES)
        before = not _is_letter(name, start - 1) or camel or glued or word not in _STRICT_WORDS
        plural = word not in _STRICT_WORDS and name[end : end + 1] in ("s", "S")
        after = not _is_letter(name, end) or (plural and not _is_letter(name, end + 1))
        if before and after and not _NOT_A_SECRET_AFTER.match(name, end):
            return True
    return False


# --- the rules, applied in this order -----------------------------------------------------------

_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^\s/?#@\"'<>]+)@")
_BEARER = re.compile(r"\b(?P<scheme>Bearer|bearer|BEARER)(?P<space>\s+)[A-Za-z0-9._~+/\-]{8,}=*")
_AUTHORIZATION = re.compile(
    r"\b(?P<head>(?i:(?:proxy-)?authorization)[\"']?[ \t]*[:=][ \t]*[\"']?"
    r"(?:(?i:basic|bearer|digest|token)[ \t]+)?)(?P<value>[^\s\"',;]+)"
)
_QUERY_PARAM = re.compile(r"(?P<lead>[?&;](?P<name>[A-Za-z0-9_.\-\[\]]+)=)(?P<value>[^&#\s\"'<>]+)")
_PAIR = re.compile(
    r"(?P<q>[\"']?)(?<![\w.])(?P<name>[A-Za-z_][\w.\-]*)(?P=q)(?P<sep>[ \t]*[:=][ \t]*)"
    r"(?:\"(?P<dq>[^\"\n]+)\"|'(?P<sq>[^'\n]+)'|(?P<bare>[^\s,;&\"'`(){}\[\]<>]+))"
)
_FLAG = re.compile(
    r"(?<![\w-])(?P<flag>--?(?P<name>[A-Za-z][\w.\-]*))(?P<sep>[ \t]+)(?P<value>(?!-)[^\s\"'`<>(){}\[\]]+)"
)
_PLACEHOLDER = re.compile(r"\.\.\.|…|\*+|\$\{?\w+\}?|<[^>]*>")
"""Values that stand for a secret without being one: `HF_TOKEN=...`, `token=$HF_TOKEN`, `<redacted>`."""
_PROSE_WORD = re.compile(r"[A-Za-z]{1,15}")
"""After `name:` (not `name=`), a short plain word is prose (`key: value lines`), not a secret."""
_METAVAR = re.compile(r"[A-Z][A-Z0-9_]*")
"""`--hub-token TOKEN` in a usage line: a flag's value in capitals names it, it is not one."""
_TOKEN_SHAPES = re.compile(
    r"(?<![A-Za-z0-9_\-])(?:"
    r"hf_[A-Za-z0-9]{20,}"
    r"|gh[pousr]_[A-Za-z0-9]{20,}"
    r"|github_pat_[A-Za-z0-9_]{20,}"
    r"|sk-[A-Za-z0-9_\-]{20,}"
    r"|glpat-[A-Za-z0-9_\-]{20,}"
    r"|xox[abeoprs]-[A-Za-z0-9\-]{10,}"
    r"|AKIA[0-9A-Z]{16}"
    r"|eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"
    r")(?![A-Za-z0-9_\-])"
)
_BARE_TOKEN_USER = re.compile(r"[A-Za-z0-9_\-]{20,}")
_WEBHOOK_PATH = re.compile(
    r"(?P<base>\bhttps?://(?:hooks\.slack\.com/(?:services|workflows|triggers)"
    r"|(?:[\w-]+\.)?discord(?:app)?\.com/api/webhooks"
    r"|[\w.-]+\.webhook\.office\.com/webhookb2)/)[^\s\"'<>]+"
)
"""A webhook URL whose path is the secret (Slack, Discord, Teams: `notify.webhook`)."""

_CANDIDATES = (
    "://", "token", "key", "secret", "passw", "credential", "auth", "private", "cookie", "bearer",
    "hf_", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "sk-", "glpat-", "xox", "akia", "eyj",
)  # fmt: skip
"""Text whose lower case holds none of these holds nothing `redact` changes (the fast way out)."""


def _userinfo(match: re.Match[str]) -> str:
    info = match.group("userinfo")
    if ":" in info or _BARE_TOKEN_USER.fullmatch(info):
        return f"{match.group('scheme')}{REDACTED}@"
    return match.group(0)


def _query_param(match: re.Match[str]) -> str:
    if secret_key_in_text(match.group("name")):
        return f"{match.group('lead')}{REDACTED}"
    return match.group(0)


def _pair(match: re.Match[str]) -> str:
    name, sep, bare = match.group("name"), match.group("sep"), match.group("bare")
    if not secret_key_in_text(name):
        return match.group(0)
    if bare is not None and (
        sep[0] in " \t"  # `token = expression`: a line of code (a traceback), not a setting
        or (":" in sep and "." in name and not match.group("q"))  # `cluster.env.HF_TOKEN: message`
        or (":" in sep and _PROSE_WORD.fullmatch(bare))
        or _PLACEHOLDER.fullmatch(bare)
    ):
        return match.group(0)
    head = f"{match.group('q')}{match.group('name')}{match.group('q')}{match.group('sep')}"
    if match.group("dq") is not None:
        return f'{head}"{REDACTED}"'
    if match.group("sq") is not None:
        return f"{head}'{REDACTED}'"
    return f"{head}{REDACTED}"


def _flag(match: re.Match[str]) -> str:
    value = match.group("value")
    if secret_key_in_text(match.group("name")) and not (
        _PLACEHOLDER.fullmatch(value) or _METAVAR.fullmatch(value)
    ):
        return f"{match.group('flag')}{match.group('sep')}{REDACTED}"
    return match.group(0)


def redact(text: str) -> str:
    """`text` with every secret-looking part replaced by `<redacted>` (the module's docstring lists
    what counts); ordinary text comes back unchanged. Redacting twice changes nothing more."""
    lower = text.lower()
    if not any(candidate in lower for candidate in _CANDIDATES):
        return text
    if "://" in text:
        text = _URL_USERINFO.sub(_userinfo, text)
        text = _WEBHOOK_PATH.sub(lambda m: f"{m.group('base')}{REDACTED}", text)
    if "bearer" in lower:
        text = _BEARER.sub(lambda m: f"{m.group('scheme')}{m.group('space')}{REDACTED}", text)
    if "authorization" in lower:
        text = _AUTHORIZATION.sub(lambda m: f"{m.group('head')}{REDACTED}", text)
    if "=" in text:
        text = _QUERY_PARAM.sub(_query_param, text)
    if "=" in text or ":" in text:
        text = _PAIR.sub(_pair, text)
    if "-" in text:
        text = _FLAG.sub(_flag, text)
    return _TOKEN_SHAPES.sub(REDACTED, text)


def redact_values(data: Any) -> Any:
    """A copy of JSON-like `data` (dicts, lists, strings, numbers) with every string value redacted;
    keys are kept as they are (`attempt_key` is a field, not a secret)."""
    if isinstance(data, str):
        return redact(data)
    if isinstance(data, Mapping):
        return {key: redact_values(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [redact_values(value) for value in data]
    return data


def redact_env(env: Mapping[str, str], also: Collection[str] = ()) -> dict[str, str]:
    """A sorted copy of `env` for the bundle: the values of secret-looking names (`looks_secret`) and
    of the names in `also` (`cluster.env_passthrough`) replaced, the others redacted as text."""
    return {
        name: (REDACTED if looks_secret(name) or name in also else redact(value))
        for name, value in sorted(env.items())
    }


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's message (and its traceback) before a handler
    writes it: the CLI installs it on its handlers."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True
