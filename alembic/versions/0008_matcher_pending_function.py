"""The matcher's read of pending commands as a PL/pgSQL function: ``matcher_pending``.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05

Hand-written and frozen (see 0001). Every matcher transaction reads up to ``p_limit`` unprocessed commands per
symbol, joined with their orders. Sent as SQL it was parsed and planned on every batch (0.22 ms of planning per
call in ``pg_stat_statements`` at ``exchange bench --scale 100``). As for 0005 and 0007, the statement keeps one
generic plan per server connection, with ``enable_seqscan = off``.

An earlier attempt (not committed, see README "Measured and not adopted") joined ``orders`` directly: a plan made
while the tables were analysed empty read the whole ``orders`` index for each command, and a plan given the id as
a condition used ``ix_orders_broker_created``, whose third column is the id. Here each order is read by its id
alone inside a LATERAL subquery that OFFSET 0 keeps apart, which only the primary key serves as a lookup, as
``order_views`` (0007) does; ``tests/integration/test_query_plans.py`` makes the plans on tables analysed empty,
small and not analysed, and small and analysed, grows them, and requires index lookups on both tables.

The commands come per symbol, a bounded range scan of ``ix_commands_unprocessed_symbol_seq`` in sequence order
(the literal ``processed_at IS NULL`` is that partial index's predicate, so the generic plan can use it), all in
sequence order.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MATCHER_PENDING = """CREATE FUNCTION matcher_pending(p_symbols text[], p_limit integer)
RETURNS TABLE (
    symbol text, seq bigint, kind text, order_id uuid, payload jsonb, broker_id uuid, document_number text,
    side text, order_type text, time_in_force text, price bigint, quantity bigint, valid_until timestamptz,
    stp text
)
LANGUAGE plpgsql STABLE SET plan_cache_mode = force_generic_plan SET enable_seqscan = off
AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY
        SELECT c.symbol, c.seq, c.kind, c.order_id, c.payload, o.broker_id, o.document_number, o.side,
               o.order_type, o.time_in_force, o.price, o.quantity, o.valid_until, o.stp
        FROM unnest(p_symbols) AS s(symbol)
        CROSS JOIN LATERAL (
            SELECT c0.symbol, c0.seq, c0.kind, c0.order_id, c0.payload
            FROM commands c0
            WHERE c0.symbol = s.symbol AND c0.processed_at IS NULL
            ORDER BY c0.seq
            LIMIT p_limit
        ) c
        LEFT JOIN LATERAL (SELECT * FROM orders o0 WHERE o0.id = c.order_id OFFSET 0) o ON true
        ORDER BY c.seq;
END
$fn$"""


def upgrade() -> None:
    op.execute(MATCHER_PENDING)


def downgrade() -> None:
    op.execute("DROP FUNCTION matcher_pending(text[], integer)")
