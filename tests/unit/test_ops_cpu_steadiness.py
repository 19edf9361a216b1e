"""``ops.cpu_steadiness``: the summary of timed chunks (median, p90 ratio, slow share per second)."""

from __future__ import annotations

import os

import pytest

from ops.cpu_steadiness import chunk, main, steadiness, wakeup_round_trip_s


def test_slow_chunks_are_counted_in_the_second_they_started() -> None:
    samples = [(0.1, 1.0), (0.6, 1.0), (1.2, 2.0), (1.7, 1.0), (2.5, 1.0), (2.9, 1.0)]
    result = steadiness(samples, slow_factor=1.3)
    assert result.median_s == 1.0
    assert result.slow_share_by_second == [0.0, 0.5, 0.0]
    assert result.p90_over_median == 2.0


def test_a_chunk_exactly_at_the_slow_factor_is_not_slow() -> None:
    result = steadiness([(0.0, 1.0), (0.1, 1.0), (0.2, 1.3)], slow_factor=1.3)
    assert result.slow_share_by_second == [0.0]


def test_a_bigger_chunk_takes_longer() -> None:
    assert min(chunk(2_000_000) for _ in range(3)) > min(chunk(20_000) for _ in range(3))


def test_a_wake_up_round_trip_goes_through_a_child_process_and_reaps_it(monkeypatch: pytest.MonkeyPatch) -> None:
    children: list[int] = []
    fork = os.fork

    def recording_fork() -> int:
        pid = fork()
        if pid:
            children.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", recording_fork)
    assert wakeup_round_trip_s(50) > 0
    assert len(children) == 1
    with pytest.raises(ChildProcessError):
        os.waitpid(children[0], os.WNOHANG)  # already reaped


def test_the_command_prints_one_share_per_second(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--seconds", "1.2", "--chunk-additions", "10000", "--wakeups", "0"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("chunk median ")
    assert len(lines[1].split()) == 2
    assert lines[2].endswith(" of 2")


def test_the_command_prints_the_wake_up_round_trip_first(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--seconds", "0.1", "--chunk-additions", "1000", "--wakeups", "20"])
    assert capsys.readouterr().out.startswith("cross-process wake-up round trip median ")
