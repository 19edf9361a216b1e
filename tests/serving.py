"""Waiting in tests: for a condition to hold, for a server process the tests started to answer over HTTP."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest


def wait_until_answering(
    url: str, process: subprocess.Popen[bytes], timeout_s: float, *, details: Callable[[], str] = str
) -> None:
    """Poll ``url`` until it answers 200. Fails the test at once when ``process`` exits first, and after
    ``timeout_s``; ``details()`` (the process's log, say) is added to either message."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args!r} exited with {process.returncode} before {url} answered:\n{details()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{url} did not answer within {timeout_s:g} s:\n{details()}")


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, message: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` seconds pass (fail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:.1f}s waiting for {message or predicate!r}")
        time.sleep(interval)
