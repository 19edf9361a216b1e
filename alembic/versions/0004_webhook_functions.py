"""Webhook delivery's two statements as PL/pgSQL functions: ``webhook_claim`` and ``webhook_record``.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04

Hand-written and frozen (see 0001). The delivery worker claims and records batches thousands of times a second,
always the same two large statements. Sent as SQL through pgbouncer (transaction pooling, no server-side prepared
statements with pgbouncer 1.18) PostgreSQL parsed and planned each one every time: measured with pgbench on an
idle table, 0.50 ms of server time per claim and 1.0 ms per record, most of it parse and plan. PL/pgSQL keeps a
function's plans in the server backend across transactions, and ``plan_cache_mode = force_generic_plan`` makes it
plan each statement once per backend (the plans use the same indexes: the pending-events partial index with its
limit, the primary keys): 0.1 ms each. The statements are the ones :mod:`exchange.webhooks.store` sent before,
unchanged; ``synchronous_commit`` is still set for the calling transaction only
(``set_config(…, true)`` outlives the function, not the transaction).

A later change to either statement is a new revision with ``CREATE OR REPLACE FUNCTION``.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# ``due`` locks the oldest due events, skipping rows other workers hold and brokers the calling worker already has at
# its per-broker cap (``p_full_brokers``); ``ranked`` numbers them per broker and ``claimed`` keeps at most the
# broker's room (``p_room_left`` for brokers the worker has some in flight, else ``p_per_broker``). Rows locked but
# not claimed are released at commit and stay due. Events of brokers without a usable endpoint become ``skipped``
# and are returned with NULL attempts. "Due" is bounded by ``statement_timestamp()``, not ``clock_timestamp()``: a
# volatile bound cannot end the index scan, so every claim that finds nothing would walk the whole pending index.
# ``#variable_conflict use_column``: the result columns (id, attempts, …) are also PL/pgSQL variables; every name
# in the statement means a column.
WEBHOOK_CLAIM = """
CREATE FUNCTION webhook_claim(
    p_room_brokers uuid[], p_room_left integer[], p_full_brokers uuid[], p_limit integer, p_per_broker integer,
    p_lease_s float8
) RETURNS TABLE (
    id uuid, attempts integer, broker_id uuid, body text, webhook_url text, webhook_secret text,
    previous_secret text
)
LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan
AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY
        WITH async_commit AS (SELECT set_config('synchronous_commit', 'off', true) AS v),
        room AS (
            SELECT * FROM unnest(p_room_brokers, p_room_left)
                AS r(broker_id, room_left)
        ),
        due AS (
            SELECT e.id, e.broker_id, e.next_attempt_at
            FROM webhook_events AS e
            WHERE e.status = 'pending' AND e.next_attempt_at <= statement_timestamp()
              AND e.broker_id <> ALL (p_full_brokers)
            ORDER BY e.next_attempt_at
            LIMIT p_limit
            FOR UPDATE OF e SKIP LOCKED
        ),
        ranked AS (
            SELECT d.id, d.next_attempt_at, b.webhook_url IS NOT NULL AND b.webhook_enabled AS deliverable,
                   CASE WHEN b.webhook_url IS NULL THEN 'broker has no webhook URL'
                        ELSE 'endpoint disabled: ' || COALESCE(b.webhook_disabled_reason, 'by the broker') END AS why_not,
                   row_number() OVER (PARTITION BY d.broker_id ORDER BY d.next_attempt_at) AS nth,
                   COALESCE(r.room_left, p_per_broker) AS room_left,
                   b.webhook_url, b.webhook_secret,
                   CASE WHEN b.webhook_secret_previous_expires_at > clock_timestamp()
                        THEN b.webhook_secret_previous END AS previous_secret
            FROM due AS d JOIN brokers AS b ON b.id = d.broker_id LEFT JOIN room AS r ON r.broker_id = d.broker_id
        ),
        skipped AS (
            UPDATE webhook_events AS e SET status = 'skipped', last_error = r.why_not
            FROM ranked AS r
            WHERE e.id = r.id AND NOT r.deliverable
            RETURNING e.id
        ),
        claimed AS (
            UPDATE webhook_events AS e
            SET attempts = e.attempts + 1, next_attempt_at = clock_timestamp() + make_interval(secs => p_lease_s)
            FROM ranked AS r, async_commit
            WHERE e.id = r.id AND r.deliverable AND r.nth <= r.room_left
            RETURNING e.id, e.attempts, e.broker_id, e.payload::text AS body
        )
        SELECT c.id, c.attempts, c.broker_id, c.body, r.webhook_url, r.webhook_secret, r.previous_secret
        FROM claimed AS c JOIN ranked AS r ON r.id = c.id
        UNION ALL
        SELECT s.id, NULL, NULL, NULL, NULL, NULL, NULL FROM skipped AS s;
END
$fn$
"""

# ``o`` is the batch, in completion order (``ord``). The broker's count of consecutive failed events restarts
# after its last delivery in the batch and only counts events this statement actually failed (fenced); a 410
# disables the endpoint at once. Brokers are only written when something changes (the happy path writes none:
# the matcher updates broker rows too, and an idle write would contend with it). The rows that change are locked
# first, in id order (``locked``), exactly as the matcher locks broker rows (exchange.matching.store,
# _UPDATE_BROKERS): two statements locking rows of the same brokers in the same order cannot deadlock. The UPDATE
# then only writes rows this statement holds. A row another transaction changed after this statement's snapshot
# is re-read at its newest version by the lock and by the UPDATE (READ COMMITTED re-check), so the condition is
# judged on what is written over.
_FAILURES = "(CASE WHEN t.reset THEN 0 ELSE b.webhook_consecutive_failures END + t.failed_after)"
"""The broker's consecutive failed events after this batch (``t``: its tally, ``b``: its row)."""
_CHANGES = f"({_FAILURES} <> b.webhook_consecutive_failures OR (t.gone AND b.webhook_enabled))"
"""The batch changes the broker's row."""

WEBHOOK_RECORD = f"""
CREATE FUNCTION webhook_record(p_batch jsonb, p_disable_after integer) RETURNS void
LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan
AS $fn$
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
            WHERE o.kind = 'delivered' AND e.id = o.id AND e.status = 'pending'
        ),
        retried AS (
            UPDATE webhook_events AS e
            SET next_attempt_at = clock_timestamp() + make_interval(secs => o.delay), last_error = o.error
            FROM o
            WHERE o.kind = 'retry' AND e.id = o.id AND e.status = 'pending' AND e.attempts = o.attempt
        ),
        failed AS (
            UPDATE webhook_events AS e SET status = 'failed', last_error = o.error
            FROM o
            WHERE o.kind IN ('gone', 'exhausted') AND e.id = o.id AND e.status = 'pending' AND e.attempts = o.attempt
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
            WHERE {_CHANGES}
            ORDER BY b.id
            FOR NO KEY UPDATE OF b
        )
        UPDATE brokers AS b
        SET webhook_consecutive_failures = {_FAILURES},
            webhook_enabled = b.webhook_enabled AND NOT t.gone AND {_FAILURES} < p_disable_after,
            webhook_disabled_reason = CASE WHEN b.webhook_enabled AND (t.gone OR {_FAILURES} >= p_disable_after) THEN t.reason
                                           ELSE b.webhook_disabled_reason END
        FROM tally AS t
        WHERE b.id = t.broker_id AND b.id IN (SELECT id FROM locked) AND {_CHANGES};
END
$fn$
"""  # noqa: S608  # constant SQL fragments only


def upgrade() -> None:
    op.execute(WEBHOOK_CLAIM)
    op.execute(WEBHOOK_RECORD)


def downgrade() -> None:
    op.execute("DROP FUNCTION webhook_record(jsonb, integer)")
    op.execute("DROP FUNCTION webhook_claim(uuid[], integer[], uuid[], integer, integer, float8)")
