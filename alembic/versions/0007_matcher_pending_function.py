"""The matcher's read of pending commands as a PL/pgSQL function: ``matcher_pending``.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04

Hand-written and frozen (see 0001). Every matcher transaction reads its books' pending commands with the same
statement; sent as SQL through pgbouncer it was planned on every batch: 0.19-0.25 ms per call in
``pg_stat_statements`` at ``exchange bench --closed-loop 64``, more than its execution (0.04-0.16 ms). As in
0005, the function keeps one generic plan per server connection (``force_generic_plan``). That plan reads the
commands by a bounded range scan of ``ix_commands_unprocessed_symbol_seq`` per symbol, in sequence order, and
their orders by primary key, even when made on an empty database and kept while both tables grow
(``tests/integration/test_query_plans.py``), so unlike 0005 it needs no ``enable_seqscan = off``.

The statement is the one :mod:`exchange.matching.store` sent for several symbols (``LATERAL`` per symbol), for any
number of symbols. It runs after the statement that takes the books' locks, so its snapshot sees everything their
previous holders committed.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MATCHER_PENDING = """
CREATE FUNCTION matcher_pending(p_symbols text[], p_limit integer) RETURNS TABLE (
    symbol text, seq bigint, kind text, order_id uuid, payload jsonb, broker_id uuid, document_number text,
    side text, order_type text, time_in_force text, price bigint, quantity bigint, valid_until timestamptz,
    stp text
)
LANGUAGE plpgsql STABLE SET plan_cache_mode = force_generic_plan
AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY
        SELECT p.* FROM unnest(p_symbols) AS s(symbol) CROSS JOIN LATERAL (
            SELECT c.symbol, c.seq, c.kind, c.order_id, c.payload, o.broker_id, o.document_number, o.side,
                   o.order_type, o.time_in_force, o.price, o.quantity, o.valid_until, o.stp
            FROM commands c LEFT JOIN orders o ON o.id = c.order_id
            WHERE c.symbol = s.symbol AND c.processed_at IS NULL
            ORDER BY c.seq
            LIMIT p_limit
        ) p
        ORDER BY p.seq;
END
$fn$
"""


def upgrade() -> None:
    op.execute(MATCHER_PENDING)


def downgrade() -> None:
    op.execute("DROP FUNCTION matcher_pending(text[], integer)")
