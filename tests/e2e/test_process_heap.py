"""Every api worker and dramatiq worker of the exchange settles its heap once started (``exchange.heap``)."""

from __future__ import annotations

from tests.e2e.conftest import MATCHER_SPLITS, Harness, wait_until

SETTLED = b"heap settled:"


def _settled(harness: Harness, name: str) -> int:
    return harness.services[name].log_path.read_bytes().count(SETTLED)


def test_each_api_worker_matcher_and_webhook_worker_settles_its_heap_after_start_up(e2e_harness: Harness) -> None:
    h = e2e_harness
    names = ["api", *MATCHER_SPLITS, "webhooks"]
    wait_until(lambda: all(_settled(h, name) >= 1 for name in names), message=f"'heap settled' in each of {names}")
    assert _settled(h, "api") >= 2  # each of the two gunicorn workers, after loading the app
