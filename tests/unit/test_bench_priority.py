"""The bench's senders and receiver claim the CPU in a session of their own (ops.bench.priority), in a forked child
each, as the bench runs them."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest

from ops.bench.priority import raise_priority

AUTOGROUP = Path("/proc/self/autogroup")


def _in_child(nice: int, as_user: int | None, queue: Any) -> None:
    if as_user is not None:
        os.setuid(as_user)
    outcome = raise_priority(nice)
    group = AUTOGROUP.read_text().strip() if AUTOGROUP.exists() else None
    queue.put((outcome, os.getpriority(os.PRIO_PROCESS, 0), os.getsid(0) == os.getpid(), group))


def _forked(nice: int, as_user: int | None = None) -> tuple[str, int, bool, str | None]:
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_in_child, args=(nice, as_user, queue))
    child.start()
    try:
        result: tuple[str, int, bool, str | None] = queue.get(timeout=10)
        return result
    finally:
        child.join(10)


@pytest.mark.skipif(os.geteuid() != 0, reason="raising a priority needs root (CI runs as root)")
def test_raise_priority_puts_the_process_in_its_own_session_at_the_nice_value() -> None:
    outcome, nice, leads_session, group = _forked(-5)
    assert nice == -5
    assert leads_session
    if group is None:
        assert outcome == "nice -5 (no autogroup scheduling)"
    else:
        assert outcome == "nice -5, own scheduling group"
        assert group.endswith("nice -5")


def test_raise_priority_without_the_right_to_reports_it_and_keeps_the_priority() -> None:
    before = os.getpriority(os.PRIO_PROCESS, 0)
    outcome, nice, _, _ = _forked(-5, as_user=65534 if os.geteuid() == 0 else None)
    assert outcome.startswith("not raised (")
    assert "CAP_SYS_NICE" in outcome
    assert nice == before


def test_raise_priority_at_zero_changes_nothing() -> None:
    before = os.getpriority(os.PRIO_PROCESS, 0)
    outcome, nice, leads_session, _ = _forked(0)
    assert outcome == "not raised (--nice 0)"
    assert nice == before
    assert not leads_session
