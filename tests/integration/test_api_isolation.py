"""A broker never sees or touches another broker's orders: they are 404, exactly like orders that do not exist."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest
from litestar.routes import HTTPRoute
from litestar.testing import TestClient
from sqlalchemy import Engine

from tests.integration.api_helpers import count, new_symbol, register

pytest_plugins = ["tests.integration.api_fixtures"]


@pytest.fixture
def two_brokers(api_client: TestClient[Any]) -> tuple[Any, Any, str, str]:
    owner, intruder = register(api_client), register(api_client)
    symbol = new_symbol()
    body = {"document_number": "1", "side": "bid", "symbol": symbol, "price": 100, "quantity": 5}
    order_id = api_client.post("/orders", json=body, headers=owner.headers).json()["id"]
    return owner, intruder, order_id, symbol


def _commands(engine: Engine, order_id: str) -> int:
    return count(engine, "SELECT count(*) FROM commands WHERE order_id = :id", id=order_id)


@pytest.mark.parametrize("target", ["other", "unknown", "malformed"])
def test_get_cancel_and_patch_of_an_order_that_is_not_yours_are_404(
    api_client: TestClient[Any], api_engine: Engine, two_brokers: tuple[Any, Any, str, str], target: str
) -> None:
    _, intruder, order_id, _ = two_brokers
    oid = {"other": order_id, "unknown": str(uuid.uuid4()), "malformed": "not-a-uuid"}[target]
    responses = [
        api_client.get(f"/orders/{oid}", headers=intruder.headers),
        api_client.post(f"/orders/{oid}/cancel", headers=intruder.headers),
        api_client.post(f"/orders/{oid}/cancel", headers={**intruder.headers, "Prefer": "return=representation"}),
        api_client.patch(f"/orders/{oid}", json={"quantity": 1}, headers=intruder.headers),
    ]
    for response in responses:
        assert response.status_code == 404, response.text
        assert response.json() == {"code": "order_not_found", "message": "order not found"}
    assert _commands(api_engine, order_id) == 1  # only the owner's place command


def test_other_brokers_orders_are_absent_from_lists_and_delete(
    api_client: TestClient[Any], api_engine: Engine, two_brokers: tuple[Any, Any, str, str]
) -> None:
    owner, intruder, order_id, symbol = two_brokers
    assert api_client.get("/orders", headers=intruder.headers).json()["items"] == []
    assert api_client.get(f"/orders?symbol={symbol}", headers=intruder.headers).json()["items"] == []
    assert api_client.delete(f"/orders?symbol={symbol}", headers=intruder.headers).json()["cancelled"] == 0
    assert _commands(api_engine, order_id) == 1
    assert [o["id"] for o in api_client.get("/orders", headers=owner.headers).json()["items"]] == [order_id]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/orders"),
        ("POST", "/orders"),
        ("GET", "/balance"),
        ("GET", "/positions"),
        ("GET", "/stocks/ABC/book"),
        ("GET", "/stocks/ABC/price"),
        ("GET", f"/orders/{uuid.uuid4()}"),
    ],
)
@pytest.mark.parametrize("auth", [None, "Bearer exk_not-a-key", "Bearer test-admin-key", "Token abc"])
def test_broker_endpoints_need_a_valid_broker_key(
    api_client: TestClient[Any], method: str, path: str, auth: str | None
) -> None:
    headers = {} if auth is None else {"Authorization": auth}
    response = api_client.request(method, path, headers=headers, content=b"{not json")
    assert response.status_code == 401  # checked before the body is even parsed
    assert response.json()["code"] == "unauthorized"


PUBLIC_PREFIXES = ("/health", "/schema", "/metrics", "/ops/login")
"""Routes anyone may call; every other route of the app needs a broker, admin or ops key."""


def test_every_route_but_the_public_ones_is_401_without_a_key_before_its_input_is_parsed(
    api_client: TestClient[Any],
) -> None:
    app = api_client.app
    checked = 0
    for route in app.routes:
        if route.path.startswith(PUBLIC_PREFIXES):
            continue
        path = re.sub(r"\{[^}]+\}", "x", route.path) + "?limit=not-a-number&cursor=%00"
        methods = route.methods - {"OPTIONS", "HEAD"} if isinstance(route, HTTPRoute) else {"GET"}  # a mount: GET
        for method in sorted(methods):
            response = api_client.request(method, path, content=b"{not json")
            assert response.status_code == 401, (method, route.path, response.text)
            assert response.json()["code"] == "unauthorized", (method, route.path)
            checked += 1
    assert checked >= 20  # the routes were really enumerated
