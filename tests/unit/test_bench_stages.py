"""``exchange bench --server-stats``'s split of a new order's latency by the exchange's own timestamps."""

from __future__ import annotations

import pytest

from ops.bench.stages import STAGES, split


def test_each_order_splits_into_three_stages_that_add_up_to_its_latency() -> None:
    times = [("a", 100.0, 100.010), ("b", 200.0, 200.030)]
    stamps = {"a": (100.002, 100.007), "b": (200.010, 200.015)}

    result = split(times, stamps)

    assert result["orders"] == 2
    assert [result[name]["max_ms"] for name in STAGES] == pytest.approx([10.0, 5.0, 15.0])
    assert [result[name]["p50_ms"] for name in STAGES] == pytest.approx([2.0, 5.0, 3.0])
    mean_latency_ms = (10.0 + 30.0) / 2
    assert sum(result[name]["mean_ms"] for name in STAGES) == pytest.approx(mean_latency_ms)


def test_orders_answered_before_their_match_or_never_processed_are_counted_apart() -> None:
    times = [("pending", 1.0, 1.005), ("unknown", 2.0, 2.010), ("matched", 3.0, 3.004)]
    stamps = {"pending": (1.001, 1.009), "matched": (3.001, 3.002)}

    result = split(times, stamps)

    assert (result["orders"], result["answered_before_match"], result["not_processed"]) == (1, 1, 1)
    assert result["to_accept"]["count"] == result["match_to_answer"]["count"] == 1


def test_no_orders_give_empty_summaries() -> None:
    result = split([], {})

    assert result["orders"] == 0
    assert all(result[name]["p50_ms"] is None for name in STAGES)


def test_a_database_that_cannot_be_read_gives_an_error_instead_of_stages() -> None:
    from ops.bench.stages import order_stages

    result = order_stages("postgresql://postgres@127.0.0.1:1/none?connect_timeout=1", [("a", 1.0, 2.0)])

    assert set(result) == {"error"}
    assert "OperationalError" in result["error"]
