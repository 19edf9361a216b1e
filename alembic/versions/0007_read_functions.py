"""The api's three most frequent reads as PL/pgSQL functions: ``order_views``, ``book_levels``, ``recent_prices``.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05

Hand-written and frozen (see 0001). An order's status (also read back after a cancel), a book and a price are 90 %
of the reads brokers send (``exchange bench``'s B3 model). Sent as SQL through pgbouncer (no server-side prepared
statements with pgbouncer 1.18), PostgreSQL parsed and planned them on every request: in ``pg_stat_statements`` at
``exchange bench --scale 100``, planning took 0.34 ms per order read, 0.20 ms per book and 0.07 ms per price, more
than executing them (0.39, 0.16 and 0.10 ms). As for the matcher's and the webhook workers' functions (0004,
0005), PL/pgSQL keeps each statement's plan in the server backend across transactions and
``plan_cache_mode = force_generic_plan`` plans it once, for any parameters; ``enable_seqscan = off`` keeps a plan
made on a near-empty table (a fresh database) from reading the whole table once it has grown
(``tests/integration/test_query_plans.py``): every statement here reaches its rows through an index (orders by
primary key and trades by order, the open book's partial index, which the literal ``'open'`` still matches in a
generic plan, and trades by symbol).

The statements are the ones :mod:`exchange.orders.queries` sent before, with the functions' parameters, except that
``order_views`` reads each order by id alone and then checks its broker (see its comment) (``#variable_conflict use_column``: a bare name is the column, not the output parameter of the same
name). A later change is a new revision with ``CREATE OR REPLACE FUNCTION``.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Several orders with their trades, one row per trade (or one row with NULL trade columns), from one snapshot, only
# to their own brokers (a key naming another broker's order finds nothing). The two trade lookups (buy side, sell
# side) are a UNION ALL rather than an OR so both use their index. Each order is fetched by its id alone (OFFSET 0
# keeps the subquery apart) and only then checked against its broker: given both, a plan made on a small table
# used the (broker_id, created_at, id) index, which reads every order of the broker once the table has grown.
ORDER_VIEWS = """CREATE FUNCTION order_views(p_ids uuid[], p_broker_ids uuid[])
RETURNS TABLE (
    id uuid, side text, order_type text, time_in_force text, symbol text, price bigint, quantity bigint,
    remaining bigint, status text, close_reason text, valid_until timestamptz, created_at timestamptz,
    updated_at timestamptz, client_order_id text, document_number text, stp text, broker_id uuid,
    trade_id uuid, trade_price bigint, trade_quantity bigint, executed_at timestamptz, counterparty text
)
LANGUAGE plpgsql STABLE SET plan_cache_mode = force_generic_plan SET enable_seqscan = off
AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY
        SELECT o.id, o.side, o.order_type, o.time_in_force, o.symbol, o.price, o.quantity, o.remaining, o.status,
               o.close_reason, o.valid_until, o.created_at, o.updated_at, o.client_order_id, o.document_number,
               o.stp, o.broker_id,
               t.id, t.price, t.quantity, t.executed_at,
               cb.name
        FROM unnest(p_ids, p_broker_ids) AS k(id, broker_id)
        CROSS JOIN LATERAL (SELECT * FROM orders WHERE orders.id = k.id OFFSET 0) o
        LEFT JOIN LATERAL (
            SELECT tb.id, tb.price, tb.quantity, tb.executed_at, tb.command_seq, tb.match_no,
                   tb.sell_broker_id AS counterparty_id
            FROM trades tb WHERE tb.buy_order_id = o.id
            UNION ALL
            SELECT ts.id, ts.price, ts.quantity, ts.executed_at, ts.command_seq, ts.match_no, ts.buy_broker_id
            FROM trades ts WHERE ts.sell_order_id = o.id
        ) t ON true
        LEFT JOIN brokers cb ON cb.id = t.counterparty_id
        WHERE o.broker_id = k.broker_id
        ORDER BY o.broker_id, o.id, t.executed_at, t.command_seq, t.match_no;
END
$fn$"""

# Aggregated price levels of the open book, ``p_depth`` per side: bids highest first, asks lowest first. Resting
# orders whose valid_until has passed never trade (the sweeper closes them soon), so they are not shown.
BOOK_LEVELS = """CREATE FUNCTION book_levels(p_symbol text, p_depth integer)
RETURNS TABLE (side text, price bigint, total_quantity numeric, order_count bigint)
LANGUAGE plpgsql STABLE SET plan_cache_mode = force_generic_plan SET enable_seqscan = off
AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY
        SELECT 'bid'::text, b.* FROM (
            SELECT o.price, sum(o.remaining), count(*)
            FROM orders o
            WHERE o.symbol = p_symbol AND o.status = 'open' AND o.side = 'bid'
              AND (o.valid_until IS NULL OR o.valid_until > now())
            GROUP BY o.price
            ORDER BY o.price DESC
            LIMIT p_depth
        ) b
        UNION ALL
        SELECT 'ask'::text, a.* FROM (
            SELECT o.price, sum(o.remaining), count(*)
            FROM orders o
            WHERE o.symbol = p_symbol AND o.status = 'open' AND o.side = 'ask'
              AND (o.valid_until IS NULL OR o.valid_until > now())
            GROUP BY o.price
            ORDER BY o.price ASC
            LIMIT p_depth
        ) a;
END
$fn$"""

# The prices of the symbol's last ``p_n`` trades, newest first (the tape's order).
RECENT_PRICES = """CREATE FUNCTION recent_prices(p_symbol text, p_n integer)
RETURNS TABLE (price bigint)
LANGUAGE plpgsql STABLE SET plan_cache_mode = force_generic_plan SET enable_seqscan = off
AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY
        SELECT t.price FROM trades t WHERE t.symbol = p_symbol
        ORDER BY t.executed_at DESC, t.command_seq DESC, t.match_no DESC
        LIMIT p_n;
END
$fn$"""


def upgrade() -> None:
    for function in (ORDER_VIEWS, BOOK_LEVELS, RECENT_PRICES):
        op.execute(function)


def downgrade() -> None:
    op.execute("DROP FUNCTION recent_prices(text, integer)")
    op.execute("DROP FUNCTION book_levels(text, integer)")
    op.execute("DROP FUNCTION order_views(uuid[], uuid[])")
