"""``webhook_record`` updates the batch's events by primary key, whatever the plans were made on.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04

Hand-written and frozen (see 0001). 0004's function keeps its plans per server connection until ``webhook_events``
is analysed. Made while a handful of events were pending (a fresh database, the first seconds of a run), they found
the batch's events by reading every pending event through the pending-events partial index: its predicate is the
statement's own ``e.status = 'pending'``. With thousands pending (a slow receiver's backlog, the moment a worker
must catch up) each record then read them all. Here the status is a PL/pgSQL constant, a parameter of the
generic plan, so that index (whose predicate names the literal) cannot serve the statements, and
``enable_seqscan = off`` keeps a plan made on a near-empty table from scanning it: the events are reached by
primary key (``tests/integration/test_query_plans.py``). Otherwise the statement is 0004's, unchanged.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The comments of 0004 (WEBHOOK_RECORD) describe the statement.
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
            WHERE ((CASE WHEN t.reset THEN 0 ELSE b.webhook_consecutive_failures END + t.failed_after) <> b.webhook_consecutive_failures OR (t.gone AND b.webhook_enabled))
            ORDER BY b.id
            FOR NO KEY UPDATE OF b
        )
        UPDATE brokers AS b
        SET webhook_consecutive_failures = (CASE WHEN t.reset THEN 0 ELSE b.webhook_consecutive_failures END + t.failed_after),
            webhook_enabled = b.webhook_enabled AND NOT t.gone AND (CASE WHEN t.reset THEN 0 ELSE b.webhook_consecutive_failures END + t.failed_after) < p_disable_after,
            webhook_disabled_reason = CASE WHEN b.webhook_enabled AND (t.gone OR (CASE WHEN t.reset THEN 0 ELSE b.webhook_consecutive_failures END + t.failed_after) >= p_disable_after) THEN t.reason
                                           ELSE b.webhook_disabled_reason END
        FROM tally AS t
        WHERE b.id = t.broker_id AND b.id IN (SELECT id FROM locked) AND ((CASE WHEN t.reset THEN 0 ELSE b.webhook_consecutive_failures END + t.failed_after) <> b.webhook_consecutive_failures OR (t.gone AND b.webhook_enabled));
END
$fn$
"""


def upgrade() -> None:
    op.execute(WEBHOOK_RECORD)


# 0004's function exactly (its text with the three changes of this revision undone).
PREVIOUS_WEBHOOK_RECORD = (
    WEBHOOK_RECORD.replace(" SET enable_seqscan = off", "")
    .replace("DECLARE\n    v_pending CONSTANT text := 'pending';\n", "")
    .replace("e.status = v_pending", "e.status = 'pending'")
)


def downgrade() -> None:
    op.execute(PREVIOUS_WEBHOOK_RECORD)
