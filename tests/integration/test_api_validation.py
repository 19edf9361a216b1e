"""Bad input is a 4xx with a stable code and writes nothing; never a 500."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from litestar.testing import TestClient
from sqlalchemy import Engine

from exchange.api.schemas import MAX_PRICE_CENTS, MAX_QUANTITY
from tests.integration.api_helpers import ADMIN_KEY, count, new_symbol, register

pytest_plugins = ["tests.integration.api_fixtures"]

GOOD: dict[str, Any] = {"document_number": "1", "side": "bid", "symbol": "ABC", "price": 100, "quantity": 5}
FUTURE = (datetime.now(UTC) + timedelta(days=1)).isoformat()


def with_(**changes: Any) -> bytes:
    body = {**GOOD, **changes}
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


BAD_ORDERS: list[tuple[str, bytes, int, str]] = [
    ("truncated json", b'{"side": "bid"', 400, "malformed_json"),
    ("empty body", b"", 400, "malformed_json"),
    ("not json", b"side=bid", 400, "malformed_json"),
    (
        "invalid UTF-8 in a string",
        b'{"document_number": "\xff", "side": "bid", "symbol": "A", "quantity": 1}',
        400,
        "malformed_json",
    ),
    ("array body", b"[]", 422, "validation_error"),
    ("quantity as string", with_(quantity="5"), 422, "validation_error"),
    ("quantity as float", with_(quantity=5.0), 422, "validation_error"),
    ("quantity as bool", with_(quantity=True), 422, "validation_error"),
    ("zero quantity", with_(quantity=0), 422, "validation_error"),
    ("negative price", with_(price=-1), 422, "validation_error"),
    ("price 2**63", with_(price=2**63), 422, "validation_error"),
    ("quantity 2**63", with_(quantity=2**63), 422, "validation_error"),
    ("quantity 2**64", with_(quantity=2**64), 422, "validation_error"),
    ("huge quantity", with_(quantity=10**30), 422, "validation_error"),
    ("naive valid_until", with_(valid_until="2099-01-01T00:00:00"), 422, "validation_error"),
    ("past valid_until", with_(valid_until="2001-01-01T00:00:00Z"), 422, "validation_error"),
    ("garbage valid_until", with_(valid_until="tomorrow"), 422, "validation_error"),
    ("valid_until past year 9999 in UTC", with_(valid_until="9999-12-31T23:00:00-05:00"), 422, "validation_error"),
    ("market with a price", with_(order_type="market"), 422, "validation_error"),
    ("limit without a price", with_(price=...), 422, "validation_error"),
    ("limit with null price", with_(price=None), 422, "validation_error"),
    ("unknown field", with_(colour="red"), 422, "validation_error"),
    ("bad side", with_(side="buy"), 422, "validation_error"),
    ("bad order type", with_(order_type="stop"), 422, "validation_error"),
    ("missing side", with_(side=...), 422, "validation_error"),
    ("symbol too long", with_(symbol="ABCDEFGHIJK"), 422, "validation_error"),
    ("symbol with a dash", with_(symbol="AB-C"), 422, "validation_error"),
    ("empty symbol", with_(symbol=""), 422, "validation_error"),
    ("symbol with a trailing newline", with_(symbol="ABC\n"), 422, "validation_error"),
    ("empty document number", with_(document_number=""), 422, "validation_error"),
    ("document number too long", with_(document_number="1" * 21), 422, "validation_error"),
    ("gtd without valid_until", with_(time_in_force="gtd"), 422, "validation_error"),
    ("gtc with valid_until", with_(time_in_force="gtc", valid_until=FUTURE), 422, "validation_error"),
    ("market gtc", with_(order_type="market", price=None, time_in_force="gtc"), 422, "validation_error"),
    ("bad time in force", with_(time_in_force="day"), 422, "validation_error"),
    ("bad stp", with_(stp="maybe"), 422, "validation_error"),
    ("client_order_id too long", with_(client_order_id="x" * 65), 422, "validation_error"),
    ("empty client_order_id", with_(client_order_id=""), 422, "validation_error"),
    ("NUL in document number", with_(document_number="12\u00003"), 422, "validation_error"),
    ("NUL in client_order_id", with_(client_order_id="a\u0000b"), 422, "validation_error"),
]


@pytest.mark.parametrize(("case", "body", "status", "code"), BAD_ORDERS, ids=[c[0] for c in BAD_ORDERS])
def test_bad_order_bodies_are_4xx_with_a_stable_code_and_write_nothing(
    api_client: TestClient[Any], api_engine: Engine, case: str, body: bytes, status: int, code: str
) -> None:
    broker = register(api_client)
    response = api_client.post("/orders", content=body, headers={**broker.headers, "Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()
    assert error["code"] == code
    assert isinstance(error["message"], str)
    assert error["message"]
    assert count(api_engine, "SELECT count(*) FROM orders WHERE broker_id = :b", b=broker.id) == 0


def test_validation_errors_name_the_offending_field(api_client: TestClient[Any]) -> None:
    broker = register(api_client)
    response = api_client.post("/orders", content=with_(price=2**63), headers=broker.headers)
    assert response.json()["details"] == {"path": "$.price"}
    response = api_client.post("/orders", content=with_(valid_until="2001-01-01T00:00:00Z"), headers=broker.headers)
    assert response.json()["details"] == {"field": "valid_until"}


@pytest.mark.parametrize("key", ["", "k" * 256])
def test_a_bad_idempotency_key_header_is_422(api_client: TestClient[Any], api_engine: Engine, key: str) -> None:
    broker = register(api_client)
    response = api_client.post("/orders", content=with_(), headers={**broker.headers, "Idempotency-Key": key})
    assert (response.status_code, response.json()["code"]) == (422, "validation_error")
    assert count(api_engine, "SELECT count(*) FROM orders WHERE broker_id = :b", b=broker.id) == 0


def test_a_lowercase_symbol_is_upper_cased(api_client: TestClient[Any]) -> None:
    broker = register(api_client)
    response = api_client.post("/orders", content=with_(symbol="brk.b"), headers=broker.headers)
    assert response.status_code == 201
    assert response.json()["symbol"] == "BRK.B"


def test_the_largest_price_and_quantity_are_accepted(api_client: TestClient[Any]) -> None:
    broker = register(api_client)
    response = api_client.post(
        "/orders", content=with_(price=MAX_PRICE_CENTS, quantity=MAX_QUANTITY), headers=broker.headers
    )
    assert response.status_code == 201
    assert response.json()["price"] == MAX_PRICE_CENTS


@pytest.mark.parametrize("field", ["price", "quantity"])
def test_a_price_or_quantity_above_the_limit_is_422_so_a_trades_cash_fits_64_bits(
    api_client: TestClient[Any], field: str
) -> None:
    broker = register(api_client)
    response = api_client.post("/orders", content=with_(**{field: 10**9 + 1}), headers=broker.headers)
    assert response.status_code == 422
    assert response.json()["code"] == "validation_error"


def test_a_valid_until_with_an_offset_postgresql_does_not_read_is_stored_as_its_instant_in_utc(
    api_client: TestClient[Any],
) -> None:
    # ISO 8601 offsets reach -23:59; PostgreSQL's timestamptz input stops at -15:59 (this was a 500, found by the
    # fuzz test with FUZZ_EXAMPLES=3000).
    broker = register(api_client)
    until = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    sent = until.astimezone(timezone(-timedelta(hours=21, minutes=17))).isoformat()
    placed = api_client.post("/orders", content=with_(valid_until=sent), headers=broker.headers)
    assert placed.status_code == 201, placed.text
    read = api_client.get(f"/orders/{placed.json()['id']}", headers=broker.headers).json()
    for view in (placed.json(), read):
        assert datetime.fromisoformat(view["valid_until"]) == until
        assert datetime.fromisoformat(view["valid_until"]).utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("changes", "tif"),
    [
        ({"order_type": "market", "price": None}, "ioc"),
        ({"order_type": "market", "price": None, "time_in_force": "fok"}, "fok"),
        ({"time_in_force": "ioc"}, "ioc"),
        ({"time_in_force": "fok"}, "fok"),
    ],
)
def test_an_ioc_or_fok_order_keeps_its_future_valid_until_and_shows_it(
    api_client: TestClient[Any], changes: dict[str, Any], tif: str
) -> None:
    # Stored so the matcher can refuse to trade it after its deadline (it may be matched long after this 201).
    broker = register(api_client)
    until = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    sent = until.astimezone(timezone(-timedelta(hours=3))).isoformat()
    body = with_(symbol=new_symbol(), valid_until=sent, **changes)
    response = api_client.post("/orders", content=body, headers=broker.headers)
    assert response.status_code == 201, response.text
    read = api_client.get(f"/orders/{response.json()['id']}", headers=broker.headers).json()
    for view in (response.json(), read):
        assert view["time_in_force"] == tif
        assert datetime.fromisoformat(view["valid_until"]) == until


@pytest.mark.parametrize(
    "path",
    [
        "/stocks/ABC/book?depth=0",
        "/stocks/ABC/book?depth=51",
        "/stocks/ABC/book?depth=x",
        "/stocks/ABC/price?trades=0",
        "/stocks/ABC/price?trades=1001",
        "/stocks/ABC/trades?limit=0",
        "/stocks/TOO-LONG-SYMBOL/book",
        "/stocks/ABC%0A/book",
        "/orders?symbol=ABC%0A",
        "/orders?limit=0",
        "/orders?limit=201",
        "/orders?status=sleeping",
    ],
)
def test_bad_query_and_path_parameters_are_422(api_client: TestClient[Any], path: str) -> None:
    broker = register(api_client)
    response = api_client.get(path, headers=broker.headers)
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "validation_error"


@pytest.mark.parametrize(
    "path",
    [
        "/orders?limit=1&limit=2",
        "/orders?status=open&status=closed",
        "/orders?symbol=ABC&limit=5&symbol=XYZ",
        "/stocks/ABC/book?depth=1&depth=2",
        "/stocks/ABC/trades?limit=5&limit=x",
        "/events?after=1&after=2",
        "/webhooks/deliveries?status=failed&status=succeeded",
    ],
)
def test_a_repeated_query_parameter_is_422_naming_it(api_client: TestClient[Any], path: str) -> None:
    # Litestar keeps the last value of a repeated single-valued parameter: ?status=open&status=closed listed the
    # closed orders only, and ?limit=x&limit=1 was a 200 where ?limit=1&limit=x was a 422.
    broker = register(api_client)
    response = api_client.get(path, headers=broker.headers)
    assert (response.status_code, response.json()["code"]) == (422, "validation_error"), response.text
    assert response.json()["details"]["parameter"] in path


def test_a_cancel_all_naming_two_symbols_is_422_and_cancels_nothing(
    api_client: TestClient[Any], api_engine: Engine
) -> None:
    broker = register(api_client)
    symbols = [new_symbol(), new_symbol()]
    for symbol in symbols:
        assert api_client.post("/orders", content=with_(symbol=symbol), headers=broker.headers).status_code == 201
    response = api_client.delete(f"/orders?symbol={symbols[0]}&symbol={symbols[1]}", headers=broker.headers)
    assert (response.status_code, response.json()["code"]) == (422, "validation_error"), response.text
    assert count(api_engine, "SELECT count(*) FROM commands WHERE symbol = ANY(:s) AND kind = 'cancel'", s=symbols) == 0


def test_an_ops_login_with_a_repeated_parameter_is_422(api_client: TestClient[Any]) -> None:
    response = api_client.get(f"/ops/login?key={ADMIN_KEY}&next=/ops&next=/ops/dramatiq", follow_redirects=False)
    assert (response.status_code, response.json()["code"]) == (422, "validation_error"), response.text


def test_an_unauthenticated_request_with_a_repeated_parameter_is_401(api_client: TestClient[Any]) -> None:
    response = api_client.get("/orders?limit=1&limit=2")
    assert (response.status_code, response.json()["code"]) == (401, "unauthorized")


@pytest.mark.parametrize("path", ["/orders?colour=red&colour=blue", "/balance?x=1&x=2"])
def test_a_repeated_query_parameter_the_route_does_not_take_is_ignored(api_client: TestClient[Any], path: str) -> None:
    broker = register(api_client)
    assert api_client.get(path, headers=broker.headers).status_code == 200


def test_a_repeated_query_parameter_on_a_route_without_parameters_is_ignored(api_client: TestClient[Any]) -> None:
    # /health documents no 422: a probe's query string is never an error.
    assert api_client.get("/health?x=1&x=2").status_code == 200


def test_distinct_query_parameters_are_accepted(api_client: TestClient[Any]) -> None:
    broker = register(api_client)
    response = api_client.get("/orders?symbol=ABC&status=open&limit=5", headers=broker.headers)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{}", 422),
        (b'{"quantity": 0}', 422),
        (b'{"price": 2.5}', 422),
        (b'{"qty": 1}', 422),
        (b"{", 400),
        (b'{"\xff": 1}', 400),
    ],
)
def test_bad_amend_bodies_are_rejected_without_a_command(
    api_client: TestClient[Any], api_engine: Engine, body: bytes, status: int
) -> None:
    broker = register(api_client)
    order_id = api_client.post("/orders", content=with_(symbol=new_symbol()), headers=broker.headers).json()["id"]
    response = api_client.patch(f"/orders/{order_id}", content=body, headers=broker.headers)
    assert response.status_code == status
    assert count(api_engine, "SELECT count(*) FROM commands WHERE order_id = :id AND kind = 'amend'", id=order_id) == 0


def test_unknown_routes_and_methods_have_json_errors(api_client: TestClient[Any]) -> None:
    missing = api_client.get("/no/such/route")
    assert (missing.status_code, missing.json()["code"]) == (404, "not_found")
    wrong = api_client.put("/orders")
    assert (wrong.status_code, wrong.json()["code"]) == (405, "method_not_allowed")


def test_invalid_utf8_in_a_register_or_endpoint_body_is_400_malformed_json(
    api_client: TestClient[Any], api_engine: Engine
) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}
    broker = register(api_client)
    brokers = count(api_engine, "SELECT count(*) FROM brokers")

    registered = api_client.post("/register", content=b'{"name": "\xed\xa0\x80"}', headers=admin)
    endpoint = api_client.put("/webhooks/endpoint", content=b'{"url": "\xc3"}', headers=broker.headers)

    assert [(r.status_code, r.json()["code"]) for r in (registered, endpoint)] == [(400, "malformed_json")] * 2
    assert count(api_engine, "SELECT count(*) FROM brokers") == brokers
    assert count(api_engine, "SELECT count(*) FROM brokers WHERE id = :b AND webhook_url IS NULL", b=broker.id) == 1
