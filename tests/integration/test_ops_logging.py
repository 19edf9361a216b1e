"""Structured logs: JSON lines, request ids in and out of the api and across dramatiq messages into the workers'
logs, X-Process-Time, slow-request warnings."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import dramatiq
import pytest
import redis
from litestar.testing import TestClient

from exchange.messaging.partitions import matching_queue, partition_of
from exchange.messaging.wakeups import busy_key
from exchange.observability.context import current_request_id, request_id_var
from exchange.observability.logs import JsonFormatter, TextFormatter
from exchange.observability.propagation import REQUEST_ID_OPTION, RequestIdMiddleware
from tests.integration.api_fixtures import app_namespace
from tests.integration.api_helpers import new_symbol, register

pytest_plugins = ["tests.integration.api_fixtures"]


def test_response_echoes_the_clients_request_id_and_process_time(api_client: TestClient[Any]) -> None:
    response = api_client.get("/health/live", headers={"X-Request-ID": "client-rid-42"})
    assert response.headers["x-request-id"] == "client-rid-42"
    assert float(response.headers["x-process-time"]) >= 0


def test_response_gets_a_fresh_request_id_when_the_client_sends_none_or_a_bad_one(api_client: TestClient[Any]) -> None:
    first = api_client.get("/health/live").headers["x-request-id"]
    second = api_client.get("/health/live", headers={"X-Request-ID": "bad id\twith spaces"}).headers["x-request-id"]
    assert len(first) == 32
    assert first != second
    assert " " not in second


def test_error_responses_carry_the_request_id_too(api_client: TestClient[Any]) -> None:
    unauthorised = api_client.post("/orders", json={}, headers={"X-Request-ID": "rid-err"})
    no_route = api_client.get("/nope/1", headers={"X-Request-ID": "rid-404"})
    no_method = api_client.delete("/health", headers={"X-Request-ID": "rid-405"})
    assert (unauthorised.status_code, no_route.status_code, no_method.status_code) == (401, 404, 405)
    assert unauthorised.headers["x-request-id"] == "rid-err"
    assert no_route.headers["x-request-id"] == "rid-404"
    assert no_method.headers["x-request-id"] == "rid-405"


def test_requests_matching_no_route_or_method_are_logged_and_counted_as_unmatched(
    api_client: TestClient[Any], caplog: pytest.LogCaptureFixture
) -> None:
    def unmatched(status: str, method: str) -> float:
        for line in api_client.get("/metrics").text.splitlines():
            if line.startswith(
                f'exchange_http_requests_total{{method="{method}",route="unmatched",status="{status}"}}'
            ):
                return float(line.split()[-1])
        return 0.0

    before = (unmatched("404", "GET"), unmatched("405", "DELETE"))
    with caplog.at_level(logging.INFO, logger="exchange.access"):
        api_client.get("/nope/1", headers={"X-Request-ID": "rid-404-log"})
        api_client.delete("/health", headers={"X-Request-ID": "rid-405-log"})
    logged = [r for r in caplog.records if r.name == "exchange.access"]
    assert [(r.status, r.route) for r in logged] == [(404, "unmatched"), (405, "unmatched")]  # type: ignore[attr-defined]
    assert (unmatched("404", "GET"), unmatched("405", "DELETE")) == (before[0] + 1, before[1] + 1)


def test_slow_request_is_logged_as_a_warning_above_the_threshold(
    client_factory: Callable[..., TestClient[Any]], caplog: pytest.LogCaptureFixture
) -> None:
    client = client_factory(slow_request_ms="1")
    with caplog.at_level(logging.INFO, logger="exchange.access"):
        client.get("/health/ready", headers={"X-Request-ID": "rid-slow"})
    slow = [r for r in caplog.records if r.name == "exchange.access" and getattr(r, "slow", False)]
    assert slow, [r.getMessage() for r in caplog.records]
    assert slow[0].levelno == logging.WARNING
    assert "slow request GET /health/ready" in slow[0].getMessage()


def test_access_line_never_contains_the_query_string(
    api_client: TestClient[Any], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="exchange.access"):
        api_client.get("/ops/login", params={"key": "secret-admin-key-in-url"}, follow_redirects=False)
    assert caplog.records
    assert all("secret-admin-key-in-url" not in JsonFormatter().format(r) for r in caplog.records)


def test_order_wake_up_message_carries_the_request_id(api_client: TestClient[Any], api_redis_url: str) -> None:
    broker = register(api_client)
    symbol = new_symbol()
    body = {"document_number": "1", "side": "bid", "symbol": symbol, "price": 100, "quantity": 1}
    client = redis.Redis.from_url(api_redis_url)
    namespace = app_namespace(api_client)
    client.delete(
        busy_key(namespace, partition_of(symbol, 4))
    )  # held by an earlier test's wake-up: this one would send none
    response = api_client.post("/orders", json=body, headers={**broker.headers, "X-Request-ID": f"rid-{symbol}"})
    assert response.status_code == 201
    mine: list[dramatiq.Message[Any]] = []
    deadline = time.monotonic() + 5  # the wake-up is sent by its own task, right after the commit
    while not mine and time.monotonic() < deadline:
        raw = client.hvals(f"{namespace}:{matching_queue(partition_of(symbol, 4))}.msgs")
        mine = [m for m in map(dramatiq.Message.decode, raw) if symbol in m.args]
        time.sleep(0.01)
    assert mine
    assert mine[0].options[REQUEST_ID_OPTION] == f"rid-{symbol}"


def test_worker_side_sets_the_request_id_while_processing_and_forwards_it_on_enqueue() -> None:
    middleware = RequestIdMiddleware()
    incoming = dramatiq.Message(queue_name="matching.0", actor_name="match_0", args=("X",), kwargs={}, options={})
    incoming.options[REQUEST_ID_OPTION] = "rid-w"
    middleware.before_process_message(None, incoming)  # type: ignore[arg-type]
    try:
        assert current_request_id() == "rid-w"
        outgoing = dramatiq.Message(queue_name="webhooks", actor_name="deliver", args=("e",), kwargs={}, options={})
        middleware.before_enqueue(None, outgoing, None)  # type: ignore[arg-type]
        assert outgoing.options[REQUEST_ID_OPTION] == "rid-w"
    finally:
        middleware.after_process_message(None, incoming)  # type: ignore[arg-type]
    assert current_request_id() is None


def test_json_log_line_is_one_object_with_request_id_and_extras() -> None:
    token = request_id_var.set("rid-json")
    try:
        record = logging.LogRecord("exchange.matcher", logging.INFO, __file__, 1, "matched %s", ('X\n"Y',), None)
        record.order_ids = ["a", "b"]
        record.unserialisable = object()
        line = JsonFormatter().format(record)
    finally:
        request_id_var.reset(token)
    assert "\n" not in line
    body = json.loads(line)
    assert body["msg"] == 'matched X\n"Y'
    assert body["request_id"] == "rid-json"
    assert body["level"] == "info"
    assert body["logger"] == "exchange.matcher"
    assert body["order_ids"] == ["a", "b"]
    assert body["unserialisable"].startswith("<object")


def test_json_log_line_has_the_records_utc_time_to_the_millisecond_and_stays_valid_json_for_any_value() -> None:
    formatter = JsonFormatter()
    for created in (1_796_000_000.0, 1_796_000_000.9994, 1_796_000_001.25):  # a second's first and last ms, the next
        record = logging.LogRecord("exchange.access", logging.INFO, __file__, 1, "line", (), None)
        record.created, record.msecs = created, int((created - int(created)) * 1000)
        record.odd = {(1, 2): float("nan"), None: b"\x00"}
        body = json.loads(formatter.format(record))
        expected = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
        assert body["ts"] == expected
        assert body["odd"] == {"(1, 2)": None, "None": "AA=="}
    del record.odd
    record.msg = "lone \ud800 surrogate"  # not encodable as UTF-8
    assert json.loads(formatter.format(record))["msg"] == "lone \ud800 surrogate"


def test_text_log_line_has_the_records_local_time_to_the_millisecond_in_each_second() -> None:
    formatter = TextFormatter()
    for created in (1_796_000_000.0, 1_796_000_000.9994, 1_796_000_001.25, 1_795_999_999.5):  # and back a second
        record = logging.LogRecord("exchange.access", logging.INFO, __file__, 1, "line", (), None)
        record.created, record.msecs = created, int((created - int(created)) * 1000)
        expected = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)) + f",{record.msecs:03d}"
        assert formatter.format(record) == f"{expected} INFO [exchange.access] line"
