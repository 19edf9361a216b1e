"""The ops surfaces under /ops: admin-key guard (Bearer or login cookie), the ops page and its JSON, the mounted
dramatiq dashboard listing every queue."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from litestar.testing import TestClient
from sqlalchemy import Connection, Engine, text

from exchange.db.engines import pooled_engine
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


@pytest.mark.parametrize(
    "target",
    [
        "https://evil.example/",
        "//evil.example/ops",
        "/register",
        "/opsX",
        "/ops-evil",
        "/ops/../register",
        "/ops/./../register",
        "/ops/..",
        "/ops/%2e%2e/register",
        "/ops/%2E./register",
        "/ops/%252e%252e/register",
        "/ops/dramatiq/%2e%2e%2f%2e%2e/register",
        "/ops\\..\\register",
        "/ops/%5c..%5cregister",
        "/ops//evil.example",
    ],
)
def test_login_never_redirects_outside_ops(api_client: TestClient[Any], target: str) -> None:
    response = api_client.get("/ops/login", params={"key": ADMIN_KEY, "next": target}, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/ops"


@pytest.mark.parametrize("target", ["/ops", "/ops/", "/ops/data.json", "/ops/dramatiq/queues/matching.1"])
def test_login_redirects_to_any_path_under_ops(api_client: TestClient[Any], target: str) -> None:
    response = api_client.get("/ops/login", params={"key": ADMIN_KEY, "next": target}, follow_redirects=False)
    assert response.headers["location"] == target


def test_dramatiq_dashboard_lists_every_declared_queue(api_client: TestClient[Any]) -> None:
    response = api_client.get("/ops/dramatiq/", headers=ADMIN)
    assert response.status_code == 200
    for queue in QUEUES:
        assert f"/ops/dramatiq/queues/{queue}" in response.text


def test_dramatiq_dashboard_queue_page_opens(api_client: TestClient[Any]) -> None:
    response = api_client.get("/ops/dramatiq/queues/matching.1", headers=ADMIN)
    assert response.status_code == 200
    assert "matching.1" in response.text


def test_ops_data_counts_pending_commands_in_the_symbols_partition(
    api_client: TestClient[Any], client_factory: Callable[..., TestClient[Any]]
) -> None:
    from exchange.messaging.partitions import partition_of

    broker = register(api_client)
    symbol = new_symbol()
    before = api_client.get("/ops/data.json", headers=ADMIN).json()["partitions"]
    order = {"document_number": "1", "side": "bid", "symbol": symbol, "price": 100, "quantity": 5}
    assert api_client.post("/orders", json=order, headers=broker.headers).status_code == 201
    # Another api process: this one serves its snapshot for the page's refresh interval.
    after = client_factory().get("/ops/data.json", headers=ADMIN).json()["partitions"]
    n = partition_of(symbol, 4)
    assert [p["partition"] for p in after] == [0, 1, 2, 3]
    assert after[n]["pending"] >= before[n]["pending"] + 1
    assert after[n]["oldest_age_s"] >= 0


def test_ops_data_shows_best_resting_prices_and_last_trade_per_symbol(
    api_client: TestClient[Any], api_engine: Engine
) -> None:
    seller, buyer = register(api_client), register(api_client)
    symbol = new_symbol()
    resting = ((seller, "ask", 101, 10), (seller, "ask", 102, 4), (buyer, "bid", 101, 3), (buyer, "bid", 99, 2))
    for broker, side, price, quantity in resting:
        body = {"document_number": "1", "side": side, "symbol": symbol, "price": price, "quantity": quantity}
        assert api_client.post("/orders", json=body, headers=broker.headers).status_code == 201
    match(api_engine, symbol)
    pending = {"document_number": "1", "side": "bid", "symbol": symbol, "price": 100, "quantity": 1}
    assert (
        api_client.post("/orders", json=pending, headers=buyer.headers).status_code == 201
    )  # not matched: not resting
    rows = {s["symbol"]: s for s in api_client.get("/ops/data.json", headers=ADMIN).json()["symbols"]}
    row = rows[symbol]
    assert (row["best_bid"], row["best_ask"]) == (99, 101)
    assert row["last_price"] == 101
    assert row["last_trade_at"] is not None


def test_ops_data_is_one_snapshot_per_refresh_interval_for_the_page_and_its_json(api_client: TestClient[Any]) -> None:
    first = api_client.get("/ops/data.json", headers=ADMIN).json()
    page = api_client.get("/ops", headers=ADMIN).text
    assert api_client.get("/ops/data.json", headers=ADMIN).json() == first
    assert first["generated_at"] in page


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


@pytest.fixture
def alone(
    fresh_migrated_database_url: str, client_factory: Callable[..., TestClient[Any]]
) -> Iterator[tuple[TestClient[Any], Engine]]:
    """An api on a database of its own: the ops page lists the worst 20 endpoints, and other tests' come first."""
    engine = pooled_engine(fresh_migrated_database_url)
    yield client_factory(database_url=fresh_migrated_database_url), engine
    engine.dispose()


def test_ops_lists_an_endpoint_whose_events_are_being_retried_before_any_has_failed(
    alone: tuple[TestClient[Any], Engine],
) -> None:
    # A receiver refusing every delivery: its events are retried for ~24 h before the first ends failed (and counts
    # as a consecutive failure); the page said all endpoints were healthy meanwhile.
    api_client, api_engine = alone
    refusing = register(api_client)
    with api_engine.begin() as conn:
        conn.execute(text("UPDATE brokers SET webhook_url = 'https://h.example/r' WHERE id = :id"), {"id": refusing.id})
        _failed_event(conn, refusing.id, "refused", attempted="now()", next_attempt="now() + interval '5 minutes'")

    endpoints = {e["broker_id"]: e for e in api_client.get("/ops/data.json", headers=ADMIN).json()["webhook_endpoints"]}
    admin = {e["broker_id"]: e for e in api_client.get("/admin/webhooks/failing", headers=ADMIN).json()}

    mine = endpoints[refusing.id]
    assert (mine["enabled"], mine["consecutive_failures"], mine["retrying_events"]) == (True, 0, 1)
    assert admin[refusing.id]["retrying_events"] == 1
    assert refusing.name in api_client.get("/ops", headers=ADMIN).text


def test_ops_shows_webhook_urls_without_their_password(alone: tuple[TestClient[Any], Engine]) -> None:
    api_client, api_engine = alone
    broker = register(api_client)
    with api_engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE brokers SET webhook_url = 'http://hook-user:s3cret-pw@h.example/x', webhook_enabled = false"
                " WHERE id = :id"
            ),
            {"id": broker.id},
        )

    data = api_client.get("/ops/data.json", headers=ADMIN)
    page = api_client.get("/ops", headers=ADMIN)

    endpoints = {e["broker_id"]: e for e in data.json()["webhook_endpoints"]}
    assert endpoints[broker.id]["webhook_url"] == "http://hook-user:***@h.example/x"
    assert "s3cret-pw" not in data.text
    assert "s3cret-pw" not in page.text
    assert "hook-user:***@h.example" in page.text


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


def test_the_dramatiq_dashboard_is_503_while_the_database_has_never_answered(
    client_factory: Callable[..., TestClient[Any]],
) -> None:
    # The dashboard reads the exchange's queues under its Redis namespace, derived from the database
    # (exchange.messaging.names): while no answer came, it cannot name them, and says so as the api does.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    client = client_factory(database_url=f"postgresql://postgres@127.0.0.1:{closed}/exchange")

    response = client.get("/ops/dramatiq/", headers=ADMIN)

    assert response.status_code == 503, response.text
    assert response.json()["code"] == "database_unavailable"
