"""The ops surfaces under /ops: admin-key guard (Bearer or login cookie), the ops page and its JSON, the mounted
dramatiq dashboard listing every queue."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from litestar.testing import TestClient
from sqlalchemy import Connection, Engine, text

from exchange.ops.auth import COOKIE_MAX_AGE_S, COOKIE_NAME, session_token, session_valid
from tests.integration.api_helpers import ADMIN_KEY, match, new_symbol, register

pytest_plugins = ["tests.integration.api_fixtures"]

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
QUEUES = ["matching.0", "matching.1", "matching.2", "matching.3", "webhooks"]


@pytest.mark.parametrize("path", ["/ops", "/ops/data.json", "/ops/dramatiq/", "/ops/dramatiq/queues/webhooks"])
def test_ops_paths_refuse_requests_without_the_admin_key(api_client: TestClient[Any], path: str) -> None:
    response = api_client.get(path)
    assert response.status_code == 401
    assert response.json()["code"] == "unauthorized"
    assert api_client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_ops_paths_are_503_when_no_admin_key_is_configured(client_factory: Callable[..., TestClient[Any]]) -> None:
    client = client_factory(admin_api_key="")
    assert client.get("/ops", headers=ADMIN).json()["code"] == "admin_disabled"


def test_login_with_the_admin_key_sets_an_httponly_cookie_that_opens_the_ops_pages(
    client_factory: Callable[..., TestClient[Any]],
) -> None:
    client = client_factory()
    response = client.get("/ops/login", params={"key": ADMIN_KEY, "next": "/ops/dramatiq/"}, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/ops/dramatiq/"
    set_cookie = response.headers["set-cookie"]
    assert "HttpOnly" in set_cookie
    assert "SameSite=strict" in set_cookie
    assert ADMIN_KEY not in set_cookie  # the cookie holds a derived token, never the key
    assert client.get("/ops/dramatiq/").status_code == 200
    assert client.get("/ops").status_code == 200


def test_login_with_a_wrong_key_is_refused_and_sets_no_cookie(api_client: TestClient[Any]) -> None:
    response = api_client.get("/ops/login", params={"key": "nope"}, follow_redirects=False)
    assert response.status_code == 401
    assert COOKIE_NAME not in response.headers.get("set-cookie", "")


def test_login_never_redirects_outside_ops(api_client: TestClient[Any]) -> None:
    for target in ("https://evil.example/", "//evil.example/ops", "/register"):
        response = api_client.get("/ops/login", params={"key": ADMIN_KEY, "next": target}, follow_redirects=False)
        assert response.headers["location"] == "/ops"


def test_dramatiq_dashboard_lists_every_declared_queue(api_client: TestClient[Any]) -> None:
    response = api_client.get("/ops/dramatiq/", headers=ADMIN)
    assert response.status_code == 200
    for queue in QUEUES:
        assert f"/ops/dramatiq/queues/{queue}" in response.text


def test_dramatiq_dashboard_queue_page_opens(api_client: TestClient[Any]) -> None:
    response = api_client.get("/ops/dramatiq/queues/matching.1", headers=ADMIN)
    assert response.status_code == 200
    assert "matching.1" in response.text


def test_ops_data_counts_pending_commands_in_the_symbols_partition(api_client: TestClient[Any]) -> None:
    from exchange.messaging.partitions import partition_of

    broker = register(api_client)
    symbol = new_symbol()
    before = api_client.get("/ops/data.json", headers=ADMIN).json()["partitions"]
    order = {"document_number": "1", "side": "bid", "symbol": symbol, "price": 100, "quantity": 5}
    assert api_client.post("/orders", json=order, headers=broker.headers).status_code == 201
    after = api_client.get("/ops/data.json", headers=ADMIN).json()["partitions"]
    n = partition_of(symbol, 4)
    assert [p["partition"] for p in after] == [0, 1, 2, 3]
    assert after[n]["pending"] >= before[n]["pending"] + 1
    assert after[n]["oldest_age_s"] >= 0


def test_ops_data_shows_book_depth_and_last_trade_per_symbol(api_client: TestClient[Any], api_engine: Engine) -> None:
    seller, buyer = register(api_client), register(api_client)
    symbol = new_symbol()
    for broker, side, price, quantity in ((seller, "ask", 101, 10), (seller, "ask", 102, 4), (buyer, "bid", 101, 3)):
        body = {"document_number": "1", "side": side, "symbol": symbol, "price": price, "quantity": quantity}
        assert api_client.post("/orders", json=body, headers=broker.headers).status_code == 201
    match(api_engine, symbol)
    rows = {s["symbol"]: s for s in api_client.get("/ops/data.json", headers=ADMIN).json()["symbols"]}
    row = rows[symbol]
    assert (row["ask_orders"], row["ask_quantity"], row["best_ask"]) == (2, 11, 101)
    assert (row["bid_orders"], row["bid_quantity"]) == (0, 0)
    assert row["last_price"] == 101
    assert row["last_trade_at"] is not None


def test_ops_data_lists_failing_or_disabled_webhooks_and_recent_errors(
    api_client: TestClient[Any], api_engine: Engine
) -> None:
    failing, disabled = register(api_client), register(api_client)
    error_text = f"connect timeout {uuid.uuid4().hex[:6]}"
    with api_engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE brokers SET webhook_url = 'https://h.example/x', webhook_consecutive_failures = 3"
                " WHERE id = :id"
            ),
            {"id": failing.id},
        )
        conn.execute(
            text(
                "UPDATE brokers SET webhook_url = 'https://h.example/y', webhook_enabled = false,"
                " webhook_disabled_reason = 'too many failures' WHERE id = :id"
            ),
            {"id": disabled.id},
        )
        _failed_event(conn, failing.id, error_text, attempted="now()", next_attempt="now() + interval '1 hour'")
    data = api_client.get("/ops/data.json", headers=ADMIN).json()
    endpoints = {e["broker_id"]: e for e in data["webhook_endpoints"]}
    assert endpoints[failing.id]["consecutive_failures"] == 3
    assert endpoints[disabled.id]["enabled"] is False
    assert endpoints[disabled.id]["disabled_reason"] == "too many failures"
    assert any(e["error"] == error_text and e["broker_id"] == failing.id for e in data["recent_errors"])


def test_ops_page_is_html_with_every_section_and_escapes_outside_text(
    api_client: TestClient[Any], api_engine: Engine
) -> None:
    broker = register(api_client, name=f"<b>evil-{uuid.uuid4().hex[:6]}</b>")
    with api_engine.begin() as conn:
        conn.execute(
            text("UPDATE brokers SET webhook_url = 'https://h.example/z', webhook_enabled = false WHERE id = :id"),
            {"id": broker.id},
        )
    response = api_client.get("/ops", headers=ADMIN)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    for table_id in ("partitions", "queues", "symbols", "webhooks", "errors"):
        assert f'id="{table_id}"' in response.text
    assert broker.name not in response.text
    assert "&lt;b&gt;evil-" in response.text


def _failed_event(conn: Connection, broker_id: str, error: str, *, attempted: str, next_attempt: str) -> None:
    """A pending webhook event of ``broker_id`` whose last attempt (at ``attempted``, SQL) failed with ``error``."""
    conn.execute(
        text(
            "WITH e AS (INSERT INTO webhook_events (broker_id, sequence, type, payload, attempts, last_error,"
            f" next_attempt_at) VALUES (:b, (SELECT coalesce(max(sequence), 0) + 1 FROM webhook_events"
            f" WHERE broker_id = :b), 'order.fill', '{{}}', 2, :e, {next_attempt}) RETURNING id)"
            " INSERT INTO webhook_attempts (event_id, broker_id, attempted_at, url, error)"
            f" SELECT id, :b, {attempted}, 'https://h.example/x', :e FROM e"
        ),
        {"b": broker_id, "e": error},
    )


def test_ops_recent_errors_are_the_latest_failed_attempts_not_the_latest_retries_due(
    api_client: TestClient[Any], api_engine: Engine
) -> None:
    down_for_hours, just_failing = register(api_client), register(api_client)
    with api_engine.begin() as conn:
        for n in range(25):  # deep in their retry schedule: next attempts hours ahead
            _failed_event(
                conn,
                down_for_hours.id,
                f"refused {n}",
                attempted=f"now() - interval '{n + 2} minutes'",
                next_attempt="now() + interval '9 hours'",
            )
        _failed_event(conn, just_failing.id, "just now", attempted="now()", next_attempt="now() + interval '5 s'")

    data = api_client.get("/ops/data.json", headers=ADMIN).json()

    errors = data["recent_errors"]
    assert (errors[0]["broker_id"], errors[0]["error"]) == (just_failing.id, "just now")
    assert all(e["attempted_at"] <= data["generated_at"] for e in errors)
    assert [e["attempted_at"] for e in errors] == sorted((e["attempted_at"] for e in errors), reverse=True)


def test_an_ops_cookie_opens_the_pages_for_twelve_hours_after_its_login_only(api_client: TestClient[Any]) -> None:
    now = int(time.time())
    fresh = session_token(ADMIN_KEY, now - COOKIE_MAX_AGE_S + 60)
    stale = session_token(ADMIN_KEY, now - COOKIE_MAX_AGE_S - 60)  # a copied cookie: the browser's expiry is gone
    issued, _, mac = fresh.partition(".")
    moved = f"{now}.{mac}"  # its time changed, its MAC kept
    other_key = session_token("another admin key", now)

    def status(cookie: str) -> int:
        return api_client.get("/ops/data.json", headers={"Cookie": f"{COOKIE_NAME}={cookie}"}).status_code

    assert [status(c) for c in (fresh, stale, moved, other_key, "garbage", issued)] == [200, 401, 401, 401, 401, 401]
    assert not session_valid("\u00b2.abc", ADMIN_KEY, now)  # a digit to str.isdigit(), not to int(): was a 500
