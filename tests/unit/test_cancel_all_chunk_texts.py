"""A cancel-all's chunks: its live orders' ids, in bucket order, cut into bounded uuid array texts."""

from __future__ import annotations

import uuid

import pytest

from exchange.orders.accept import chunk_texts


def _text(ids: list[str]) -> str:
    return "{" + ",".join(ids) + "}"


def test_chunks_keep_the_buckets_order_hold_at_most_the_size_and_sort_each_chunks_ids() -> None:
    buckets = [sorted((str(uuid.uuid4()) for _ in range(n)), reverse=True) for n in (3, 1, 4)]
    ids = [i for bucket in buckets for i in bucket]

    chunks = chunk_texts([_text(bucket) for bucket in buckets], 3)

    assert chunks == [(_text(sorted(ids[k : k + 3])), len(ids[k : k + 3])) for k in (0, 3, 6)]
    assert [n for _, n in chunks] == [3, 3, 2]


def test_chunks_of_no_orders_are_none() -> None:
    assert chunk_texts([], 1000) == []


def test_a_chunk_holds_at_least_one_order() -> None:
    with pytest.raises(ValueError, match="at least one"):
        chunk_texts([_text([str(uuid.uuid4())])], 0)
