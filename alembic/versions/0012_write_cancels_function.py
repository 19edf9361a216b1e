"""The api's group insert of cancel commands is a PL/pgSQL function: planned once per server connection.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05

Hand-written and frozen (see 0001). A group of cancel requests writes one ``cancel`` command per order of the
requesting broker that is neither closed nor already has one pending (``exchange.orders.accept``). Sent as a
statement of its own it was parsed and planned on every call: 0.23 ms of planning per group with
``pg_stat_statements.track_planning`` at ``--scale 100``, more than it took to run. As a function its plan is
generic and kept per server connection. ``VOLATILE``: its statement takes its own snapshot when it starts, after the
caller's separate statement took the orders' advisory locks, so it sees the commands (and closed statuses) that a
concurrent cancel committed before the locks were granted, as the plain statement did.

The statement is the api's, reshaped for a plan made once, possibly on small or empty tables, that must stay good
as they grow (``tests/integration/test_query_plans.py``): each order is fetched by its id alone and then checked
against its broker, and each order's pending cancel is looked for through the symbol's unprocessed commands.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Every (id, broker_id) key that names an order of that broker, with whether a command was written for it.
WRITE_CANCELS = """CREATE FUNCTION write_cancels(p_ids uuid[], p_broker_ids uuid[])
RETURNS TABLE (id uuid, broker_id uuid, symbol text, written boolean)
LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan SET enable_seqscan = off
AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY
        WITH k AS (
            SELECT * FROM unnest(p_ids, p_broker_ids) WITH ORDINALITY AS k(id, broker_id, n)
        ), target AS (
            -- Each order by its id alone (OFFSET 0 keeps the subquery apart), then checked against its broker:
            -- given both, a plan made on a small table read the (broker_id, created_at, id) index whole (see 0007).
            SELECT o.id, o.broker_id, o.symbol, o.status, k.n
            FROM k CROSS JOIN LATERAL (SELECT * FROM orders WHERE orders.id = k.id OFFSET 0) o
            WHERE o.broker_id = k.broker_id
        ), written AS (
            INSERT INTO commands (symbol, kind, order_id)
            SELECT t.symbol, 'cancel', t.id
            FROM target t
            -- Per order, through the symbol's unprocessed commands (a LATERAL with LIMIT is never flattened into a
            -- join: an anti join planned on empty tables read a whole index of unprocessed commands per order).
            LEFT JOIN LATERAL (
                SELECT true AS found FROM commands c
                WHERE c.symbol = t.symbol AND c.processed_at IS NULL AND c.order_id = t.id AND c.kind = 'cancel'
                ORDER BY c.seq  -- the (symbol, seq) index's order: it is then the only index worth reading
                LIMIT 1
            ) pending ON true
            WHERE t.status <> 'closed' AND pending.found IS NULL
            ORDER BY t.n
            RETURNING order_id
        )
        SELECT t.id, t.broker_id, t.symbol, w.order_id IS NOT NULL
        FROM target t LEFT JOIN written w ON w.order_id = t.id;
END
$fn$"""


def upgrade() -> None:
    op.execute(WRITE_CANCELS)


def downgrade() -> None:
    op.execute("DROP FUNCTION write_cancels(uuid[], uuid[])")
