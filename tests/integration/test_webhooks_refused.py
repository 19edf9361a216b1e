"""Every webhook attempt is recorded, whatever its data: what no column could hold is made storable where the record
is built (exchange.webhooks.store), and an attempt a database still refuses (one whose encoding cannot hold a
character of the answer) is recorded with those texts replaced, so that its event runs its schedule like any other.
Real PostgreSQL (a UTF8 database, and a LATIN1 one for the refusals that depend on the database) and, end to end,
real HTTP receivers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, text

from exchange.db.engines import pooled_engine
from exchange.webhooks import store
from exchange.webhooks.outcomes import Kind, Outcome, Verdict
from exchange.webhooks.pump import Pump
from tests.integration.webhook_support import (
    FAST,
    attempts_of,
    broker_row,
    broker_with_endpoint,
    deliver_until_settled,
    deliverer,
    events_of,
    fills,
    status_counts,
)
from tests.webhook_receiver import Receiver

NOT_LATIN1 = "недоступно €".encode()
"""An answer body LATIN1 has no characters for."""


def _latin1_engine(url: str, client_encoding: str) -> Iterator[Engine]:
    joiner = "&" if "?" in url else "?"  # the embedded server's URL has a query already (its socket directory)
    engine = pooled_engine(f"{url}{joiner}client_encoding={client_encoding}")
    yield engine
    engine.dispose()


@pytest.fixture(
    params=["LATIN1", "UTF8"],
    ids=["refused-by-psycopg-in-the-client-encoding", "refused-by-the-server-22P05"],
)
def latin1_engine(latin1_database_url: str, request: pytest.FixtureRequest) -> Iterator[Engine]:
    """An engine on the LATIN1 database. With the client encoding the server's (libpq's default), psycopg cannot
    encode a character LATIN1 lacks and raises ``UnicodeEncodeError`` before sending anything; with a UTF8 client
    encoding the server refuses it (``character ... has no equivalent in encoding "LATIN1"``, SQLSTATE 22P05)."""
    yield from _latin1_engine(latin1_database_url, request.param)


@pytest.fixture
def latin1_default_engine(latin1_database_url: str) -> Iterator[Engine]:
    yield from _latin1_engine(latin1_database_url, "LATIN1")


def _claims(engine: Engine) -> dict[Any, store.Claim]:
    """Every due event claimed, by broker (one each in these tests)."""
    return {c.broker_id: c for c in store.claim(engine, limit=1000, lease_s=30, per_broker=1000).claims}


# ------------------------------------------------------------------------ what no database could hold: made storable


def test_lone_surrogates_in_an_error_an_answer_or_a_disable_reason_are_stored_replaced(engine: Engine) -> None:
    # A str from a decoder run with surrogateescape (an OS message in a locale it is not encoded in) cannot be
    # encoded as UTF-8 at all: the batch's JSON could not even be built, and the whole batch failed every time.
    broker, _ = broker_with_endpoint(engine, "http://127.0.0.1:9/hook")
    other, _ = broker_with_endpoint(engine, "http://127.0.0.1:9/other")
    fills(engine, broker, other)
    claims = _claims(engine)
    exhausted = Verdict(Kind.EXHAUSTED, disable_reason="last error: OSError: r\udce9seau")
    odd = store.Attempt(claims[broker], exhausted, datetime.now(UTC), 3, None, "OSError: r\udce9seau", "a\ud800b")
    good = store.Attempt(claims[other], Verdict(Kind.DELIVERED), datetime.now(UTC), 3, 200, None, "ok")

    store.record(engine, [odd, good], disable_after=1)

    (logged,) = attempts_of(engine, claims[broker].event_id)
    assert (logged.error, logged.response_excerpt) == ("OSError: r\ufffdseau", "a\ufffdb")
    assert events_of(engine, broker)[0].status == "failed"
    assert broker_row(engine, broker).webhook_disabled_reason == "last error: OSError: r\ufffdseau"
    assert status_counts(engine, other) == {"delivered": 1}


@pytest.mark.parametrize(
    ("status_code", "error", "stored_status", "stored_error"),
    [(999, "HTTP 999", None, "HTTP 999"), (99, None, None, "HTTP 99"), (0, "odd", None, "odd")],
)
def test_a_status_outside_100_to_599_is_recorded_as_no_status_with_the_number_in_the_error(
    engine: Engine, status_code: int, error: str | None, stored_status: int | None, stored_error: str
) -> None:
    # The attempts' table accepts 100-599 only (check constraint: SQLSTATE 23514); the HTTP client never hands over
    # another, and the record no longer depends on it.
    broker, _ = broker_with_endpoint(engine, "http://127.0.0.1:9/hook")
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, broker, seller)
    (claim,) = _claims(engine).values()
    retry = Verdict(Kind.RETRY, retry_in_s=60.0)

    store.record(engine, [store.Attempt(claim, retry, datetime.now(UTC), 3, status_code, error, "")], disable_after=5)

    (logged,) = attempts_of(engine, claim.event_id)
    assert (logged.status_code, logged.error) == (stored_status, stored_error)
    assert events_of(engine, broker)[0].last_error == stored_error


@pytest.mark.parametrize(("latency_ms", "stored"), [(2**31, 2**31 - 1), (10**12, 2**31 - 1), (-1, 0)])
def test_a_latency_outside_the_columns_range_is_recorded_clamped(engine: Engine, latency_ms: int, stored: int) -> None:
    # integer column (22003 beyond 2^31 - 1 ms, about 24.8 days of a process suspended mid-attempt) and a check
    # that it is not negative (23514)
    broker, _ = broker_with_endpoint(engine, "http://127.0.0.1:9/hook")
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, broker, seller)
    (claim,) = _claims(engine).values()
    retry = Verdict(Kind.RETRY, retry_in_s=60.0)

    store.record(
        engine, [store.Attempt(claim, retry, datetime.now(UTC), latency_ms, 500, "HTTP 500", "")], disable_after=5
    )

    (logged,) = attempts_of(engine, claim.event_id)
    assert logged.latency_ms == stored


@pytest.mark.parametrize(
    ("delay", "due_in_s"),
    [
        (math.inf, store.MAX_RETRY_DELAY_S),  # JSON null: next_attempt_at NULL (23502)
        (1e13, store.MAX_RETRY_DELAY_S),  # beyond the last timestamp (22008)
        (math.nan, 0.0),  # JSON null (23502)
        (None, 0.0),  # a retry without a delay (23502)
    ],
    ids=["inf", "1e13", "nan", "none"],
)
def test_a_retry_delay_no_timestamp_can_follow_is_recorded_clamped(
    engine: Engine, delay: float | None, due_in_s: float
) -> None:
    broker, _ = broker_with_endpoint(engine, "http://127.0.0.1:9/hook")
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, broker, seller)
    (claim,) = _claims(engine).values()
    before = datetime.now(UTC)

    retry = Verdict(Kind.RETRY, retry_in_s=delay)
    store.record(engine, [store.Attempt(claim, retry, before, 3, 500, "HTTP 500", "")], disable_after=5)

    with engine.connect() as conn:
        due = conn.execute(
            text("SELECT next_attempt_at FROM webhook_events WHERE id = :id"), {"id": claim.event_id}
        ).scalar_one()
    expected = before + timedelta(seconds=due_in_s)
    assert expected <= due <= expected + timedelta(seconds=30)
    assert len(attempts_of(engine, claim.event_id)) == 1


# ------------------------------------------------------------ what this database cannot hold: the last resort


def test_an_attempt_the_database_refuses_is_recorded_with_its_texts_replaced_and_its_event_runs_its_schedule(
    latin1_engine: Engine,
) -> None:
    engine = latin1_engine
    with Receiver() as receiver:
        receiver.fail_next(100)
        receiver.answer_body = NOT_LATIN1
        broker, _ = broker_with_endpoint(engine, receiver.url)
        seller, _ = broker_with_endpoint(engine, None)
        fills(engine, broker, seller)
        (event,) = events_of(engine, broker)

        results = deliver_until_settled(
            deliverer(engine, retry_schedule=(0.02, 0.02), disable_after=1), event.id, timeout=6
        )

    assert [r.outcome for r in results] == [Outcome.RETRY, Outcome.RETRY, Outcome.FAILED]
    logged = attempts_of(engine, event.id)
    assert [(a.status_code, a.error, a.response_excerpt) for a in logged] == [(500, "HTTP 500", store.REFUSED_TEXT)] * 3
    (row,) = events_of(engine, broker)
    assert (row.status, row.attempts, row.last_error) == ("failed", 3, "HTTP 500")
    endpoint = broker_row(engine, broker)  # the failure counted toward the endpoint, which disable_after=1 disables
    assert (endpoint.webhook_enabled, endpoint.webhook_consecutive_failures) == (False, 1)
    assert "last error: HTTP 500" in endpoint.webhook_disabled_reason


def test_an_attempt_the_database_refuses_holds_back_no_other_attempt_of_its_batch(
    latin1_default_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    # psycopg's UnicodeEncodeError is no SQLSTATE: it was taken for a passing failure and the whole batch retried
    # for half a lease, then dropped, every broker's attempts in it sent again a lease later, forever.
    engine = latin1_default_engine
    with Receiver() as odd, Receiver() as fine:
        odd.answer_body = NOT_LATIN1
        seller, _ = broker_with_endpoint(engine, None)
        (a, _), (b, _) = broker_with_endpoint(engine, odd.url), broker_with_endpoint(engine, fine.url)
        fills(engine, a, seller)
        fills(engine, b, seller)
        results: list[Any] = []
        # a linger long enough for both attempts to be in one record
        pump = Pump(engine, replace(FAST, record_linger_s=0.3), capacity=8, observe=results.append)

        async def scenario() -> None:
            stop = asyncio.Event()
            running = asyncio.create_task(pump.run(stop))
            try:
                await asyncio.wait_for(pump.idle(), 5)
            finally:
                stop.set()
                await running

        asyncio.run(scenario())

    assert "recording them one by one" in caplog.text  # they were one batch
    (odd_event,), (fine_event,) = events_of(engine, a), events_of(engine, b)
    outcomes = {r.event_id: r.outcome for r in results}
    assert (outcomes[odd_event.id], outcomes[fine_event.id]) == (Outcome.DELIVERED, Outcome.DELIVERED)
    assert (odd_event.status, fine_event.status) == ("delivered", "delivered")
    (odd_attempt,) = attempts_of(engine, odd_event.id)
    assert (odd_attempt.status_code, odd_attempt.error, odd_attempt.response_excerpt) == (200, None, store.REFUSED_TEXT)
    (fine_attempt,) = attempts_of(engine, fine_event.id)
    assert fine_attempt.response_excerpt == '{"ok":true}'
