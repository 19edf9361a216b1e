"""``matcher_write`` and ``webhook_record`` reach ``brokers`` by primary key only, whatever their plans were made on.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05

Hand-written and frozen (see 0001). Both functions keep one generic plan per server connection, in which a batch's
``json_to_recordset`` is estimated at 100 rows. Joined to ``brokers`` at that estimate, the planner hashed or
merged the whole table: the outbox insert of 0005 read every broker through ``pk_brokers`` (``enable_seqscan =
off`` only turned the sequential scan into a full index scan), and so did ``webhook_record``'s lock and update of
the batch's brokers (0006), twice. With 100 brokers that was about 100 index entries and heap tuples per statement
and call; it grows with every broker registered (410 brokers: 393 buffer hits for an outbox insert of 2 events).
Here each statement names its brokers as an index condition: the outbox reads ``event_seq`` in a scalar subquery
(one primary-key probe per event), the locks and updates take their ids as ``id = ANY(ARRAY(...))``.
``tests/integration/test_query_plans.py`` requires every read of ``brokers`` in their plans to carry an index
condition. The functions are otherwise those of 0005 and 0006, unchanged; downgrading restores them.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The comments of 0005 (MATCHER_WRITE) and 0004 (WEBHOOK_RECORD) describe the statements.
MATCHER_WRITE = """CREATE OR REPLACE FUNCTION matcher_write(
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
                SELECT id FROM brokers WHERE id = ANY(ARRAY(SELECT id FROM v)) ORDER BY id FOR NO KEY UPDATE
            ), updated AS (
                UPDATE brokers AS b
                SET balance = b.balance + v.delta, event_seq = b.event_seq + v.events
                FROM v
                WHERE b.id = v.id AND b.id = ANY(ARRAY(SELECT id FROM locked))
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
            SELECT v.*, (SELECT b.event_seq FROM brokers AS b WHERE b.id = v.broker_id)
                        - count(*) OVER (PARTITION BY v.broker_id)
                        + row_number() OVER (PARTITION BY v.broker_id ORDER BY v.n) AS sequence
            FROM ROWS FROM (json_to_recordset(p_events)
                            AS (id uuid, broker_id uuid, type text, order_id uuid, trade_id uuid, payload jsonb))
                 WITH ORDINALITY AS v(id, broker_id, type, order_id, trade_id, payload, n)
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

WEBHOOK_RECORD = """CREATE OR REPLACE FUNCTION webhook_record(p_batch jsonb, p_disable_after integer) RETURNS void
LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan SET enable_seqscan = off
AS $fn$
DECLARE
    v_pending CONSTANT text := 'pending';
BEGIN
        WITH async_commit AS (SELECT set_config('synchronous_commit', 'off', true) AS v),
        o AS (
            SELECT * FROM jsonb_to_recordset(p_batch) AS o(
                ord integer, id uuid, broker_id uuid, attempt integer, kind text, started timestamptz, url text,
                status_code integer, latency_ms integer, error text, excerpt text, delay float8, reason text)
        ),
        logged AS (
            INSERT INTO webhook_attempts (event_id, broker_id, attempted_at, url, status_code, latency_ms, error,
                                          response_excerpt)
            SELECT o.id, o.broker_id, o.started, o.url, o.status_code, o.latency_ms, o.error, o.excerpt
            FROM o, async_commit
        ),
        delivered AS (
            UPDATE webhook_events AS e SET status = 'delivered', delivered_at = clock_timestamp(), last_error = NULL
            FROM o
            WHERE o.kind = 'delivered' AND e.id = o.id AND e.status = v_pending
        ),
        retried AS (
            UPDATE webhook_events AS e
            SET next_attempt_at = clock_timestamp() + make_interval(secs => o.delay), last_error = o.error
            FROM o
            WHERE o.kind = 'retry' AND e.id = o.id AND e.status = v_pending AND e.attempts = o.attempt
        ),
        failed AS (
            UPDATE webhook_events AS e SET status = 'failed', last_error = o.error
            FROM o
            WHERE o.kind IN ('gone', 'exhausted') AND e.id = o.id AND e.status = v_pending AND e.attempts = o.attempt
            RETURNING e.id
        ),
        last_ok AS (SELECT broker_id, max(ord) AS ord FROM o WHERE kind = 'delivered' GROUP BY broker_id),
        tally AS (
            SELECT o.broker_id,
                   bool_or(l.ord IS NOT NULL) AS reset,
                   count(f.id) FILTER (WHERE o.kind = 'exhausted' AND o.ord > COALESCE(l.ord, 0)) AS failed_after,
                   bool_or(o.kind = 'gone') AS gone,
                   (array_agg(o.reason ORDER BY o.kind = 'gone' DESC, o.ord DESC)
                       FILTER (WHERE o.kind = 'gone' OR (o.kind = 'exhausted' AND f.id IS NOT NULL)))[1] AS reason
            FROM o LEFT JOIN last_ok AS l ON l.broker_id = o.broker_id LEFT JOIN failed AS f ON f.id = o.id
            GROUP BY o.broker_id
        ),
        locked AS MATERIALIZED (
            SELECT b.id FROM brokers AS b JOIN tally AS t ON t.broker_id = b.id
            WHERE b.id = ANY(ARRAY(SELECT broker_id FROM tally))
              AND ((CASE WHEN t.reset THEN 0 ELSE b.webhook_consecutive_failures END + t.failed_after) <> b.webhook_consecutive_failures OR (t.gone AND b.webhook_enabled))
            ORDER BY b.id
            FOR NO KEY UPDATE OF b
        )
        UPDATE brokers AS b
        SET webhook_consecutive_failures = (CASE WHEN t.reset THEN 0 ELSE b.webhook_consecutive_failures END + t.failed_after),
            webhook_enabled = b.webhook_enabled AND NOT t.gone AND (CASE WHEN t.reset THEN 0 ELSE b.webhook_consecutive_failures END + t.failed_after) < p_disable_after,
            webhook_disabled_reason = CASE WHEN b.webhook_enabled AND (t.gone OR (CASE WHEN t.reset THEN 0 ELSE b.webhook_consecutive_failures END + t.failed_after) >= p_disable_after) THEN t.reason
                                           ELSE b.webhook_disabled_reason END
        FROM tally AS t
        WHERE b.id = t.broker_id AND b.id = ANY(ARRAY(SELECT id FROM locked)) AND ((CASE WHEN t.reset THEN 0 ELSE b.webhook_consecutive_failures END + t.failed_after) <> b.webhook_consecutive_failures OR (t.gone AND b.webhook_enabled));
END
$fn$
"""

# What this revision changed in each function: (its text here, the previous revision's text).
MATCHER_WRITE_CHANGES = [
    ("WHERE id = ANY(ARRAY(SELECT id FROM v)) ORDER BY id", "WHERE id IN (SELECT id FROM v) ORDER BY id"),
    ("b.id = ANY(ARRAY(SELECT id FROM locked))", "b.id IN (SELECT id FROM locked)"),
    (
        "SELECT v.*, (SELECT b.event_seq FROM brokers AS b WHERE b.id = v.broker_id)\n                        - count(*)",
        "SELECT v.*, b.event_seq - count(*)",
    ),
    (
        "payload, n)\n        ) e",
        "payload, n)\n            JOIN brokers b ON b.id = v.broker_id\n        ) e",
    ),
]
WEBHOOK_RECORD_CHANGES = [
    ("WHERE b.id = ANY(ARRAY(SELECT broker_id FROM tally))\n              AND ((CASE", "WHERE ((CASE"),
    ("b.id = ANY(ARRAY(SELECT id FROM locked))", "b.id IN (SELECT id FROM locked)"),
]


def upgrade() -> None:
    op.execute(MATCHER_WRITE)
    op.execute(WEBHOOK_RECORD)


def _undone(function: str, changes: list[tuple[str, str]]) -> str:
    for new, old in changes:
        if function.count(new) != 1:  # a silent no-op replace would "restore" this revision's text
            raise RuntimeError(f"0008's downgrade expected exactly one {new!r}")
        function = function.replace(new, old)
    return function


def downgrade() -> None:
    op.execute(_undone(MATCHER_WRITE, MATCHER_WRITE_CHANGES))
    op.execute(_undone(WEBHOOK_RECORD, WEBHOOK_RECORD_CHANGES))
