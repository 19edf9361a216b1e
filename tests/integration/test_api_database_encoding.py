"""A database whose server encoding is not UTF8 (LATIN1 here: an operator's ``initdb`` in a Latin-1 locale) cannot
store every character a JSON body may carry. Such a text is bad input like any other: 422 ``validation_error``,
nothing written, and in a group commit only the order that carries it fails. Real PostgreSQL (a LATIN1 database)
and Redis; the app in-process."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from litestar.testing import TestClient
from sqlalchemy import Engine

from exchange.api.app import create_app
from exchange.config import Settings
from exchange.db.engines import AsyncPool, pooled_engine
from exchange.engine.types import OrderType, StpMode
from exchange.orders import accept
from exchange.orders.models import NewOrder, PlaceResult
from tests.integration.api_helpers import ADMIN_KEY, count, new_symbol, register

pytest_plugins = ["tests.integration.api_fixtures"]

NOT_LATIN1 = "€"
"""A character LATIN1 has no code for (it is in Windows-1252 and LATIN9, not in ISO 8859-1)."""
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def latin1_client(latin1_database_url: str, api_settings_factory: Callable[..., Settings]) -> Iterator[TestClient[Any]]:
    with TestClient(create_app(api_settings_factory(database_url=latin1_database_url))) as client:
        yield client


@pytest.fixture
def latin1_engine(latin1_database_url: str) -> Iterator[Engine]:
    engine = pooled_engine(latin1_database_url)
    yield engine
    engine.dispose()


def _order(symbol: str, **changes: Any) -> dict[str, Any]:
    return {"document_number": "1", "side": "bid", "symbol": symbol, "price": 100, "quantity": 5, **changes}


@pytest.mark.parametrize("field", ["document_number", "client_order_id"])
def test_an_order_text_the_databases_encoding_lacks_is_422_and_writes_nothing(
    latin1_client: TestClient[Any], latin1_engine: Engine, field: str
) -> None:
    broker = register(latin1_client)
    response = latin1_client.post("/orders", json=_order(new_symbol(), **{field: NOT_LATIN1}), headers=broker.headers)
    assert (response.status_code, response.json()["code"]) == (422, "validation_error"), response.text
    assert count(latin1_engine, "SELECT count(*) FROM orders WHERE broker_id = :b", b=broker.id) == 0


def test_a_broker_name_the_databases_encoding_lacks_is_422_and_registers_nobody(
    latin1_client: TestClient[Any], latin1_engine: Engine
) -> None:
    before = count(latin1_engine, "SELECT count(*) FROM brokers")
    response = latin1_client.post("/register", json={"name": f"broker {NOT_LATIN1}"}, headers=ADMIN)
    assert (response.status_code, response.json()["code"]) == (422, "validation_error"), response.text
    assert count(latin1_engine, "SELECT count(*) FROM brokers") == before


def test_a_webhook_url_the_databases_encoding_lacks_is_422_and_keeps_the_endpoint(
    latin1_client: TestClient[Any], latin1_engine: Engine
) -> None:
    broker = register(latin1_client)
    response = latin1_client.put(
        "/webhooks/endpoint", json={"url": f"http://example.com/{NOT_LATIN1}"}, headers=broker.headers
    )
    assert (response.status_code, response.json()["code"]) == (422, "validation_error"), response.text
    assert count(latin1_engine, "SELECT count(*) FROM brokers WHERE id = :b AND webhook_url IS NULL", b=broker.id) == 1


def _new_order(broker_id: uuid.UUID, symbol: str, document_number: str) -> NewOrder:
    return accept.new_order(
        order_id=uuid.uuid4(),
        broker_id=broker_id,
        document_number=document_number,
        symbol=symbol,
        side="bid",
        order_type=OrderType.LIMIT,
        price=100,
        quantity=5,
        valid_until=None,
        time_in_force=None,
        stp=StpMode.NONE,
        client_order_id=None,
        idempotency_key=None,
        now=datetime.now(UTC),
    )


@pytest.mark.anyio
async def test_an_order_the_database_cannot_store_fails_alone_in_its_group_commit(
    latin1_database_url: str, latin1_engine: Engine, latin1_client: TestClient[Any]
) -> None:
    broker_id = uuid.UUID(register(latin1_client).id)
    symbol = new_symbol()
    group = [_new_order(broker_id, symbol, text) for text in ("1", NOT_LATIN1, "3")]
    pool = AsyncPool(latin1_database_url)
    try:
        outcomes = await accept.place_orders(pool, group)
    finally:
        await pool.close()
    assert [type(o) is PlaceResult and o.created for o in outcomes] == [True, False, True]
    assert count(latin1_engine, "SELECT count(*) FROM orders WHERE symbol = :s", s=symbol) == 2
