"""The api's group insert of cancel commands takes the orders' advisory locks itself: one statement, one round trip.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06

Hand-written and frozen (see 0001). Cancel writers are serialised per order by transaction-scoped advisory locks,
taken in ascending order (no cycle between two groups) on one of 256 buckets of the order id's hash under the
two-integer key space 3084 (0x0C0C), apart from the books' one-bigint keys. Until now the api took them with a
statement of its own, then called ``write_cancels`` (0012), inside an explicit transaction: BEGIN, the locks, the
insert, COMMIT, four round trips per group. Taken in the function instead, a group is one autocommit statement.
``VOLATILE`` under READ COMMITTED: the insert's statement takes its own snapshot after every lock is granted, so it
sees the commands (and closed statuses) that a concurrent cancel committed meanwhile, as the separate statement did.
The rest of the function is 0012's.
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WRITE_CANCELS = """CREATE OR REPLACE FUNCTION write_cancels(p_ids uuid[], p_broker_ids uuid[])
RETURNS TABLE (id uuid, broker_id uuid, symbol text, written boolean)
LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan SET enable_seqscan = off
AS $fn$
#variable_conflict use_column
BEGIN
    -- The buckets in ascending order: the sorted subquery's rows reach the lock calls in that order.
    PERFORM pg_advisory_xact_lock(3084, k.bucket)
    FROM (SELECT DISTINCT hashtext(CAST(i AS text)) & 255 AS bucket FROM unnest(p_ids) AS i ORDER BY 1) AS k;
    RETURN QUERY
        WITH k AS (
            SELECT * FROM unnest(p_ids, p_broker_ids) WITH ORDINALITY AS k(id, broker_id, n)
        ), target AS (
            SELECT o.id, o.broker_id, o.symbol, o.status, k.n
            FROM k CROSS JOIN LATERAL (SELECT * FROM orders WHERE orders.id = k.id OFFSET 0) o
            WHERE o.broker_id = k.broker_id
        ), written AS (
            INSERT INTO commands (symbol, kind, order_id)
            SELECT t.symbol, 'cancel', t.id
            FROM target t
            LEFT JOIN LATERAL (
                SELECT true AS found FROM commands c
                WHERE c.symbol = t.symbol AND c.processed_at IS NULL AND c.order_id = t.id AND c.kind = 'cancel'
                ORDER BY c.seq
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
    # 0012's function, read from its (frozen) revision file rather than copied here.
    path = Path(__file__).with_name("0012_write_cancels_function.py")
    spec = importlib.util.spec_from_file_location("rev_0012", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    rev_0012 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rev_0012)
    op.execute(rev_0012.WRITE_CANCELS.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1))
