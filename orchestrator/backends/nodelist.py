"""SLURM host lists (`n[1-4]`, `gpu-[01-03,07]`, `a,b`, `rack[1-2]-n[1-2]`) expanded to node names.

The same expansion `scontrol show hostnames` does, without calling SLURM, so `render --nodelist`
works on a laptop and tests need no cluster; and `plan_exclusion`, which nodes to keep out of a
next attempt (after a hang or a straggler) while enough remain for the job.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Mapping, Sequence

from orchestrator.errors import ConfigError, ConfigIssue

logger = logging.getLogger(__name__)

_RANGE_RE = re.compile(r"^(\d+)(?:-(\d+))?$")
MAX_NODES = 100_000
"""A host list that expands to more names than this is refused (a typo such as `n[1-1000000]`)."""


def _fail(spec: str, reason: str) -> ConfigError:
    return ConfigError(
        [
            ConfigIssue(
                "nodelist",
                f"cannot read node list {spec!r}: {reason} (expected e.g. n[1-4] or gpu-[01-03,07])",
            )
        ]
    )


def _split_top_level(spec: str) -> list[str]:
    """`a[1-2],b` -> ["a[1-2]", "b"]: commas inside brackets belong to the range."""
    items: list[str] = []
    current: list[str] = []
    depth = 0
    for char in spec:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise _fail(spec, "']' without '['")
        if char == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise _fail(spec, "'[' without ']'")
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def _expand_range(spec: str, body: str) -> list[str]:
    """`01-03,07` -> ["01", "02", "03", "07"] (zero padding kept from the first number)."""
    out: list[str] = []
    for part in body.split(","):
        match = _RANGE_RE.match(part.strip())
        if not match:
            raise _fail(spec, f"{part!r} is not a number or a range like 1-4")
        start_text, end_text = match.group(1), match.group(2)
        start = int(start_text)
        end = int(end_text) if end_text is not None else start
        if end < start:
            raise _fail(spec, f"range {part!r} runs backwards")
        if end - start >= MAX_NODES:
            raise _fail(spec, f"range {part!r} has more than {MAX_NODES} nodes")
        width = len(start_text)
        out.extend(str(i).zfill(width) for i in range(start, end + 1))
    return out


def _expand_item(spec: str, item: str) -> list[str]:
    # Split "rack[1-2]-n[01-02]" into literal and bracket pieces, then take the product.
    pieces: list[list[str]] = []
    for literal, bracket in re.findall(r"([^\[\]]*)(?:\[([^\[\]]*)\])?", item):
        if literal:
            pieces.append([literal])
        if bracket:
            pieces.append(_expand_range(spec, bracket))
    if re.search(r"\[\s*\]", item):
        raise _fail(spec, "empty brackets")
    names = ["".join(combo) for combo in itertools.product(*pieces)]
    for name in names:
        if not re.match(r"^[A-Za-z0-9._-]+$", name):
            raise _fail(spec, f"{name!r} is not a host name")
    return names


def expand_nodelist(spec: str) -> list[str]:
    """Every node name of a SLURM host list, in order, duplicates removed."""
    if not spec.strip():
        raise _fail(spec, "it is empty")
    names: list[str] = []
    for item in _split_top_level(spec.strip()):
        names.extend(_expand_item(spec, item))
        if len(names) > MAX_NODES:
            raise _fail(spec, f"more than {MAX_NODES} nodes")
    return list(dict.fromkeys(names))


UNUSABLE_NODE_STATES = ("down", "drain", "fail", "maint", "reboot", "unknown", "not_responding", "future")
"""`sinfo %T` states (prefixes, lower case) of nodes no job can get."""


def usable_nodes(pool: Mapping[str, str], excluded: Sequence[str]) -> list[str]:
    """The nodes of `pool` (name -> `sinfo` state) that a job could get, `excluded` left out."""
    up = [n for n, state in pool.items() if not state.lower().startswith(UNUSABLE_NODE_STATES)]
    return [n for n in up if n not in excluded]


def plan_exclusion(
    hosts: Sequence[str], pool: Mapping[str, str], excluded: Sequence[str], nodes_needed: int
) -> tuple[list[str] | None, str]:
    """Whether to keep `hosts` out of the next run: the new `--exclude` list (None: keep it as it
    is), and the sentence that says so. `pool` is the partition's nodes and their `sinfo` states."""
    remaining = usable_nodes(pool, [*hosts, *excluded])
    names = ",".join(hosts)
    if len(remaining) < nodes_needed:
        return None, (
            f"retrying on the same nodes: excluding {names} would leave {len(remaining)} usable node(s) "
            f"in the partition, and the job needs {nodes_needed}"
        )
    new = sorted({*excluded, *hosts})
    return new, f"excluded {names} from the next run ({len(remaining)} other usable node(s) remain)"
