"""The matcher's writes as one PL/pgSQL function: ``matcher_write``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04

Hand-written and frozen (see 0001). The matcher writes every batch with the same six statements (orders, trades,
brokers, outbox, positions, then the commands and the books' versions). Sent as SQL through pgbouncer (transaction
pooling, no server-side prepared statements with pgbouncer 1.18), PostgreSQL parsed and planned each one on every
batch: in ``pg_stat_statements`` at ``exchange bench --closed-loop 64``, planning alone took 0.03-0.35 ms per
statement and call, 2.2 s of server CPU in a 20 s run (beside 7.5 s of execution, wall clock). As for the webhook
functions of 0004, PL/pgSQL keeps each statement's plan in the server backend across transactions and
``plan_cache_mode = force_generic_plan`` plans it once, for any parameters.

``enable_seqscan = off``: a kept plan is made again only after a table it reads is analysed, and plans made on a
fresh database (a few orders, where reading them all is cheapest) scanned ``orders`` on every batch while it grew
to thousands of rows before autovacuum's first ANALYZE; under ``exchange bench`` that made the function slower
than the statements it replaced. Every table here has an index that serves its statement (``orders``,
``commands``, ``symbols`` and ``brokers`` by primary key; ``o.id = ANY(p_order_ids)`` is estimated at 10 ids), so
forbidding sequential scans only removes those plans (``tests/integration/test_query_plans.py``). Where the
planner still prefers reading a whole small table, it reads it through its primary key instead: ``brokers``,
joined to a batch's rows, when the plan was made with a few hundred brokers, which costs what the sequential scan
did until ``brokers`` is analysed again. The setting holds for the function's statements and the foreign-key
checks they fire, which probe primary keys too.

The statements and their comments are the ones :mod:`exchange.matching.store` sent before, unchanged except that
the parameters are the function's. A table whose rows are NULL (none in the batch) is not written. The function
returns the id and name of every broker row it updated. A later change is a new revision with
``CREATE OR REPLACE FUNCTION``.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# ``#variable_conflict use_column``: the result columns (id, name) are also PL/pgSQL variables; every name in the
# statements means a column.
MATCHER_WRITE = """
CREATE FUNCTION matcher_write(
    p_now timestamptz, p_orders json, p_order_ids uuid[], p_trades json, p_brokers json, p_events json,
    p_event_order_ids uuid[], p_shares json, p_seqs bigint[], p_books text[], p_prices bigint[]
) RETURNS TABLE (id uuid, name text)
LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan SET enable_seqscan = off
AS $fn$
#variable_conflict use_column
BEGIN
    IF p_orders IS NOT NULL THEN
        UPDATE orders AS o
        SET status = v.status,
            remaining = COALESCE(v.remaining, o.remaining),
            close_reason = v.close_reason,
            priority = v.priority,
            price = COALESCE(v.price, o.price),
            quantity = COALESCE(v.quantity, o.quantity),
            updated_at = p_now
        FROM json_to_recordset(p_orders)
             AS v(order_id uuid, status text, remaining bigint, close_reason text, priority bigint, price bigint,
                  quantity bigint)
        WHERE o.id = v.order_id AND o.id = ANY(p_order_ids);
    END IF;

    IF p_trades IS NOT NULL THEN
        INSERT INTO trades (id, symbol, price, quantity, buy_order_id, sell_order_id, buy_broker_id,
                            sell_broker_id, maker_order_id, taker_side, command_seq, match_no, executed_at)
        SELECT v.id, v.symbol, v.price, v.quantity, v.buy_order_id, v.sell_order_id, v.buy_broker_id,
               v.sell_broker_id, v.maker_order_id, v.taker_side, v.seq, v.match_no, p_now
        FROM json_to_recordset(p_trades)
             AS v(id uuid, symbol text, price bigint, quantity bigint, buy_order_id uuid, sell_order_id uuid,
                  buy_broker_id uuid, sell_broker_id uuid, maker_order_id uuid, taker_side text, seq bigint,
                  match_no int);
    END IF;

    -- Two matchers on different books touching the same brokers must queue in one order instead of
    -- deadlocking, so the rows are locked in id order (the sorted LockRows of the CTE) before the UPDATE changes
    -- them: the UPDATE can only reach a row through ``locked``, i.e. after the CTE has locked it, so it takes no
    -- lock of its own out of order. NO KEY UPDATE (only balance/event_seq change) does not conflict with the KEY
    -- SHARE lock every order INSERT's foreign-key check takes, so accepts never wait on us. A row updated by
    -- another transaction between this statement's snapshot and our lock is re-read at its newest version (READ
    -- COMMITTED re-check), so no increment is lost.
    IF p_brokers IS NOT NULL THEN
        RETURN QUERY
            WITH v AS MATERIALIZED (
                SELECT * FROM json_to_recordset(p_brokers) AS v(id uuid, delta bigint, events bigint)
            ), locked AS MATERIALIZED (
                SELECT id FROM brokers WHERE id IN (SELECT id FROM v) ORDER BY id FOR NO KEY UPDATE
            ), updated AS (
                UPDATE brokers AS b
                SET balance = b.balance + v.delta, event_seq = b.event_seq + v.events
                FROM v
                WHERE b.id = v.id AND b.id IN (SELECT id FROM locked)
                RETURNING b.id, b.name
            )
            SELECT u.id, u.name FROM updated AS u;
    END IF;

    -- After the brokers, so ``b.event_seq`` already counts this batch's events (of every book in it): a broker's
    -- k-th event of the batch (in row order: book by book, each in draft order) gets ``event_seq - count + k``,
    -- which continues its sequence without a gap. The sequence and the order's document/client ids are added to
    -- the payload here.
    IF p_events IS NOT NULL THEN
        INSERT INTO webhook_events (id, broker_id, sequence, type, order_id, trade_id, payload, created_at,
                                    next_attempt_at)
        SELECT e.id, e.broker_id, e.sequence, e.type, e.order_id, e.trade_id,
               e.payload || jsonb_build_object('sequence', e.sequence, 'document_number', o.document_number,
                                               'client_order_id', o.client_order_id),
               p_now, p_now
        FROM (
            SELECT v.*, b.event_seq - count(*) OVER (PARTITION BY v.broker_id)
                        + row_number() OVER (PARTITION BY v.broker_id ORDER BY v.n) AS sequence
            FROM ROWS FROM (json_to_recordset(p_events)
                            AS (id uuid, broker_id uuid, type text, order_id uuid, trade_id uuid, payload jsonb))
                 WITH ORDINALITY AS v(id, broker_id, type, order_id, trade_id, payload, n)
            JOIN brokers b ON b.id = v.broker_id
        ) e
        LEFT JOIN orders o ON o.id = e.order_id AND o.id = ANY(p_event_order_ids);
    END IF;

    IF p_shares IS NOT NULL THEN
        INSERT INTO positions (broker_id, symbol, quantity, updated_at)
        SELECT v.broker_id, v.symbol, v.quantity, p_now
        FROM json_to_recordset(p_shares) AS v(broker_id uuid, symbol text, quantity bigint)
        ON CONFLICT (broker_id, symbol)
        DO UPDATE SET quantity = positions.quantity + EXCLUDED.quantity, updated_at = EXCLUDED.updated_at;
    END IF;

    WITH processed AS (
        UPDATE commands SET processed_at = p_now WHERE seq = ANY(p_seqs)
    )
    UPDATE symbols AS s
    SET book_version = s.book_version + 1,
        last_price = COALESCE(v.price, s.last_price),
        last_trade_at = CASE WHEN v.price IS NULL THEN s.last_trade_at ELSE p_now END
    FROM unnest(p_books, p_prices) AS v(symbol, price)
    WHERE s.symbol = v.symbol;
END
$fn$
"""


def upgrade() -> None:
    op.execute(MATCHER_WRITE)


def downgrade() -> None:
    op.execute(
        "DROP FUNCTION matcher_write(timestamptz, json, uuid[], json, json, json, uuid[], json, bigint[], text[],"
        " bigint[])"
    )
