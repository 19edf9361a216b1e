"""Cancels decide once, with no join back; pending cancels and expiries have indexes of their own.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-07

Hand-written and frozen (see 0001). Three plans that grew with the data they read:

* ``write_cancels`` (0012 as 0014 left it) returned ``target LEFT JOIN written ON written.order_id = target.id``.
  Its cached generic plan joins the two CTEs by nested loop: N² comparisons for a cancel-all of N orders (10,000
  orders: 8.8 s, 20,000: 35.6 s), while the function holds the cancels' advisory locks on all 256 buckets, so every
  other cancel on the exchange waited for it. Now the orders are fetched and decided once, in a ``MATERIALIZED``
  CTE; the insert reads it, and the function's rows come from it, with no join back: ``written`` is the decision
  that made the insert. The contract is 0014's: the locks first, in ascending bucket order; one row per keyed order
  of its broker; a command for each one that is not closed and has no cancel pending, in the keys' order. (As
  before, the keys are expected distinct: the api removes repeats.)
* Each order's pending cancel was looked for through the symbol's unprocessed commands (the (symbol, seq) index,
  filtered by order id and kind): every unprocessed command of the symbol, per order, when the matcher is behind.
  ``ix_commands_pending_cancel`` holds the unprocessed cancels alone, by order id: one probe per order.
* The sweeper's pending-expire check (``exchange.sweeper``) became a nested-loop anti join reading the whole
  unprocessed-commands index per due symbol while a backlog was pending (50 due symbols, 100,000 pending commands:
  1.1 s per sweep, under the expiry lock). ``ix_commands_pending_expire`` holds the unprocessed expires alone, by
  symbol: at most one entry per symbol.

Both indexes are partial on ``processed_at IS NULL``, like ``ix_commands_unprocessed_symbol_seq``: a command leaves
them when it is processed, and a place command (the accept path's insert) never enters them. Downgrading restores
0014's ``write_cancels`` exactly (0012's text with 0014's locks, as 0014's upgrade builds it) and drops the indexes.
"""

from collections.abc import Sequence

from alembic import context, op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PENDING_CANCEL_INDEX = (
    "CREATE INDEX ix_commands_pending_cancel ON commands (order_id) WHERE kind = 'cancel' AND processed_at IS NULL"
)
PENDING_EXPIRE_INDEX = (
    "CREATE INDEX ix_commands_pending_expire ON commands (symbol) WHERE kind = 'expire' AND processed_at IS NULL"
)

# Every (id, broker_id) key that names an order of that broker, with whether a command was written for it.
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
        -- Decided once (MATERIALIZED: read by the insert and by the result, computed once): the insert writes
        -- the rows whose w is true and the result returns w, so nothing joins the insert's rows back (a join
        -- back was a nested loop of N x N comparisons for a cancel-all of N orders).
        WITH decided AS MATERIALIZED (
            SELECT o.id, o.broker_id, o.symbol, k.n, o.status <> 'closed' AND pending.found IS NULL AS w
            FROM unnest(p_ids, p_broker_ids) WITH ORDINALITY AS k(id, broker_id, n)
            -- Each order by its id alone (OFFSET 0 keeps the subquery apart), then checked against its broker:
            -- given both, a plan made on a small table read the (broker_id, created_at, id) index whole (see 0007).
            CROSS JOIN LATERAL (SELECT * FROM orders WHERE orders.id = k.id OFFSET 0) o
            -- Per order, one probe of the unprocessed cancels' index (a LATERAL with LIMIT is never flattened
            -- into a join: an anti join planned on empty tables read a whole index per order).
            LEFT JOIN LATERAL (
                SELECT true AS found FROM commands c
                WHERE c.order_id = o.id AND c.kind = 'cancel' AND c.processed_at IS NULL
                LIMIT 1
            ) pending ON true
            WHERE o.broker_id = k.broker_id
        ), written AS (
            INSERT INTO commands (symbol, kind, order_id)
            SELECT d.symbol, 'cancel', d.id FROM decided d WHERE d.w ORDER BY d.n
        )
        SELECT d.id, d.broker_id, d.symbol, d.w FROM decided d;
END
$fn$"""


def _write_cancels_0014() -> str:
    """0014's ``write_cancels`` as ``CREATE OR REPLACE``: 0012's text with 0014's locks, as 0014's upgrade builds
    it (from those frozen revisions' modules)."""
    text = str(context.script.get_revision("0012").module.WRITE_CANCELS)
    locks = str(context.script.get_revision("0014").module.LOCKS)
    if text.count("CREATE FUNCTION") != 1 or text.count("\nBEGIN\n") != 1:
        raise RuntimeError("0018 expected exactly one CREATE FUNCTION and one BEGIN line in 0012's write_cancels")
    head, begin, body = text.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1).partition("\nBEGIN\n")
    return head + begin + locks + body


def upgrade() -> None:
    op.execute(PENDING_CANCEL_INDEX)
    op.execute(PENDING_EXPIRE_INDEX)
    op.execute(WRITE_CANCELS)


def downgrade() -> None:
    op.execute(_write_cancels_0014())
    op.execute("DROP INDEX ix_commands_pending_expire")
    op.execute("DROP INDEX ix_commands_pending_cancel")
