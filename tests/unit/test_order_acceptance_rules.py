"""The accept rules' handling of ``valid_until`` (:func:`exchange.orders.accept.resolve_time_in_force`): whatever
aware datetime the JSON decoder lets through is either refused as bad input or kept as its instant in UTC, for
every time in force that admits one (gtd, ioc, fok)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exchange.engine.types import OrderType, TimeInForce
from exchange.orders.accept import resolve_time_in_force
from exchange.orders.errors import InvalidOrderError

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
OFFSETS = st.timedeltas(min_value=-timedelta(hours=23, minutes=59), max_value=timedelta(hours=23, minutes=59)).map(
    lambda d: timezone(timedelta(minutes=d // timedelta(minutes=1)))
)


@given(st.datetimes(), OFFSETS)
def test_any_aware_valid_until_is_refused_or_kept_as_its_instant_in_utc(local: datetime, zone: timezone) -> None:
    valid_until = local.replace(tzinfo=zone)
    try:
        instant = valid_until.astimezone(UTC)
    except OverflowError:  # before year 1 or after year 9999 in UTC
        instant = None
    if instant is None or instant <= NOW:
        with pytest.raises(InvalidOrderError) as refused:
            resolve_time_in_force(OrderType.LIMIT, None, valid_until, NOW)
        assert refused.value.details == {"field": "valid_until"}
        return
    _, stored = resolve_time_in_force(OrderType.LIMIT, None, valid_until, NOW)
    assert stored == instant
    assert stored is not None
    assert stored.utcoffset() == timedelta(0)


def test_a_valid_until_past_year_9999_in_utc_is_refused_as_out_of_range() -> None:
    late = datetime(9999, 12, 31, 23, 0, tzinfo=timezone(-timedelta(hours=5)))
    with pytest.raises(InvalidOrderError, match="out of range"):
        resolve_time_in_force(OrderType.LIMIT, None, late, NOW)


@pytest.mark.parametrize(
    ("order_type", "requested"),
    [
        (OrderType.MARKET, None),
        (OrderType.MARKET, TimeInForce.IOC),
        (OrderType.MARKET, TimeInForce.FOK),
        (OrderType.LIMIT, TimeInForce.IOC),
        (OrderType.LIMIT, TimeInForce.FOK),
    ],
)
def test_an_ioc_or_fok_order_keeps_its_valid_until_so_the_matcher_can_refuse_to_trade_after_it(
    order_type: OrderType, requested: TimeInForce | None
) -> None:
    # It never rests, but it may be matched long after this accept; dropping the deadline let it trade after it.
    until = datetime(2026, 12, 6, 9, 0, 1, tzinfo=timezone(-timedelta(hours=3)))
    tif, stored = resolve_time_in_force(order_type, requested, until, NOW)
    assert tif is (requested or TimeInForce.IOC)
    assert stored == until
    assert stored is not None
    assert stored.utcoffset() == timedelta(0)


def test_an_ioc_order_without_valid_until_stores_none() -> None:
    assert resolve_time_in_force(OrderType.MARKET, None, None, NOW) == (TimeInForce.IOC, None)
