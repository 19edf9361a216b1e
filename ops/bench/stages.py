"""``--server-stats``: where a new order's latency went, split by the exchange's own timestamps.

For each new order answered 2xx the generator knows when it was scheduled and when the answer arrived; the
database knows when the api's accept transaction started (``orders.created_at``: PostgreSQL's ``now()``) and the
clock of the matcher transaction that applied its place command (``commands.processed_at``, read after that
transaction took its books' advisory locks). All four are wall clocks of the same machine, so the latency splits
into three stages that add up to it:

* ``to_accept``: scheduled send → the accept transaction's start (the generator's own lag, HTTP, the api's parsing
  and authentication, the wait for the api's group-commit slot);
* ``accept_to_match``: → the matcher transaction's clock (the insert and its commit, the wake-up, the partition's
  queue, the matcher's wait for the partition and the locks, the batch's first round trip);
* ``match_to_answer``: → the answer received (matching, the write and its commit, the publish, the api's answer).

An order answered before its matcher transaction (the api's wait ended first: answered ``pending``) has no third
stage; such orders are counted apart and left out of all three, as are orders the database does not have as
processed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ops.bench.report import summarize

STAGES = ("to_accept", "accept_to_match", "match_to_answer")
_CHUNK = 5000

_TIMESTAMPS = """
    SELECT o.id::text, extract(epoch FROM o.created_at)::float8, extract(epoch FROM c.processed_at)::float8
    FROM orders o JOIN commands c ON c.seq = o.seq
    WHERE o.id = ANY(%s::uuid[]) AND c.processed_at IS NOT NULL
"""


def split(times: Iterable[tuple[str, float, float]], stamps: Mapping[str, tuple[float, float]]) -> dict[str, Any]:
    """The stages of each order in ``times`` ((id, scheduled, answered), epoch s) that ``stamps`` has ((accept
    start, matcher clock), epoch s): a summary per stage in ms, plus the counts of orders split and left out."""
    stages: dict[str, list[float]] = {name: [] for name in STAGES}
    answered_first = missing = 0
    for order_id, scheduled, answered in times:
        stamp = stamps.get(order_id)
        if stamp is None:
            missing += 1
            continue
        accepted, matched = stamp
        if matched > answered:
            answered_first += 1
            continue
        for name, start, end in zip(STAGES, (scheduled, accepted, matched), (accepted, matched, answered), strict=True):
            stages[name].append((end - start) * 1000.0)
    return {
        "orders": len(stages["to_accept"]),
        "answered_before_match": answered_first,
        "not_processed": missing,
        **{name: summarize(values) for name, values in stages.items()},
        "note": "scheduled send -> accept transaction start -> matcher transaction clock -> answer (wall clocks)",
    }


def fetch(database_url: str, order_ids: Sequence[str]) -> dict[str, tuple[float, float]]:
    """(accept start, matcher clock) in epoch seconds of each of ``order_ids`` whose place command is processed."""
    import psycopg

    stamps: dict[str, tuple[float, float]] = {}
    with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
        for at in range(0, len(order_ids), _CHUNK):
            for order_id, accepted, matched in conn.execute(_TIMESTAMPS, (list(order_ids[at : at + _CHUNK]),)):
                stamps[str(order_id)] = (float(accepted), float(matched))
    return stamps


def order_stages(database_url: str, times: Sequence[tuple[str, float, float]]) -> dict[str, Any]:
    """:func:`split` of ``times`` by the database's timestamps; ``{"error": ...}`` when they cannot be read (the
    run's report is worth more than this part of it)."""
    import psycopg

    try:
        stamps = fetch(database_url, [order_id for order_id, _, _ in times])
    except psycopg.Error as exc:
        return {"error": f"{type(exc).__name__}: {exc}".strip()}
    return split(times, stamps)
