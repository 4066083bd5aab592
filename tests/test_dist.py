"""worker.dist and worker.signals parsers, with literal launcher environments and scheduler output."""

from __future__ import annotations

import os

import pytest

from orchestrator.backends.local import LocalRunningJob
from orchestrator.backends.nodelist import expand_nodelist
from orchestrator.backends.slurm.injob import parse_time
from worker.dist import derived_port, first_host, resolve_dist
from worker.signals import Faults, stop_reason


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [
        ("n[1-2]", "n1"),
        ("gpu-[01-04,07]", "gpu-01"),
        ("a,b", "a"),
        ("node007", "node007"),
        ("rack[3-4]-n[1-2]", "rack3-n1"),
    ],
)
def test_first_host_of_a_slurm_nodelist(nodelist: str, first: str) -> None:
    assert first_host(nodelist) == first


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("n[1-2]", ["n1", "n2"]),
        ("gpu-[01-02,07],cpu1", ["gpu-01", "gpu-02", "gpu-07", "cpu1"]),
        ("a,b", ["a", "b"]),
        ("x[8-10]", ["x8", "x9", "x10"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ],
)
def test_expand_nodelist_keeps_zero_padding_and_order(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    ("job_id", "configured", "port"),
    [
        ("933", None, 20933),
        ("20000", None, 20000),
        ("123457", None, 23457),
        ("77_3", None, 20077),
        ("5", 29611, 29611),
    ],
)
def test_port_is_configured_or_derived_from_the_job_id_like_sbatch(
    job_id: str, configured: int | None, port: int
) -> None:
    assert derived_port(job_id, configured) == port


def test_torchrun_environment_wins_over_slurm_and_submitit() -> None:
    env = {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
        "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "4242", "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_RESTART_COUNT": "2",
    }
    info = resolve_dist(env)
    assert (info.rank, info.world_size, info.local_rank) == (3, 4, 1)
    assert (info.master_addr, info.master_port, info.source) == ("10.0.0.1", 29500, "torchrun")
    assert info.attempt_key == "4242.2"
    assert info.nodes == ["n1", "n2"]
    assert info.slurm_job


def test_submitit_local_executor_sets_no_rank_so_it_comes_from_submitit_variables() -> None:
    env = {
        "SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "933", "SUBMITIT_LOCAL_NTASKS": "2",
        "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1",
    }
    info = resolve_dist(env)
    assert (info.rank, info.world_size, info.local_rank, info.source) == (1, 2, 1, "submitit-local")
    assert (info.master_addr, info.master_port) == ("127.0.0.1", 20933)
    assert info.attempt_key == "933.0"
    assert not info.slurm_job


def test_submitit_slurm_executor_reads_slurm_variables_and_the_first_node() -> None:
    env = {
        "SUBMITIT_EXECUTOR": "slurm", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
        "SLURM_JOB_ID": "57", "SLURM_JOB_NODELIST": "gpu-[01-02]",
    }
    info = resolve_dist(env, master_port=None)
    assert (info.rank, info.world_size, info.local_rank, info.source) == (1, 2, 0, "submitit-slurm")
    assert (info.master_addr, info.master_port) == ("gpu-01", 20057)
    assert info.nodes == ["gpu-01", "gpu-02"]


def test_plain_srun_uses_the_configured_port() -> None:
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "57", "SLURM_JOB_NODELIST": "a,b"}
    info = resolve_dist(env, master_port=31000)
    assert (info.source, info.master_addr, info.master_port) == ("srun", "a", 31000)


def test_no_launcher_means_one_process_on_a_free_port() -> None:
    info = resolve_dist({})
    assert (info.rank, info.world_size, info.source, info.master_addr) == (0, 1, "single", "127.0.0.1")
    assert 1024 < info.master_port < 65536
    assert info.attempt_key == f"{os.getpid()}.0"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("", Faults()),
        ("crash_at_start", Faults(crash_at_start=True)),
        ("crash_at_step:5", Faults(crash_at_step=5)),
        ("hold_save:2.5, exit_without_progress", Faults(hold_save_s=2.5, exit_without_progress=True)),
    ],
)
def test_fault_hooks_parse_from_the_environment_value(spec: str, expected: Faults) -> None:
    assert Faults.parse(spec) == expected


def test_an_unknown_fault_hook_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="crash_at_step:N"):
        Faults.parse("crash_at_stpe:3")


@pytest.mark.parametrize("text", ["N/A", "Unknown", "NONE", ""])
def test_slurm_time_without_a_date_is_none(text: str) -> None:
    assert parse_time(text) is None


def test_stop_is_a_timeout_when_the_end_is_within_signal_delay_plus_90_s() -> None:
    end = parse_time("2026-11-28T16:00:00\n")
    assert end is not None
    assert stop_reason(end_time=end, signal_delay_s=120, now=end - 150) == "timeout"
    assert stop_reason(end_time=end, signal_delay_s=120, now=end - 3600) == "preempted"
    assert stop_reason(end_time=None, signal_delay_s=120, now=end) == "preempted"
    # submitit's local executor: timeout measured from the process start.
    local = LocalRunningJob.from_env({"SUBMITIT_LOCAL_TIMEOUT_S": "600"})
    assert LocalRunningJob(timeout_s=600, process_start=500.0).time_limit_end() == 1100.0
    assert local.time_limit_end() == local.process_start + 600
    assert stop_reason(end_time=1100.0, signal_delay_s=30, now=1000.0) == "timeout"
    assert LocalRunningJob.from_env({}).time_limit_end() is None
