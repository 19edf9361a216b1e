"""``exchange dev`` sizes its api workers and matcher processes by the CPUs it may use."""

from __future__ import annotations

from pathlib import Path

import pytest

from exchange import dev
from exchange.cli import build_parser


@pytest.mark.parametrize(("cpus", "expected"), [(1, 1), (2, 1), (3, 1), (4, 2), (8, 4)])
def test_dev_starts_half_as_many_api_workers_and_matchers_as_it_has_cpus(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cpus: int, expected: int
) -> None:
    monkeypatch.setattr(dev.os, "sched_getaffinity", lambda _pid: set(range(cpus)))
    monkeypatch.setattr(dev, "CGROUP_CPU_MAX", tmp_path / "absent")
    assert dev.default_processes() == expected


@pytest.mark.parametrize(("cpu_max", "expected"), [("max 100000", 8), ("150000 100000", 2), ("50000 100000", 1)])
def test_a_cgroup_cpu_quota_caps_the_cpus_dev_sizes_for(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cpu_max: str, expected: int
) -> None:
    monkeypatch.setattr(dev.os, "sched_getaffinity", lambda _pid: set(range(8)))
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    monkeypatch.setattr(dev, "CGROUP_CPU_MAX", tmp_path / "cpu.max")
    assert dev.usable_cpus() == expected


@pytest.mark.parametrize(
    ("configured", "matchers", "expected"), [({}, 1, 1), ({}, 3, 3), ({"EXCHANGE_PARTITIONS": "8"}, 1, 8)]
)
def test_dev_gives_one_partition_per_matcher_process_unless_partitions_are_set(
    configured: dict[str, str], matchers: int, expected: int
) -> None:
    partitions = int(configured.get("EXCHANGE_PARTITIONS", "1"))
    assert dev.dev_partitions(configured, partitions, matchers) == expected


@pytest.mark.parametrize(("option", "value"), [("--matchers", "0"), ("--api-workers", "0"), ("--matchers", "-2")])
def test_dev_refuses_fewer_than_one_matcher_or_api_worker_with_a_usage_error(
    option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # --matchers 0 started every child with no partition (each exiting, restarted every 10 s), --api-workers 0 an
    # api that exited and was restarted forever: refused before anything starts, as argparse refuses a bad value.
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["dev", option, value])

    assert exit_.value.code == 2
    assert f"argument {option}: must be >= 1, not {value}" in capsys.readouterr().err
