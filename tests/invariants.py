"""The DESIGN.md §6 invariants, checked in SQL against a whole exchange database.

:func:`check_invariants` runs every check and raises ONE :class:`AssertionError` listing every violation (with a few
example rows each), so a failing scenario shows everything that is wrong at once. It accepts a libpq or SQLAlchemy
URL, an open psycopg connection, or a SQLAlchemy Engine/Connection; it only reads.

``drained=True`` (the default) also asserts that the exchange is quiescent: no unprocessed command and no
``pending`` order. Pass ``drained=False`` to check a database while orders still flow.

Checks (each is one query returning offending rows; an empty result means the invariant holds):

* order state: ``closed`` exactly when ``close_reason`` is set; ``open`` orders have something left.
* shares per order: ``quantity = remaining + Σ trade quantities`` (rejected orders excluded; the stored
  ``quantity`` already includes amends and self-trade decrements).
* cash: Σ balances = 0; each balance = Σ sales - Σ purchases of the broker's trades.
* shares per symbol: Σ positions = 0; each position = Σ bought - Σ sold of the broker's trades.
* trades: buyer is a bid and seller an ask of the trade's symbol and brokers; the price is within both limits
  (orders never amended); no duplicate ``(command_seq, match_no)``.
* no trade with a cancelled/expired order after it closed (``executed_at > updated_at``), and no trade with an
  order whose ``valid_until <= executed_at``.
* no crossed book: per symbol, best open bid < best open ask.
* outbox: every trade has exactly two ``order.fill`` events, one for the buy order's broker/order and one for
  the sell order's; every broker's event sequences are exactly ``1..brokers.event_seq``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import psycopg

from exchange.db.urls import libpq_url

MAX_EXAMPLES = 5


class _Cursorish(Protocol):
    def __call__(self, sql: str) -> Sequence[Sequence[Any]]: ...


CHECKS: list[tuple[str, str]] = [
    (
        "closed orders have a close_reason and only closed orders have one",
        """
        SELECT id, status, close_reason FROM orders
        WHERE (status = 'closed') <> (close_reason IS NOT NULL)
           OR status NOT IN ('pending', 'open', 'closed')
        """,
    ),
    (
        "open orders have a positive remaining quantity",
        "SELECT id, remaining FROM orders WHERE status = 'open' AND remaining <= 0",
    ),
    (
        "shares per order: quantity = remaining + sum of its trade quantities",
        """
        SELECT o.id, o.status, o.close_reason, o.quantity, o.remaining, COALESCE(t.filled, 0) AS filled
        FROM orders o
        LEFT JOIN (
            SELECT order_id, SUM(quantity) AS filled FROM (
                SELECT buy_order_id AS order_id, quantity FROM trades
                UNION ALL
                SELECT sell_order_id, quantity FROM trades
            ) legs GROUP BY order_id
        ) t ON t.order_id = o.id
        WHERE o.close_reason IS DISTINCT FROM 'rejected'
          AND o.quantity <> o.remaining + COALESCE(t.filled, 0)
        """,
    ),
    (
        "rejected orders never trade",
        """
        SELECT o.id FROM orders o JOIN trades t ON o.id IN (t.buy_order_id, t.sell_order_id)
        WHERE o.close_reason = 'rejected'
        """,
    ),
    (
        "cash is conserved: the sum of all broker balances is 0",
        "SELECT SUM(balance) FROM brokers HAVING SUM(balance) <> 0",
    ),
    (
        "each broker's balance equals its sales minus its purchases",
        """
        SELECT b.id, b.balance, COALESCE(s.cash, 0) - COALESCE(p.cash, 0) AS from_trades
        FROM brokers b
        LEFT JOIN (SELECT sell_broker_id AS id, SUM(price * quantity) AS cash FROM trades GROUP BY 1) s
               ON s.id = b.id
        LEFT JOIN (SELECT buy_broker_id AS id, SUM(price * quantity) AS cash FROM trades GROUP BY 1) p
               ON p.id = b.id
        WHERE b.balance <> COALESCE(s.cash, 0) - COALESCE(p.cash, 0)
        """,
    ),
    (
        "shares are conserved: positions sum to 0 per symbol",
        "SELECT symbol, SUM(quantity) FROM positions GROUP BY symbol HAVING SUM(quantity) <> 0",
    ),
    (
        "each position equals shares bought minus shares sold in trades",
        """
        WITH legs AS (
            SELECT buy_broker_id AS broker_id, symbol, quantity FROM trades
            UNION ALL
            SELECT sell_broker_id, symbol, -quantity FROM trades
        ), net AS (SELECT broker_id, symbol, SUM(quantity) AS qty FROM legs GROUP BY 1, 2)
        SELECT COALESCE(p.broker_id, n.broker_id), COALESCE(p.symbol, n.symbol), p.quantity, n.qty
        FROM positions p FULL JOIN net n ON n.broker_id = p.broker_id AND n.symbol = p.symbol
        WHERE COALESCE(p.quantity, 0) <> COALESCE(n.qty, 0)
        """,
    ),
    (
        "trades join a bid (buyer) and an ask (seller) of the trade's symbol and brokers",
        """
        SELECT t.id FROM trades t
        JOIN orders b ON b.id = t.buy_order_id
        JOIN orders s ON s.id = t.sell_order_id
        WHERE b.side <> 'bid' OR s.side <> 'ask' OR b.symbol <> t.symbol OR s.symbol <> t.symbol
           OR b.broker_id <> t.buy_broker_id OR s.broker_id <> t.sell_broker_id
        """,
    ),
    (
        "trade prices respect both limits (orders never amended)",
        """
        SELECT t.id, t.price, b.price AS bid_limit, s.price AS ask_limit FROM trades t
        JOIN orders b ON b.id = t.buy_order_id
        JOIN orders s ON s.id = t.sell_order_id
        WHERE ((b.price IS NOT NULL AND t.price > b.price) OR (s.price IS NOT NULL AND t.price < s.price))
          AND NOT EXISTS (SELECT 1 FROM commands c
                          WHERE c.kind = 'amend' AND c.order_id IN (t.buy_order_id, t.sell_order_id))
        """,
    ),
    (
        "no duplicate (command_seq, match_no) among trades",
        "SELECT command_seq, match_no, COUNT(*) FROM trades GROUP BY 1, 2 HAVING COUNT(*) > 1",
    ),
    (
        "no trade with a cancelled or expired order after it closed",
        """
        SELECT t.id, o.id, o.close_reason, o.updated_at, t.executed_at FROM trades t
        JOIN orders o ON o.id IN (t.buy_order_id, t.sell_order_id)
        WHERE o.close_reason IN ('cancelled', 'expired') AND t.executed_at > o.updated_at
        """,
    ),
    (
        "no trade with an order that had expired (valid_until <= executed_at)",
        """
        SELECT t.id, o.id, o.valid_until, t.executed_at FROM trades t
        JOIN orders o ON o.id IN (t.buy_order_id, t.sell_order_id)
        WHERE o.valid_until IS NOT NULL AND o.valid_until <= t.executed_at
        """,
    ),
    (
        "no crossed book: best open bid < best open ask per symbol",
        """
        SELECT symbol, MAX(price) FILTER (WHERE side = 'bid') AS best_bid,
               MIN(price) FILTER (WHERE side = 'ask') AS best_ask
        FROM orders WHERE status = 'open'
        GROUP BY symbol
        HAVING MAX(price) FILTER (WHERE side = 'bid') >= MIN(price) FILTER (WHERE side = 'ask')
        """,
    ),
    (
        "every trade has exactly two order.fill outbox events, one per side",
        """
        SELECT t.id, COUNT(e.id) AS events,
               COUNT(*) FILTER (WHERE e.order_id = t.buy_order_id AND e.broker_id = t.buy_broker_id) AS buy_events,
               COUNT(*) FILTER (WHERE e.order_id = t.sell_order_id AND e.broker_id = t.sell_broker_id) AS sell_events
        FROM trades t LEFT JOIN webhook_events e ON e.trade_id = t.id AND e.type = 'order.fill'
        GROUP BY t.id
        HAVING COUNT(e.id) <> 2
            OR COUNT(*) FILTER (WHERE e.order_id = t.buy_order_id AND e.broker_id = t.buy_broker_id) <> 1
            OR COUNT(*) FILTER (WHERE e.order_id = t.sell_order_id AND e.broker_id = t.sell_broker_id) <> 1
        """,
    ),
    (
        "order.fill events reference an existing trade",
        """
        SELECT e.id FROM webhook_events e LEFT JOIN trades t ON t.id = e.trade_id
        WHERE e.type = 'order.fill' AND t.id IS NULL
        """,
    ),
    (
        "per-broker outbox sequences are exactly 1..event_seq",
        """
        SELECT b.id, b.event_seq, COUNT(e.id), MIN(e.sequence), MAX(e.sequence), COUNT(DISTINCT e.sequence)
        FROM brokers b LEFT JOIN webhook_events e ON e.broker_id = b.id
        GROUP BY b.id, b.event_seq
        HAVING COUNT(e.id) <> b.event_seq
            OR COUNT(DISTINCT e.sequence) <> COUNT(e.id)
            OR (COUNT(e.id) > 0 AND (MIN(e.sequence) <> 1 OR MAX(e.sequence) <> b.event_seq))
        """,
    ),
    (
        "every order has exactly one place command",
        """
        SELECT o.id, COUNT(c.seq) FROM orders o
        LEFT JOIN commands c ON c.order_id = o.id AND c.kind = 'place'
        GROUP BY o.id HAVING COUNT(c.seq) <> 1
        """,
    ),
]

DRAINED_CHECKS: list[tuple[str, str]] = [
    (
        "no unprocessed commands remain",
        "SELECT seq, symbol, kind, created_at FROM commands WHERE processed_at IS NULL ORDER BY seq",
    ),
    (
        "no order is still pending",
        "SELECT id, symbol, created_at FROM orders WHERE status = 'pending'",
    ),
]


@contextmanager
def _query_runner(conn_or_url: Any) -> Iterator[_Cursorish]:
    """Yield ``run(sql) -> rows`` for any supported connection spelling."""
    if isinstance(conn_or_url, str):
        # One REPEATABLE READ snapshot for all checks: consistent even while the exchange keeps writing.
        with psycopg.connect(libpq_url(conn_or_url), connect_timeout=10) as conn:
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True
            try:
                yield lambda sql: conn.execute(sql).fetchall()
            finally:
                conn.rollback()
        return
    if isinstance(conn_or_url, psycopg.Connection):
        yield lambda sql: conn_or_url.execute(sql).fetchall()
        return
    # SQLAlchemy Engine or Connection (imported lazily: the function is also usable without SQLAlchemy).
    from sqlalchemy import Connection, Engine, text

    if isinstance(conn_or_url, Engine):
        with conn_or_url.connect() as conn:
            yield lambda sql: [tuple(r) for r in conn.execute(text(sql)).all()]
        return
    if isinstance(conn_or_url, Connection):
        yield lambda sql: [tuple(r) for r in conn_or_url.execute(text(sql)).all()]
        return
    raise TypeError(f"check_invariants: unsupported connection {type(conn_or_url).__name__}")


def invariant_violations(conn_or_url: Any, *, drained: bool = True) -> list[str]:
    """Every violated invariant as one human-readable line (with up to MAX_EXAMPLES example rows)."""
    checks = CHECKS + (DRAINED_CHECKS if drained else [])
    problems: list[str] = []
    with _query_runner(conn_or_url) as run:
        for name, sql in checks:
            rows = run(sql)
            if rows:
                examples = "; ".join(repr(tuple(r)) for r in rows[:MAX_EXAMPLES])
                problems.append(f"{name}: {len(rows)} violation(s), e.g. {examples}")
    return problems


def check_invariants(conn_or_url: Any, *, drained: bool = True) -> None:
    """Assert DESIGN.md §6 on the whole database; raises AssertionError listing every violation."""
    problems = invariant_violations(conn_or_url, drained=drained)
    if problems:
        raise AssertionError("exchange invariants violated:\n  - " + "\n  - ".join(problems))
