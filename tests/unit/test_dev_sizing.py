"""``exchange dev`` sizes its api workers and matcher processes by the CPUs it may run on."""

from __future__ import annotations

import pytest

from exchange import dev


@pytest.mark.parametrize(("cpus", "expected"), [(1, 1), (2, 1), (3, 1), (4, 2), (8, 4)])
def test_dev_starts_half_as_many_api_workers_and_matchers_as_it_has_cpus(
    monkeypatch: pytest.MonkeyPatch, cpus: int, expected: int
) -> None:
    monkeypatch.setattr(dev.os, "sched_getaffinity", lambda _pid: set(range(cpus)))
    assert dev.default_processes() == expected
