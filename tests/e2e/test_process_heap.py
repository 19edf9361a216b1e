"""Every api worker and dramatiq worker of the exchange settles its heap once started (``exchange.heap``)."""

from __future__ import annotations

import httpx

from tests.e2e.conftest import MATCHER_SPLITS, Harness, wait_until
from tests.integration.test_ops_metrics import sample

SETTLED = b"heap settled:"


def _settled(harness: Harness, name: str) -> int:
    return harness.services[name].log_path.read_bytes().count(SETTLED)


def test_each_api_worker_matcher_and_webhook_worker_settles_its_heap_after_start_up(e2e_harness: Harness) -> None:
    h = e2e_harness
    wanted = {"api": 2, **dict.fromkeys(MATCHER_SPLITS, 1), "webhooks": 1}  # the api: each of its two workers
    wait_until(
        lambda: all(_settled(h, name) >= count for name, count in wanted.items()),
        message=f"'heap settled' lines: {wanted} at least",
    )


def test_the_api_and_the_webhook_worker_export_their_collections_pauses_from_the_settling_one_on(
    e2e_harness: Harness,
) -> None:
    h = e2e_harness

    def scrapes() -> list[tuple[str, int]]:  # the api's two gunicorn workers add up
        api = h.client.get("/metrics").text
        webhooks = httpx.get(f"http://127.0.0.1:{h.webhooks_metrics_port}/metrics", timeout=5).text
        return [(api, 2), (webhooks, 1)]

    def settled_collections_reported() -> bool:  # reported within a second (exchange.heap.REPORT_EVERY_S)
        return all((sample(text, "exchange_gc_pause_seconds_count", generation="2") or 0) >= n for text, n in scrapes())

    wait_until(settled_collections_reported, message="each process's settling collection in exchange_gc_pause_seconds")
    for text, _ in scrapes():
        assert (sample(text, "exchange_gc_pause_seconds_sum", generation="2") or 0) > 0
        for generation in ("0", "1"):
            assert sample(text, "exchange_gc_pause_seconds_count", generation=generation) is not None  # exported


def test_each_matcher_keeps_its_heap_frozen_as_its_books_grow(e2e_harness: Harness) -> None:
    """After its first transaction a matcher collects and freezes what survived (``exchange.heap.Keeper``): a
    full collection of its own, reported with the settling one."""
    h = e2e_harness
    broker = h.register_broker("heap-keeper")
    for n in range(8):  # several symbols, so that each matcher gets some
        broker.place(f"KEEP{n}", "bid", 1, 100 + n)

    def gen2(name: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{h.matcher_metrics_ports[name]}/metrics", timeout=5).text
        return sample(text, "exchange_gc_pause_seconds_count", generation="2") or 0

    wait_until(
        lambda: all(gen2(name) >= 2 for name in MATCHER_SPLITS),
        message="each matcher's settling collection and at least one keep in exchange_gc_pause_seconds",
    )
