"""``exchange.db.arrays.array_literal`` round-trips through PostgreSQL: any text (quotes, backslashes, commas,
braces, blanks, the word NULL, any Unicode but NUL), NULLs, integers, UUIDs and aware datetimes (with any UTC offset
Python allows, wider than PostgreSQL's) come back exactly, in order, as the statement's cast reads them."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exchange.db.arrays import array_literal
from exchange.engine.types import OrderType, Side


@pytest.fixture(scope="module")
def pg(postgres_admin_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
        yield conn


def _round_trip(pg: psycopg.Connection[Any], values: list[Any], pg_type: str) -> list[Any]:
    row = pg.execute(f"SELECT CAST(%(v)s AS {pg_type}[])", {"v": array_literal(values)}).fetchone()
    assert row is not None
    return list(row[0])


_TEXT = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=40)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.none(), _TEXT, st.sampled_from(["NULL", "null", '"', "\\", "{}", ",", " a b "]))))
def test_text_arrays_come_back_exactly(pg: psycopg.Connection[Any], values: list[str | None]) -> None:
    assert _round_trip(pg, values, "text") == values


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.none(), st.integers(min_value=-(2**63), max_value=2**63 - 1))))
def test_bigint_arrays_come_back_exactly(pg: psycopg.Connection[Any], values: list[int | None]) -> None:
    assert _round_trip(pg, values, "bigint") == values


def test_uuid_arrays_come_back_exactly(pg: psycopg.Connection[Any]) -> None:
    values = [uuid.uuid4(), None, uuid.UUID(int=0), uuid.uuid4()]
    assert _round_trip(pg, values, "uuid") == values


_OFFSETS = st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))
_INSTANTS = st.datetimes(min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31), timezones=st.just(UTC))


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(_INSTANTS, _OFFSETS).map(lambda t: t[0].astimezone(t[1])), max_size=8))
def test_datetimes_with_any_offset_come_back_as_the_same_instants(
    pg: psycopg.Connection[Any], values: list[datetime]
) -> None:
    assert _round_trip(pg, values, "timestamptz") == values


def test_aware_datetimes_come_back_as_the_same_instants(pg: psycopg.Connection[Any]) -> None:
    values = [
        datetime(2026, 12, 5, 3, 4, 5, 123456, tzinfo=UTC),
        None,
        datetime(2030, 1, 1, tzinfo=timezone(timedelta(hours=-3))),
        datetime(1999, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        datetime(7686, 7, 10, 22, 5, 50, tzinfo=timezone(-timedelta(hours=21, minutes=17))),
        datetime(2030, 1, 1, tzinfo=timezone(timedelta(hours=23, minutes=59))),
    ]
    assert _round_trip(pg, values, "timestamptz") == values


def test_str_enums_are_written_as_their_values(pg: psycopg.Connection[Any]) -> None:
    values = [Side.BID, OrderType.MARKET, None]
    assert _round_trip(pg, values, "text") == ["bid", "market", None]


def test_an_empty_list_is_an_empty_array(pg: psycopg.Connection[Any]) -> None:
    assert _round_trip(pg, [], "text") == []


def test_a_naive_datetime_is_refused_rather_than_read_in_the_process_time_zone() -> None:
    with pytest.raises(ValueError, match="naive"):
        array_literal([datetime(2030, 1, 1)])
