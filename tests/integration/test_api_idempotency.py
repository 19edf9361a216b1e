"""Retries with a client_order_id or an Idempotency-Key return the original order and never write a second one,
also when the duplicates arrive concurrently."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from litestar.testing import AsyncTestClient, TestClient
from sqlalchemy import Engine, text

from exchange.api.app import create_app
from exchange.config import Settings
from tests.integration.api_helpers import ADMIN_KEY, count, new_symbol, register

pytest_plugins = ["tests.integration.api_fixtures"]

PLACES = "SELECT count(*) FROM orders o JOIN commands c ON c.order_id = o.id WHERE o.broker_id = :b"


def order(symbol: str, **extra: Any) -> dict[str, Any]:
    return {"document_number": "1", "side": "bid", "symbol": symbol, "price": 100, "quantity": 5, **extra}


def test_a_repeated_client_order_id_returns_the_original_order(api_client: TestClient[Any], api_engine: Engine) -> None:
    broker = register(api_client)
    symbol = new_symbol()
    first = api_client.post("/orders", json=order(symbol, client_order_id="c-1"), headers=broker.headers)
    again = api_client.post("/orders", json=order(symbol, client_order_id="c-1"), headers=broker.headers)
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["client_order_id"] == "c-1"
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert count(api_engine, PLACES, b=broker.id) == 1


def test_a_repeated_idempotency_key_returns_the_original_order(api_client: TestClient[Any], api_engine: Engine) -> None:
    broker = register(api_client)
    symbol = new_symbol()
    headers = {**broker.headers, "Idempotency-Key": "retry-42"}
    first = api_client.post("/orders", json=order(symbol), headers=headers)
    again = api_client.post("/orders", json=order(symbol), headers=headers)
    assert again.json()["id"] == first.json()["id"]
    assert count(api_engine, PLACES, b=broker.id) == 1


def test_the_same_client_order_id_from_two_brokers_makes_two_orders(
    api_client: TestClient[Any], api_engine: Engine
) -> None:
    a, b = register(api_client), register(api_client)
    symbol = new_symbol()
    ra = api_client.post("/orders", json=order(symbol, client_order_id="same"), headers=a.headers).json()
    rb = api_client.post("/orders", json=order(symbol, client_order_id="same"), headers=b.headers).json()
    assert ra["id"] != rb["id"]
    assert count(api_engine, PLACES, b=a.id) == count(api_engine, PLACES, b=b.id) == 1


@pytest.mark.parametrize("kind", ["client_order_id", "idempotency_key"])
def test_a_reused_key_with_a_different_order_is_refused_and_writes_nothing(
    api_client: TestClient[Any], api_engine: Engine, kind: str
) -> None:
    broker = register(api_client)
    symbol = new_symbol()
    headers = {**broker.headers, "Idempotency-Key": "k-7"} if kind == "idempotency_key" else broker.headers
    extra = {"client_order_id": "k-7"} if kind == "client_order_id" else {}
    first = api_client.post("/orders", json=order(symbol, **extra), headers=headers)
    changed = api_client.post("/orders", json=order(symbol, quantity=6, **extra), headers=headers)
    assert first.status_code == 201
    assert changed.status_code == 422
    assert changed.json()["code"] == "idempotency_key_reused"
    assert count(api_engine, PLACES, b=broker.id) == 1
    assert count(api_engine, "SELECT quantity FROM orders WHERE broker_id = :b", b=broker.id) == 5


@pytest.mark.parametrize("second", [{"client_order_id": "second"}, {}], ids=["another", "none"])
def test_an_idempotency_key_repeated_with_another_client_order_id_is_refused(
    api_client: TestClient[Any], api_engine: Engine, second: dict[str, Any]
) -> None:
    broker = register(api_client)
    symbol = new_symbol()
    headers = {**broker.headers, "Idempotency-Key": "k-8"}
    first = api_client.post("/orders", json=order(symbol, client_order_id="first"), headers=headers)
    changed = api_client.post("/orders", json=order(symbol, **second), headers=headers)
    assert first.status_code == 201
    assert (changed.status_code, changed.json()["code"]) == (422, "idempotency_key_reused")
    assert changed.json()["details"] == {"field": "Idempotency-Key"}
    assert count(api_engine, PLACES, b=broker.id) == 1


def test_a_client_order_id_repeated_under_another_idempotency_key_returns_the_original_order(
    api_client: TestClient[Any], api_engine: Engine
) -> None:
    broker = register(api_client)
    symbol = new_symbol()
    first = api_client.post(
        "/orders", json=order(symbol, client_order_id="c-9"), headers={**broker.headers, "Idempotency-Key": "k-1"}
    )
    again = api_client.post(
        "/orders", json=order(symbol, client_order_id="c-9"), headers={**broker.headers, "Idempotency-Key": "k-2"}
    )
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json()["id"] == first.json()["id"]
    assert count(api_engine, PLACES, b=broker.id) == 1


def test_a_request_repeating_one_orders_client_order_id_and_anothers_idempotency_key_resolves_to_the_earlier(
    api_client: TestClient[Any], api_engine: Engine
) -> None:
    # The original is the earliest order of the broker with either key: one found by its client_order_id, the
    # other by its Idempotency-Key.
    broker = register(api_client)
    symbol = new_symbol()
    by_id = api_client.post("/orders", json=order(symbol, client_order_id="c-a"), headers=broker.headers)
    by_key = api_client.post(
        "/orders",
        json=order(symbol, quantity=7, client_order_id="c-b"),
        headers={**broker.headers, "Idempotency-Key": "k-b"},
    )
    both = {**broker.headers, "Idempotency-Key": "k-b"}
    replay = api_client.post("/orders", json=order(symbol, client_order_id="c-a"), headers=both)
    assert (by_id.status_code, by_key.status_code, replay.status_code) == (201, 201, 201)
    assert replay.json()["id"] == by_id.json()["id"]
    assert replay.headers["idempotent-replayed"] == "true"
    # The later order's fields under both keys: compared with the earlier one, the client_order_id it repeats.
    refused = api_client.post("/orders", json=order(symbol, quantity=7, client_order_id="c-a"), headers=both)
    assert (refused.status_code, refused.json()["code"]) == (422, "idempotency_key_reused")
    assert refused.json()["details"] == {"field": "client_order_id"}
    assert count(api_engine, PLACES, b=broker.id) == 2


def test_a_retry_after_the_order_was_amended_still_returns_the_original_order(
    api_client: TestClient[Any], api_engine: Engine
) -> None:
    broker = register(api_client)
    symbol = new_symbol()
    first = api_client.post("/orders", json=order(symbol, client_order_id="amended"), headers=broker.headers)
    with api_engine.begin() as conn:  # what the matcher writes after an amend or an STP decrement
        conn.execute(
            text("UPDATE orders SET price = 101, quantity = 3, remaining = 3 WHERE id = :id"),
            {"id": first.json()["id"]},
        )
    again = api_client.post("/orders", json=order(symbol, client_order_id="amended"), headers=broker.headers)
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert count(api_engine, PLACES, b=broker.id) == 1


def test_a_retry_of_an_ioc_order_stored_without_its_valid_until_still_returns_the_original_order(
    api_client: TestClient[Any], api_engine: Engine
) -> None:
    broker = register(api_client)
    symbol = new_symbol()
    valid_until = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    ioc = order(symbol, client_order_id="old-ioc", time_in_force="ioc", valid_until=valid_until)
    first = api_client.post("/orders", json=ioc, headers=broker.headers)
    with api_engine.begin() as conn:  # as an api worker of before ioc/fok orders kept their valid_until stored it
        conn.execute(text("UPDATE orders SET valid_until = NULL WHERE id = :id"), {"id": first.json()["id"]})
    again = api_client.post("/orders", json=ioc, headers=broker.headers)
    other = api_client.post("/orders", json={**ioc, "quantity": 6}, headers=broker.headers)
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert (other.status_code, other.json()["code"]) == (422, "idempotency_key_reused")
    assert count(api_engine, PLACES, b=broker.id) == 1


def keyed(broker_headers: dict[str, str], kind: str, key: str) -> tuple[dict[str, str], dict[str, str]]:
    """The headers and the extra body fields of a request carrying ``key`` as ``kind``."""
    if kind == "idempotency_key":
        return {**broker_headers, "Idempotency-Key": key}, {}
    return broker_headers, {"client_order_id": key}


@pytest.mark.parametrize("kind", ["client_order_id", "idempotency_key"])
def test_a_retry_arriving_after_the_orders_valid_until_still_returns_the_original_order(
    api_client: TestClient[Any], api_engine: Engine, kind: str
) -> None:
    # A seed client's IOC carries a short valid_until; its answer lost, the retry comes once it has passed. The
    # order exists (it may have traded): "valid_until must be in the future" would tell the client it does not.
    broker = register(api_client)
    symbol = new_symbol()
    headers, extra = keyed(broker.headers, kind, "late-retry")
    valid_until = (datetime.now(UTC) + timedelta(milliseconds=300)).isoformat()
    ioc = order(symbol, time_in_force="ioc", valid_until=valid_until, **extra)
    first = api_client.post("/orders", json=ioc, headers=headers)
    time.sleep(0.4)
    again = api_client.post("/orders", json=ioc, headers=headers)
    changed = api_client.post("/orders", json={**ioc, "quantity": 6}, headers=headers)
    assert (first.status_code, again.status_code) == (201, 201), again.json()
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert (changed.status_code, changed.json()["code"]) == (422, "idempotency_key_reused")
    assert count(api_engine, PLACES, b=broker.id) == 1


@pytest.mark.parametrize("kind", ["client_order_id", "idempotency_key"])
def test_a_new_keyed_order_whose_valid_until_has_passed_is_refused(
    api_client: TestClient[Any], api_engine: Engine, kind: str
) -> None:
    broker = register(api_client)
    headers, extra = keyed(broker.headers, kind, "never-used")
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    answer = api_client.post("/orders", json=order(new_symbol(), valid_until=past, **extra), headers=headers)
    assert (answer.status_code, answer.json()["code"]) == (422, "validation_error")
    assert answer.json()["details"] == {"field": "valid_until"}
    assert count(api_engine, PLACES, b=broker.id) == 0


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["client_order_id", "idempotency_key"])
async def test_concurrent_duplicates_create_exactly_one_order_and_one_command(
    api_settings_factory: Callable[..., Settings], api_engine: Engine, kind: str
) -> None:
    app = create_app(api_settings_factory())
    async with AsyncTestClient(app) as client:
        response = await client.post(
            "/register", json={"name": "racer"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        )
        broker_id, key = response.json()["broker_id"], response.json()["api_key"]
        headers = {"Authorization": f"Bearer {key}"}
        symbol = new_symbol()
        body = order(symbol, client_order_id="dup") if kind == "client_order_id" else order(symbol)
        if kind == "idempotency_key":
            headers["Idempotency-Key"] = "dup"
        responses = await asyncio.gather(*(client.post("/orders", json=body, headers=headers) for _ in range(10)))
    assert {r.status_code for r in responses} == {201}
    assert len({r.json()["id"] for r in responses}) == 1
    assert count(api_engine, PLACES, b=broker_id) == 1
    assert count(api_engine, "SELECT count(*) FROM orders WHERE broker_id = :b", b=broker_id) == 1


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
