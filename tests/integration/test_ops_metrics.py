"""/metrics (Prometheus exposition of the api plus scrape-time gauges), worker metrics endpoints, and readiness
including the migration check."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
from litestar.testing import TestClient
from prometheus_client import REGISTRY, generate_latest

from exchange.messaging.partitions import partition_of
from exchange.observability import metrics
from exchange.ops.data import GAUGES_TTL_S
from ops.bench.main import free_port
from tests.integration.api_helpers import new_symbol, register

pytest_plugins = ["tests.integration.api_fixtures"]


def sample(exposition: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a text exposition, or None."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    prefix = f"{name}{{{wanted}}} " if labels else f"{name} "
    for line in exposition.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return None


def test_metrics_endpoint_serves_prometheus_text_without_auth(api_client: TestClient[Any]) -> None:
    response = api_client.get("/metrics")
    assert response.status_code == 200
    content_type = response.headers["content-type"]
    assert content_type.startswith("text/plain; version=")
    assert content_type.count("charset") == 1
    assert "# TYPE exchange_http_requests_total counter" in response.text


def test_metrics_count_accepted_orders_by_type_and_side(api_client: TestClient[Any]) -> None:
    broker = register(api_client)
    before = sample(api_client.get("/metrics").text, "exchange_orders_accepted_total", order_type="limit", side="ask")
    body = {"document_number": "1", "side": "ask", "symbol": new_symbol(), "price": 100, "quantity": 1}
    assert api_client.post("/orders", json=body, headers=broker.headers).status_code == 201
    after = sample(api_client.get("/metrics").text, "exchange_orders_accepted_total", order_type="limit", side="ask")
    assert after == (before or 0) + 1


def test_metrics_include_pending_commands_per_partition_and_queue_depths(api_client: TestClient[Any]) -> None:
    text = api_client.get("/metrics").text
    for n in range(4):
        assert sample(text, "exchange_pending_commands", partition=str(n)) is not None
        assert sample(text, "exchange_oldest_pending_command_age_seconds", partition=str(n)) is not None
    for state in ("ready", "delayed", "dead"):
        assert sample(text, "exchange_queue_messages", queue="webhooks", state=state) is not None
    assert 'pid="' not in text  # scrape-time gauges are not per-process values


def test_metrics_read_pending_commands_from_the_database_at_most_once_a_second_per_process(
    api_client: TestClient[Any],
) -> None:
    broker = register(api_client)
    symbol = new_symbol()
    partition = str(partition_of(symbol, 4))
    before = sample(api_client.get("/metrics").text, "exchange_pending_commands", partition=partition)
    body = {"document_number": "1", "side": "ask", "symbol": symbol, "price": 100, "quantity": 1}
    assert api_client.post("/orders", json=body, headers=broker.headers).status_code == 201

    served = sample(api_client.get("/metrics").text, "exchange_pending_commands", partition=partition)
    time.sleep(GAUGES_TTL_S + 0.1)
    read_again = sample(api_client.get("/metrics").text, "exchange_pending_commands", partition=partition)

    assert before is not None
    assert (served, read_again) == (before, before + 1)


def test_metrics_label_requests_by_route_template_not_raw_path(api_client: TestClient[Any]) -> None:
    broker = register(api_client)
    api_client.get("/orders/00000000-0000-0000-0000-000000000000", headers=broker.headers)
    text = api_client.get("/metrics").text
    assert 'route="/orders/{order_id:str}"' in text or 'route="/orders/{order_id}"' in text
    assert "00000000-0000" not in text


def test_metrics_still_answer_when_redis_is_down(client_factory: Callable[..., TestClient[Any]]) -> None:
    client = client_factory(redis_url="redis://127.0.0.1:1/0")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert sample(response.text, "exchange_pending_commands", partition="0") is not None  # a sample, not # HELP
    assert "exchange_queue_messages{" not in response.text


def families(exposition: str) -> set[str]:
    """The exchange's metric families in a text exposition (``# TYPE`` lines; not the ``_created`` ones)."""
    return {
        line.split()[2]
        for line in exposition.splitlines()
        if line.startswith("# TYPE exchange_") and not line.split()[2].endswith("_created")
    }


COMMON = {"exchange_database_errors_total"}
SCRAPE_TIME = {"exchange_pending_commands", "exchange_oldest_pending_command_age_seconds", "exchange_queue_messages"}


def _worker_exposition(kind: str) -> str:
    port = free_port()
    assert metrics.start_worker_metrics_server(kind, port)
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text


def test_api_metrics_hold_the_api_families_only(api_client: TestClient[Any]) -> None:
    assert families(api_client.get("/metrics").text) == {
        *COMMON,
        *SCRAPE_TIME,
        "exchange_http_requests_total",
        "exchange_http_request_duration_seconds",
        "exchange_orders_accepted_total",
        "exchange_gc_pause_seconds",
    }  # was every kind's: exchange_match_trades_total, exchange_sweeper_expiries_total, ... at 0


def test_matcher_metrics_endpoint_holds_the_matcher_families_only() -> None:
    metrics.MATCH_BATCH_SIZE.observe(3)
    metrics.MATCH_SYMBOLS.observe(2)
    text = _worker_exposition("matcher")
    assert families(text) == {
        *COMMON,
        "exchange_match_batch_size",
        "exchange_match_batch_duration_seconds",
        "exchange_match_symbols_per_transaction",
        "exchange_match_trades_total",
        "exchange_book_rebuilds_total",
        "exchange_match_symbol_failures_total",
        "exchange_gc_pause_seconds",
    }
    assert (sample(text, "exchange_match_batch_size_count") or 0) >= 1


def test_webhook_worker_metrics_endpoint_holds_the_webhook_families_only() -> None:
    metrics.record_webhook_delivery("delivered", 0.02)
    text = _worker_exposition("webhooks")
    assert families(text) == {
        *COMMON,
        "exchange_webhook_deliveries_total",
        "exchange_webhook_delivery_duration_seconds",
        "exchange_gc_pause_seconds",
    }
    assert sample(text, "exchange_webhook_deliveries_total", outcome="delivered") is not None


def test_sweeper_metrics_endpoint_holds_the_sweeper_families_only() -> None:
    assert families(_worker_exposition("sweeper")) == {
        *COMMON,
        "exchange_sweeper_renudges_total",
        "exchange_sweeper_expiries_total",
        "exchange_sweeper_webhook_attempts_deleted_total",
    }  # no exchange_gc_pause_seconds: the sweeper never times its collections


def test_every_metric_family_is_served_by_some_process_kind() -> None:
    defined = {name.removesuffix("_total") for name in families(generate_latest(REGISTRY).decode())}
    assert defined <= set(metrics.SERVED_BY)


def test_worker_metrics_endpoint_is_skipped_for_port_zero_or_a_taken_port() -> None:
    assert metrics.start_worker_metrics_server("matcher", 0) is False
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert metrics.start_worker_metrics_server("matcher", taken.getsockname()[1]) is False


def test_ready_reports_migrations_at_head(api_client: TestClient[Any]) -> None:
    body = api_client.get("/health/ready").json()
    assert body["checks"]["migrations"]["ok"] is True


def test_ready_is_503_naming_migrations_when_the_schema_is_not_at_head(
    client_factory: Callable[..., TestClient[Any]], fresh_database_url: str
) -> None:
    from exchange.db import migrate

    migrate.upgrade(fresh_database_url, "0001")
    client = client_factory(database_url=fresh_database_url)
    response = client.get("/health/ready")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["postgres"]["ok"] is True
    assert checks["migrations"]["ok"] is False
    assert migrate.head() in checks["migrations"]["error"]
