"""The api's group-commit insert of new orders is a PL/pgSQL function: planned once per server connection.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05

Hand-written and frozen (see 0001). A group of new orders and their ``place`` commands are written by one
statement (``exchange.orders.accept``); sent as a statement of its own (no prepared statements through
pgbouncer's transaction pooling) its two inserts were parsed, analysed and planned on every call, 0.1 ms of
planning per group with ``pg_stat_statements.track_planning`` at ``--scale 100``, on the api's critical path. As a
function, its plan is generic and kept per server connection (as ``matcher_write``'s, 0005). The statement is the
one the api sent (revision 0009's: each order's ``seq`` is also its ``priority``).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Rows in the arrays' order (each array holds one column of the group, position n = the n-th order); an order
# conflicting with a unique key is skipped (the caller reads the original back). Returns the inserted orders.
ACCEPT_ORDERS = """CREATE FUNCTION accept_orders(
    p_ids uuid[], p_broker_ids uuid[], p_client_order_ids text[], p_idempotency_keys text[],
    p_document_numbers text[], p_symbols text[], p_sides text[], p_order_types text[], p_time_in_forces text[],
    p_stps text[], p_prices bigint[], p_quantities bigint[], p_valid_untils timestamptz[]
) RETURNS TABLE (order_id uuid, created_at timestamptz)
LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan
AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY
        WITH ins AS (
            INSERT INTO orders (id, broker_id, client_order_id, idempotency_key, document_number, symbol, side,
                                order_type, time_in_force, stp, price, quantity, remaining, placed_price,
                                placed_quantity, valid_until, seq, priority)
            SELECT v.id, v.broker_id, v.client_order_id, v.idempotency_key, v.document_number, v.symbol, v.side,
                   v.order_type, v.time_in_force, v.stp, v.price, v.quantity, v.quantity, v.price, v.quantity,
                   v.valid_until, v.seq, v.seq
            FROM (
                -- A volatile target is computed after the sort: seqs follow the arrays' order.
                SELECT u.*, nextval('command_seq') AS seq
                FROM unnest(p_ids, p_broker_ids, p_client_order_ids, p_idempotency_keys, p_document_numbers,
                            p_symbols, p_sides, p_order_types, p_time_in_forces, p_stps, p_prices, p_quantities,
                            p_valid_untils)
                     WITH ORDINALITY
                     AS u(id, broker_id, client_order_id, idempotency_key, document_number, symbol, side,
                          order_type, time_in_force, stp, price, quantity, valid_until, n)
                ORDER BY u.n
            ) AS v
            ORDER BY v.n
            ON CONFLICT DO NOTHING
            RETURNING id, symbol, seq
        ), placed AS (
            INSERT INTO commands (seq, symbol, kind, order_id)
            SELECT ins.seq, ins.symbol, 'place', ins.id FROM ins
            RETURNING order_id
        )
        SELECT placed.order_id, now() FROM placed;
END
$fn$"""


def upgrade() -> None:
    op.execute(ACCEPT_ORDERS)


def downgrade() -> None:
    op.execute(
        "DROP FUNCTION accept_orders(uuid[], uuid[], text[], text[], text[], text[], text[], text[], text[], text[],"
        " bigint[], bigint[], timestamptz[])"
    )
