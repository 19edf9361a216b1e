"""The order flow over HTTP: place, match (the matcher's process_symbol called in the test), read, cancel,
amend, list; market data and account views after trades."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import redis
from litestar.testing import TestClient
from sqlalchemy import Engine

from exchange.api.state import api_state
from exchange.matching.service import BookCache, process_symbol
from exchange.messaging.results import publish_results
from tests.integration.api_helpers import count, match, new_symbol, register
from tests.integration.sql_orders import place
from tests.serving import wait_until

pytest_plugins = ["tests.integration.api_fixtures"]


def limit(symbol: str, side: str, price: int, quantity: int, **extra: Any) -> dict[str, Any]:
    return {
        "document_number": "12345678901",
        "side": side,
        "symbol": symbol,
        "price": price,
        "quantity": quantity,
        **extra,
    }


def counted_reads(client: TestClient[Any], monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The keys of every order read-back the app's api process makes from now on (its read coalescer's submits)."""
    reads = api_state(client.app).reads
    read_back: list[object] = []
    read = reads.submit

    async def counted(key: Any) -> Any:
        read_back.append(key)
        return await read(key)

    monkeypatch.setattr(reads, "submit", counted)
    return read_back


def tomorrow_in_another_zone() -> str:
    """A ``valid_until`` a day ahead, written with a UTC-3 offset (the api answers in UTC)."""
    return (datetime.now(UTC) + timedelta(days=1)).astimezone(timezone(timedelta(hours=-3))).isoformat()


def test_place_order_returns_201_pending_with_every_order_field(
    api_client: TestClient[Any], api_engine: Engine
) -> None:
    broker = register(api_client)
    symbol = new_symbol()
    response = api_client.post("/orders", json=limit(symbol, "bid", 1500, 100), headers=broker.headers)
    assert response.status_code == 201
    body = response.json()
    assert body["order_id"] == body["id"]
    assert body["status"] == "pending"
    assert body["remaining_quantity"] == 100
    assert body["trades"] == []
    assert body["order_type"] == "limit"
    assert body["time_in_force"] == "gtc"
    assert body["close_reason"] is None
    assert body["stp"] == "none"
    assert body["created_at"].endswith("Z")
    assert count(api_engine, "SELECT count(*) FROM orders WHERE id = :id AND seq IS NOT NULL", id=body["id"]) == 1
    # The order and its place command share one sequence number.
    shared = (
        "SELECT count(*) FROM orders o JOIN commands c ON c.seq = o.seq AND c.order_id = o.id"
        " AND c.kind = 'place' WHERE o.id = :id"
    )
    assert count(api_engine, shared, id=body["id"]) == 1
    assert api_client.get(f"/orders/{body['id']}", headers=broker.headers).json() == body


def test_a_new_order_whose_wait_expires_is_answered_as_written_without_a_read_and_equals_the_read_back(
    api_client: TestClient[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # No matcher runs and EXCHANGE_ORDER_WAIT_MS is 0: every wait expires.
    broker = register(api_client)
    symbol = new_symbol()
    read_back = counted_reads(api_client, monkeypatch)
    expiry = tomorrow_in_another_zone()
    bodies = [
        limit(symbol, "bid", 1500, 100),
        limit(symbol, "ask", 1600, 7, valid_until=expiry, client_order_id="gtd-1", stp="cancel_newest"),
        {**limit(symbol, "ask", 0, 5), "order_type": "market", "price": None},
    ]
    answers = []
    for body in bodies:
        response = api_client.post("/orders", json=body, headers=broker.headers)
        assert response.status_code == 201, response.text
        answers.append(response.json())
    assert read_back == []  # answered from what was written
    assert [a["status"] for a in answers] == ["pending"] * 3
    for answer in answers:
        assert api_client.get(f"/orders/{answer['id']}", headers=broker.headers).json() == answer


@pytest.fixture
def running_matcher(api_engine: Engine, api_redis_url: str, api_namespace: str) -> Iterator[Callable[[str], None]]:
    """A matcher loop in a thread for the given symbols that publishes results like the real actor does."""
    symbols: list[str] = []
    stop = threading.Event()
    client = redis.Redis.from_url(api_redis_url)

    def loop() -> None:
        cache = BookCache()
        while not stop.is_set():
            for symbol in list(symbols):
                result = process_symbol(api_engine, cache, symbol)
                if result.order_ids:
                    publish_results(client, api_namespace, result.order_ids, result.placed)
            time.sleep(0.005)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield symbols.append
    stop.set()
    thread.join(5)
    client.close()


def test_place_order_waits_for_the_matcher_and_returns_the_matched_state(
    client_factory: Callable[..., TestClient[Any]], running_matcher: Callable[[str], None]
) -> None:
    client = client_factory(order_wait_ms="5000")
    symbol = new_symbol()
    running_matcher(symbol)
    seller, buyer = register(client), register(client)
    started = time.monotonic()
    ask = client.post("/orders", json=limit(symbol, "ask", 100, 10), headers=seller.headers).json()
    assert ask["status"] == "open"
    bid = client.post("/orders", json=limit(symbol, "bid", 100, 4), headers=buyer.headers).json()
    assert time.monotonic() - started < 5  # answered by the result, not by the timeout
    assert bid["status"] == "closed"
    assert bid["close_reason"] == "filled"
    assert [(t["price"], t["quantity"], t["counterparty_broker"]) for t in bid["trades"]] == [(100, 4, seller.name)]


def test_a_new_orders_201_is_the_matchers_published_state_and_equals_the_order_read_back(
    client_factory: Callable[..., TestClient[Any]],
    running_matcher: Callable[[str], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = client_factory(order_wait_ms="5000")
    symbol = new_symbol()
    running_matcher(symbol)
    seller, buyer = register(client, "Seller SA"), register(client, "Buyer SA")
    read_back = counted_reads(client, monkeypatch)
    expiry = tomorrow_in_another_zone()
    placed = [
        (seller, limit(symbol, "ask", 100, 10, valid_until=expiry, client_order_id="rests")),  # open, gtd
        (buyer, limit(symbol, "bid", 100, 4)),  # filled by the ask
        (buyer, limit(symbol, "bid", 100, 10)),  # 6 filled, 4 rest
        (seller, {**limit(symbol, "ask", 0, 50), "order_type": "market", "price": None}),  # 4 filled, rest unfilled
    ]
    answers, read_afterwards = [], []
    for broker, body in placed:
        response = client.post("/orders", json=body, headers=broker.headers)
        assert response.status_code == 201, response.text
        answers.append(response.json())
        read_back_so_far = len(read_back)
        # Read before the next order changes it (the next POST's batch may fill it).
        read_afterwards.append(client.get(f"/orders/{response.json()['id']}", headers=broker.headers).json())
        del read_back[read_back_so_far:]  # that GET's own read
    assert read_back == []  # every 201 came from the matcher's published state
    summary = [(a["status"], a["close_reason"], a["remaining_quantity"], len(a["trades"])) for a in answers]
    assert summary == [
        ("open", None, 10, 0),
        ("closed", "filled", 0, 1),
        ("open", None, 4, 1),
        ("closed", "unfilled", 46, 1),
    ]
    assert answers == read_afterwards


def test_a_crossing_pair_trades_at_the_sellers_price_and_updates_balances_and_positions(
    api_client: TestClient[Any], api_engine: Engine
) -> None:
    symbol = new_symbol()
    seller, buyer = register(api_client, "Seller SA"), register(api_client, "Buyer SA")
    ask = api_client.post("/orders", json=limit(symbol, "ask", 1000, 10), headers=seller.headers).json()
    match(api_engine, symbol)
    bid = api_client.post("/orders", json=limit(symbol, "bid", 1100, 10), headers=buyer.headers).json()
    match(api_engine, symbol)

    bought = api_client.get(f"/orders/{bid['id']}", headers=buyer.headers).json()
    assert (bought["status"], bought["close_reason"], bought["remaining_quantity"]) == ("closed", "filled", 0)
    [trade] = bought["trades"]
    assert (trade["price"], trade["quantity"], trade["counterparty_broker"]) == (1000, 10, "Seller SA")
    sold = api_client.get(f"/orders/{ask['id']}", headers=seller.headers).json()
    assert sold["trades"][0]["counterparty_broker"] == "Buyer SA"
    assert sold["trades"][0]["trade_id"] == trade["trade_id"]

    assert api_client.get("/balance", headers=seller.headers).json()["balance"] == 10_000
    assert api_client.get("/balance", headers=buyer.headers).json()["balance"] == -10_000
    assert api_client.get("/positions", headers=seller.headers).json() == [{"symbol": symbol, "quantity": -10}]
    assert api_client.get("/positions", headers=buyer.headers).json() == [{"symbol": symbol, "quantity": 10}]

    price = api_client.get(f"/stocks/{symbol}/price", headers=buyer.headers).json()
    assert price == {"symbol": symbol, "last_price": 1000, "average_price": 1000, "trades_in_average": 1}
    tape = api_client.get(f"/stocks/{symbol}/trades", headers=buyer.headers).json()
    assert [(t["price"], t["quantity"], t["taker_side"]) for t in tape["trades"]] == [(1000, 10, "bid")]
    assert "broker" not in str(tape)
    assert api_client.get(f"/stocks/{symbol}/book", headers=buyer.headers).json() == {
        "symbol": symbol,
        "bids": [],
        "asks": [],
    }


def test_book_aggregates_open_levels_asks_ascending_bids_descending(
    api_client: TestClient[Any], api_engine: Engine
) -> None:
    symbol = new_symbol()
    broker = register(api_client)
    for side, price, quantity in [
        ("bid", 90, 1),
        ("bid", 95, 2),
        ("bid", 95, 3),
        ("ask", 110, 4),
        ("ask", 105, 5),
        ("ask", 120, 6),
    ]:
        api_client.post("/orders", json=limit(symbol, side, price, quantity), headers=broker.headers)
    pending = api_client.get(f"/stocks/{symbol}/book", headers=broker.headers).json()
    assert pending["bids"] == []  # pending orders are not in the book yet
    assert pending["asks"] == []
    match(api_engine, symbol)
    book = api_client.get(f"/stocks/{symbol.lower()}/book?depth=2", headers=broker.headers).json()
    assert book == {
        "symbol": symbol,
        "bids": [
            {"price": 95, "total_quantity": 5, "order_count": 2},
            {"price": 90, "total_quantity": 1, "order_count": 1},
        ],
        "asks": [
            {"price": 105, "total_quantity": 5, "order_count": 1},
            {"price": 110, "total_quantity": 4, "order_count": 1},
        ],
    }


def test_price_is_404_no_trades_before_the_first_trade_and_averages_to_the_nearest_cent(
    api_client: TestClient[Any], api_engine: Engine
) -> None:
    symbol = new_symbol()
    seller, buyer = register(api_client), register(api_client)
    response = api_client.get(f"/stocks/{symbol}/price", headers=buyer.headers)
    assert response.status_code == 404
    assert response.json()["code"] == "no_trades"
    api_client.post("/orders", json=limit(symbol, "ask", 100, 1), headers=seller.headers)
    api_client.post("/orders", json=limit(symbol, "ask", 101, 1), headers=seller.headers)
    match(api_engine, symbol)
    api_client.post("/orders", json=limit(symbol, "bid", 101, 2), headers=buyer.headers)
    match(api_engine, symbol)
    price = api_client.get(f"/stocks/{symbol}/price", headers=buyer.headers).json()
    assert price == {"symbol": symbol, "last_price": 101, "average_price": 101, "trades_in_average": 2}  # 100.5 → 101
    one = api_client.get(f"/stocks/{symbol}/price?trades=1", headers=buyer.headers).json()
    assert (one["average_price"], one["trades_in_average"]) == (101, 1)


def test_market_order_defaults_to_ioc_and_its_unfilled_rest_is_closed(
    api_client: TestClient[Any], api_engine: Engine
) -> None:
    symbol = new_symbol()
    seller, buyer = register(api_client), register(api_client)
    api_client.post("/orders", json=limit(symbol, "ask", 100, 3), headers=seller.headers)
    match(api_engine, symbol)
    body = {"document_number": "1", "side": "bid", "order_type": "market", "symbol": symbol, "quantity": 5}
    order = api_client.post("/orders", json=body, headers=buyer.headers).json()
    assert (order["time_in_force"], order["price"]) == ("ioc", None)
    match(api_engine, symbol)
    done = api_client.get(f"/orders/{order['id']}", headers=buyer.headers).json()
    assert (done["status"], done["close_reason"], done["remaining_quantity"]) == ("closed", "unfilled", 2)
    assert sum(t["quantity"] for t in done["trades"]) == 3


def test_valid_until_makes_a_limit_order_gtd(api_client: TestClient[Any]) -> None:
    broker = register(api_client)
    until = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    order = api_client.post(
        "/orders",
        json=limit(new_symbol(), "bid", 10, 1, valid_until=until.isoformat()),
        headers=broker.headers,
    ).json()
    assert order["time_in_force"] == "gtd"
    assert datetime.fromisoformat(order["valid_until"]) == until


def test_cancel_is_idempotent_and_writes_one_command_while_the_order_is_not_closed(
    api_client: TestClient[Any], api_engine: Engine
) -> None:
    symbol = new_symbol()
    broker = register(api_client)
    order = api_client.post("/orders", json=limit(symbol, "bid", 100, 5), headers=broker.headers).json()
    match(api_engine, symbol)
    first = api_client.post(f"/orders/{order['id']}/cancel", headers=broker.headers)
    second = api_client.post(f"/orders/{order['id']}/cancel", headers=broker.headers)
    assert (first.status_code, second.status_code) == (204, 204)
    assert first.content == b""
    cancels = "SELECT count(*) FROM commands WHERE order_id = :id AND kind = 'cancel'"
    assert count(api_engine, cancels, id=order["id"]) == 1
    match(api_engine, symbol)
    # Closed now: further cancels are no-ops that write nothing.
    assert api_client.post(f"/orders/{order['id']}/cancel", headers=broker.headers).status_code == 204
    assert count(api_engine, cancels, id=order["id"]) == 1
    closed = api_client.get(f"/orders/{order['id']}", headers=broker.headers).json()
    assert (closed["status"], closed["close_reason"]) == ("closed", "cancelled")


def test_cancel_with_prefer_representation_returns_200_and_the_order(
    api_client: TestClient[Any], api_engine: Engine
) -> None:
    symbol = new_symbol()
    broker = register(api_client)
    order = api_client.post("/orders", json=limit(symbol, "ask", 100, 5), headers=broker.headers).json()
    response = api_client.post(
        f"/orders/{order['id']}/cancel", headers={**broker.headers, "Prefer": "return=representation"}
    )
    assert response.status_code == 200
    assert response.json()["id"] == order["id"]
    match(api_engine, symbol)
    # The place and the cancel apply in acceptance order: the order never rests.
    assert api_client.get(f"/orders/{order['id']}", headers=broker.headers).json()["close_reason"] == "cancelled"


def test_delete_orders_cancels_every_open_and_pending_order_of_the_symbol(
    api_client: TestClient[Any], api_engine: Engine
) -> None:
    symbol, other = new_symbol(), new_symbol()
    broker = register(api_client)
    for price in (100, 101):
        api_client.post("/orders", json=limit(symbol, "bid", price, 1), headers=broker.headers)
    match(api_engine, symbol)
    api_client.post("/orders", json=limit(symbol, "bid", 102, 1), headers=broker.headers)  # still pending
    kept = api_client.post("/orders", json=limit(other, "bid", 100, 1), headers=broker.headers).json()

    response = api_client.delete(f"/orders?symbol={symbol.lower()}", headers=broker.headers)
    assert response.status_code == 200
    assert response.json() == {"symbol": symbol, "cancelled": 3}
    assert api_client.delete(f"/orders?symbol={symbol}", headers=broker.headers).json()["cancelled"] == 0
    match(api_engine, symbol)
    statuses = api_client.get(f"/orders?symbol={symbol}", headers=broker.headers).json()["items"]
    assert {(o["status"], o["close_reason"]) for o in statuses} == {("closed", "cancelled")}
    assert api_client.get(f"/orders/{kept['id']}", headers=broker.headers).json()["status"] == "pending"
    missing = api_client.delete("/orders", headers=broker.headers)
    assert (missing.status_code, missing.json()["code"]) == (422, "validation_error")


def test_patch_writes_an_amend_and_returns_the_order_after_the_engine_decided(
    api_client: TestClient[Any], api_engine: Engine
) -> None:
    symbol = new_symbol()
    broker = register(api_client)
    order = api_client.post("/orders", json=limit(symbol, "bid", 100, 10), headers=broker.headers).json()
    match(api_engine, symbol)
    response = api_client.patch(f"/orders/{order['id']}", json={"quantity": 6, "price": 99}, headers=broker.headers)
    assert response.status_code == 200
    amends = "SELECT count(*) FROM commands WHERE order_id = :id AND kind = 'amend' AND payload = CAST(:p AS jsonb)"
    assert count(api_engine, amends, id=order["id"], p='{"quantity": 6, "price": 99}') == 1
    match(api_engine, symbol)
    amended = api_client.get(f"/orders/{order['id']}", headers=broker.headers).json()
    assert (amended["quantity"], amended["remaining_quantity"], amended["price"]) == (6, 6, 99)
    book = api_client.get(f"/stocks/{symbol}/book", headers=broker.headers).json()
    assert book["bids"] == [{"price": 99, "total_quantity": 6, "order_count": 1}]


def test_patch_of_a_closed_order_is_409_order_closed_and_writes_nothing(
    api_client: TestClient[Any], api_engine: Engine
) -> None:
    symbol = new_symbol()
    broker = register(api_client)
    order = api_client.post("/orders", json=limit(symbol, "bid", 100, 10), headers=broker.headers).json()
    api_client.post(f"/orders/{order['id']}/cancel", headers=broker.headers)
    match(api_engine, symbol)
    response = api_client.patch(f"/orders/{order['id']}", json={"quantity": 5}, headers=broker.headers)
    assert (response.status_code, response.json()["code"]) == (409, "order_closed")
    assert (
        count(api_engine, "SELECT count(*) FROM commands WHERE order_id = :id AND kind = 'amend'", id=order["id"]) == 0
    )


@pytest.mark.parametrize("key", [5, None, ["a"]], ids=["number", "null", "list"])
def test_a_crafted_order_cursor_is_a_validation_error_not_a_500(api_client: TestClient[Any], key: object) -> None:
    broker = register(api_client)
    crafted = base64.urlsafe_b64encode(json.dumps(["2026-01-01T00:00:00+00:00", key]).encode()).decode()

    response = api_client.get("/orders", params={"cursor": crafted}, headers=broker.headers)

    assert (response.status_code, response.json()["code"]) == (422, "validation_error")


def test_list_orders_paginates_newest_first_with_an_opaque_cursor(api_client: TestClient[Any]) -> None:
    broker = register(api_client)
    symbol = new_symbol()
    ids = [
        api_client.post("/orders", json=limit(symbol, "bid", 100 + i, 1), headers=broker.headers).json()["id"]
        for i in range(5)
    ]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        url = "/orders?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = api_client.get(url, headers=broker.headers).json()
        seen += [o["id"] for o in page["items"]]
        assert all("trades" not in o for o in page["items"])
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == list(reversed(ids))
    filtered = api_client.get("/orders?status=open", headers=broker.headers).json()
    assert filtered == {"items": [], "next_cursor": None}
    bad = api_client.get("/orders?cursor=not-a-cursor", headers=broker.headers)
    assert (bad.status_code, bad.json()["code"]) == (422, "validation_error")


class _StepMatcher:
    """The matcher's steps, one at a time, for a test to interleave with the api: ``step()`` processes up to
    ``limit`` pending commands of the symbol and publishes the result like the actor does."""

    def __init__(self, engine: Engine, redis_url: str, namespace: str, symbol: str) -> None:
        self.engine, self.symbol, self.cache, self.namespace = engine, symbol, BookCache(), namespace
        self.client = redis.Redis.from_url(redis_url)

    def step(self, limit: int = 1) -> None:
        result = process_symbol(self.engine, self.cache, self.symbol, batch_limit=limit)
        assert result.commands
        publish_results(self.client, self.namespace, result.order_ids, result.placed)

    def pending(self, kind: str) -> int:
        return count(
            self.engine,
            "SELECT count(*) FROM commands WHERE symbol = :s AND kind = :k AND processed_at IS NULL",
            s=self.symbol,
            k=kind,
        )


def _in_thread(call: Callable[[], Any]) -> Callable[[], Any]:
    """Start ``call`` in a thread; the returned function waits for its result."""
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(call()), daemon=True)
    thread.start()

    def result() -> Any:
        thread.join(15)
        return results[0]

    return result


@pytest.mark.parametrize("change", ["cancel", "amend"])
def test_a_cancel_or_amend_answers_with_the_order_after_its_command_not_after_a_fill_before_it(
    client_factory: Callable[..., TestClient[Any]],
    api_engine: Engine,
    api_redis_url: str,
    api_namespace: str,
    change: str,
) -> None:
    client = client_factory(order_wait_ms="10000")
    symbol = new_symbol()
    matcher = _StepMatcher(api_engine, api_redis_url, api_namespace, symbol)
    seller, buyer = register(client), register(client)
    resting = place(api_engine, uuid.UUID(seller.id), symbol, "ask", 10, 100)  # accepted as the api accepts
    matcher.step()
    place(api_engine, uuid.UUID(buyer.id), symbol, "bid", 1, 100)  # fills 1 of the ask
    if change == "cancel":
        headers = {**seller.headers, "Prefer": "return=representation"}
        answer = _in_thread(lambda: client.post(f"/orders/{resting}/cancel", headers=headers))
    else:
        answer = _in_thread(lambda: client.patch(f"/orders/{resting}", json={"quantity": 5}, headers=seller.headers))
    wait_until(lambda: matcher.pending(change) == 1)

    matcher.step()  # the bid: the ask's result is published, its cancel or amend not applied yet
    time.sleep(0.2)
    matcher.step()  # the cancel or amend

    response = answer()
    assert response.status_code == 200, response.text
    got = response.json()
    if change == "cancel":
        assert (got["status"], got["close_reason"], got["remaining_quantity"]) == ("closed", "cancelled", 9)
    else:
        assert (got["status"], got["quantity"], got["remaining_quantity"]) == ("open", 5, 4)


def _amend_applied_by(matcher: _StepMatcher, client: TestClient[Any], broker: Any, order_id: Any, quantity: int) -> Any:
    """PATCH ``order_id``'s quantity, with ``matcher`` applying the amend while the request waits; the answer."""
    body = {"quantity": quantity}
    answer = _in_thread(lambda: client.patch(f"/orders/{order_id}", json=body, headers=broker.headers))
    wait_until(lambda: matcher.pending("amend") == 1)
    matcher.step()
    return answer()


def _ask_of_10_with_4_filled(
    client_factory: Callable[..., TestClient[Any]],
    api_engine: Engine,
    api_redis_url: str,
    api_namespace: str,
    order_wait_ms: str = "10000",
) -> tuple[TestClient[Any], _StepMatcher, Any, uuid.UUID]:
    """A seller's ask of 10 of which a bid filled 4, matched: (client, the symbol's matcher, seller, the ask's id)."""
    client = client_factory(order_wait_ms=order_wait_ms)
    symbol = new_symbol()
    matcher = _StepMatcher(api_engine, api_redis_url, api_namespace, symbol)
    seller, buyer = register(client), register(client)
    resting = place(api_engine, uuid.UUID(seller.id), symbol, "ask", 10, 100)
    place(api_engine, uuid.UUID(buyer.id), symbol, "bid", 4, 100)
    matcher.step(limit=2)
    return client, matcher, seller, resting


def test_an_amend_the_matcher_refuses_is_409_amend_rejected_and_leaves_the_order_unchanged(
    client_factory: Callable[..., TestClient[Any]], api_engine: Engine, api_redis_url: str, api_namespace: str
) -> None:
    filled = _ask_of_10_with_4_filled(client_factory, api_engine, api_redis_url, api_namespace)
    client, matcher, seller, resting = filled

    # The new total (filled shares included) must be above the 4 filled: 3 is refused, not answered as applied.
    response = _amend_applied_by(matcher, client, seller, resting, 3)

    assert response.status_code == 409, response.text
    assert response.json()["code"] == "amend_rejected"
    assert response.json()["details"] == {"order_id": str(resting), "reason": "not_amendable"}
    order = client.get(f"/orders/{resting}", headers=seller.headers).json()
    assert (order["status"], order["quantity"], order["remaining_quantity"]) == ("open", 10, 6)
    kept = "SELECT count(*) FROM commands WHERE order_id = :id AND kind = 'amend' AND rejected_reason = 'not_amendable'"
    assert count(api_engine, kept, id=str(resting)) == 1


def test_an_amend_of_an_order_that_filled_before_the_amend_reached_it_is_409_order_closed(
    client_factory: Callable[..., TestClient[Any]], api_engine: Engine, api_redis_url: str, api_namespace: str
) -> None:
    client = client_factory(order_wait_ms="10000")
    symbol = new_symbol()
    matcher = _StepMatcher(api_engine, api_redis_url, api_namespace, symbol)
    seller, buyer = register(client), register(client)
    resting = place(api_engine, uuid.UUID(seller.id), symbol, "ask", 10, 100)
    matcher.step()
    place(api_engine, uuid.UUID(buyer.id), symbol, "bid", 10, 100)  # fills the whole ask, before the amend

    answer = _in_thread(lambda: client.patch(f"/orders/{resting}", json={"quantity": 12}, headers=seller.headers))
    wait_until(lambda: matcher.pending("amend") == 1)
    matcher.step(limit=2)  # the bid (the ask closes filled), then the amend of an order no longer on the book

    response = answer()
    assert (response.status_code, response.json()["code"]) == (409, "order_closed"), response.text
    order = client.get(f"/orders/{resting}", headers=seller.headers).json()
    assert (order["status"], order["close_reason"], order["quantity"]) == ("closed", "filled", 10)


def test_an_amend_the_matcher_applies_is_200_with_the_amended_order_and_no_rejection_kept(
    client_factory: Callable[..., TestClient[Any]], api_engine: Engine, api_redis_url: str, api_namespace: str
) -> None:
    filled = _ask_of_10_with_4_filled(client_factory, api_engine, api_redis_url, api_namespace)
    client, matcher, seller, resting = filled

    response = _amend_applied_by(matcher, client, seller, resting, 5)  # 5 of which 4 filled: 1 left

    assert response.status_code == 200, response.text
    assert (response.json()["quantity"], response.json()["remaining_quantity"]) == (5, 1)
    applied = "SELECT count(*) FROM commands WHERE order_id = :id AND kind = 'amend' AND rejected_reason IS NULL"
    assert count(api_engine, applied, id=str(resting)) == 1


def test_an_amend_refused_when_its_result_never_reached_the_api_is_still_409_when_the_wait_ends(
    client_factory: Callable[..., TestClient[Any]], api_engine: Engine, api_redis_url: str, api_namespace: str
) -> None:
    # The matcher refuses the amend but its result is lost (not published): the wait ends, and the answer must say
    # what became of the command, not show the unchanged order as if the amend were applied or pending.
    filled = _ask_of_10_with_4_filled(client_factory, api_engine, api_redis_url, api_namespace, order_wait_ms="1500")
    client, matcher, seller, resting = filled
    answer = _in_thread(lambda: client.patch(f"/orders/{resting}", json={"quantity": 3}, headers=seller.headers))
    wait_until(lambda: matcher.pending("amend") == 1)

    process_symbol(api_engine, matcher.cache, matcher.symbol, batch_limit=1)  # refused; nothing published

    response = answer()
    assert (response.status_code, response.json()["code"]) == (409, "amend_rejected"), response.text


def test_two_cancels_of_one_order_both_answer_with_the_cancelled_order(
    client_factory: Callable[..., TestClient[Any]], api_engine: Engine, api_redis_url: str, api_namespace: str
) -> None:
    client = client_factory(order_wait_ms="10000")
    symbol = new_symbol()
    matcher = _StepMatcher(api_engine, api_redis_url, api_namespace, symbol)
    seller = register(client)
    resting = place(api_engine, uuid.UUID(seller.id), symbol, "ask", 10, 100)
    matcher.step()
    headers = {**seller.headers, "Prefer": "return=representation"}
    first = _in_thread(lambda: client.post(f"/orders/{resting}/cancel", headers=headers))
    wait_until(lambda: matcher.pending("cancel") == 1)
    second = _in_thread(lambda: client.post(f"/orders/{resting}/cancel", headers=headers))  # writes no command
    time.sleep(0.2)

    matcher.step()

    answers = [first().json(), second().json()]
    assert [(a["status"], a["close_reason"]) for a in answers] == [("closed", "cancelled")] * 2
