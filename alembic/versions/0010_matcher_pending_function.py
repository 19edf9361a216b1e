"""The matcher's read of pending commands is a PL/pgSQL function: planned once per server connection.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05

Hand-written and frozen (see 0001). Every matcher transaction reads up to a limit of unprocessed commands of each
of its symbols, joined to their orders (``exchange.matching.store.begin_batch``). Sent as a statement of its own
(pgbouncer's transaction pooling rules out prepared statements), it was parsed and planned on every call: with
``pg_stat_statements.track_planning`` at ``--scale 100`` that was 0.14 ms of planning per one-symbol call and
0.18 ms per several-symbol call against 0.05-0.07 ms of execution, about half of all the planning PostgreSQL did
for the exchange. As a function its plan is generic and kept per server connection, like ``matcher_write``'s
(0005); the statement inside is the several-symbol one (a bounded range scan of
``ix_commands_unprocessed_symbol_seq`` per symbol, the orders by primary key), for one symbol too.

``STABLE``: its one statement runs with the snapshot of the calling statement, which starts after the transaction
took its books' advisory locks, as the plain statement did.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MATCHER_PENDING = """CREATE FUNCTION matcher_pending(p_symbols text[], p_limit integer)
RETURNS TABLE (symbol text, seq bigint, kind text, order_id uuid, payload jsonb, broker_id uuid, document_number text,
               side text, order_type text, time_in_force text, price bigint, quantity bigint,
               valid_until timestamptz, stp text)
LANGUAGE plpgsql STABLE SET plan_cache_mode = force_generic_plan SET enable_seqscan = off
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
$fn$"""


def upgrade() -> None:
    op.execute(MATCHER_PENDING)


def downgrade() -> None:
    op.execute("DROP FUNCTION matcher_pending(text[], integer)")
