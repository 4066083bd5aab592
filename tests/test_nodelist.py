"""SLURM host lists expand like `scontrol show hostnames` does."""

from __future__ import annotations

import pytest

from orchestrator.backends.nodelist import expand_nodelist
from orchestrator.errors import ConfigError


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("n1", ["n1"]),
        ("n[1-4]", ["n1", "n2", "n3", "n4"]),
        ("gpu-[01-03,07]", ["gpu-01", "gpu-02", "gpu-03", "gpu-07"]),
        ("a,b", ["a", "b"]),
        ("n[1-2],login", ["n1", "n2", "login"]),
        ("node[8-11]", ["node8", "node9", "node10", "node11"]),
        ("gpu[098-101]", ["gpu098", "gpu099", "gpu100", "gpu101"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("n[1-2],n[2-3]", ["n1", "n2", "n3"]),
        ("c[5]", ["c5"]),
        (" n[1-2] ", ["n1", "n2"]),
    ],
)
def test_expand_nodelist_matches_scontrol_show_hostnames(spec: str, expected: list[str]) -> None:
    assert expand_nodelist(spec) == expected


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("", "empty"),
        ("n[1-4", "'[' without ']'"),
        ("n1-4]", "']' without '['"),
        ("n[4-1]", "runs backwards"),
        ("n[a-b]", "not a number"),
        ("n[]", "empty brackets"),
        ("n[1-1000000]", "more than"),
        ("bad$(host)", "not a host name"),
    ],
)
def test_expand_nodelist_refuses_malformed_lists_with_the_reason(spec: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        expand_nodelist(spec)
    assert reason in str(info.value)
    assert "n[1-4]" in str(info.value)  # the message shows the expected form
