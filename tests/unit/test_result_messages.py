"""The matchers' result messages: what api processes decode from the pub/sub channel."""

from __future__ import annotations

import uuid

import pytest

from exchange.messaging.results import PlacedState, PlacedTrade, decode_results, encode_results


def test_a_result_message_carries_every_changed_id_and_the_placed_orders_states() -> None:
    placed_id, maker_id = uuid.uuid4(), uuid.uuid4()
    trade = PlacedTrade(uuid.uuid4(), 100, 4, "Seller SA", 1_764_000_000_123_456)
    state = PlacedState(placed_id, "closed", "filled", 0, None, None, 1_764_000_000_123_456, [trade])
    ids, placed = decode_results(encode_results([placed_id, maker_id], [state]))
    assert ids == [placed_id, maker_id]
    assert placed == {placed_id: state}  # the maker changed but was not placed here: no state, read back


def test_a_message_of_a_matcher_from_before_the_states_still_resolves_its_ids() -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    assert decode_results(f"{first.hex},{second.hex}".encode()) == ([first, second], {})


def test_a_malformed_message_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="malformed"):
        decode_results(b'[["not-a-uuid"], []]')
