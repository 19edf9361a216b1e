"""A claim reads only the due events it may take, broker by broker; broker-scoped reads use partial indexes.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-07

Hand-written and frozen (see 0001).

``webhook_claim`` read the oldest due events through the pending-events index (``next_attempt_at`` only) and
dropped those of brokers at this worker's per-broker cap (``p_full_brokers``) after reading each from the index and
the heap: one hanging receiver with 100,000 due events made every claim of every worker read them all (28-31 ms
against ~2 ms, linear in its backlog), and the worker claims again each time one delivery ends. Now the claim
finds the brokers that have pending events by a skip scan of a new index, ``(broker_id, next_attempt_at) WHERE
status = 'pending'`` (one descent per broker, whatever its backlog: its oldest pending event tells whether it has a
due one), leaves out the full ones, and reads from each of the others, through the same index, only the due events
it could take. The rest of the statement (ranking per broker, room, skipped events, the lease, the generation) is
0017's. The claim takes the oldest due events first overall, as before, among each broker's first ``room`` ones
(before, a broker with more due events than room filled the window with events it then left, and the claim came
back short): the brokers are ranked by their oldest due event, and the ``rank``-th can only have its first
``p_limit - rank + 1`` events among the ``p_limit`` oldest (each broker before it has an older one), so that is
all that is read from it. Rows are locked only in the last step, at most ``p_limit`` of them, skipping rows
other workers hold as before. Like 0005-0007's functions the claim now runs with ``enable_seqscan = off``: its plans
are kept per server connection, and those made on an empty outbox (a worker's first claim on a fresh database, as
the bench's) scanned every table they read, every event for each broker, once thousands were pending.

The same pending index counts a broker's pending events for ``GET /webhooks/endpoint``; two partial indexes on
``broker_id`` hold only the failed events and the events being retried (pending with an error), for that endpoint
and ``/admin/webhooks/failing``, which read every event of a broker, or (the latter) all of them in a parallel
sequential scan. A delivery at its first attempt, the hot path, writes no entry into either.

``GET /orders?status=open|pending`` read a broker's whole history through ``ix_orders_broker_created`` and dropped
the closed orders: a partial index of the orders not closed (``close_reason IS NULL``, as 0009's indexes, so the
matcher's pending → open update stays HOT) in the listing's exact order, ``(broker_id, created_at DESC, id DESC)``.

Downgrading restores 0017's claim exactly (0018 left it as it was) and drops the indexes.
"""

from collections.abc import Sequence

from alembic import context, op

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (name, definition) of the indexes this revision adds; exchange.db.tables declares the same.
INDEXES = [
    (
        "ix_webhook_events_pending_broker_next_attempt_at",
        "ON webhook_events (broker_id, next_attempt_at) WHERE status = 'pending'",
    ),
    ("ix_webhook_events_failed_broker", "ON webhook_events (broker_id) WHERE status = 'failed'"),
    (
        "ix_webhook_events_retrying_broker",
        "ON webhook_events (broker_id) WHERE status = 'pending' AND last_error IS NOT NULL",
    ),
    ("ix_orders_broker_live_created", "ON orders (broker_id, created_at DESC, id DESC) WHERE close_reason IS NULL"),
]

# 0004's ``due``, as 0017 left it.
_DUE_0017 = """        due AS (
            SELECT e.id, e.broker_id, e.next_attempt_at
            FROM webhook_events AS e
            WHERE e.status = 'pending' AND e.next_attempt_at <= statement_timestamp()
              AND e.broker_id <> ALL (p_full_brokers)
            ORDER BY e.next_attempt_at
            LIMIT p_limit
            FOR UPDATE OF e SKIP LOCKED
        ),
"""

# ``pending_brokers``: every broker with a pending event and its oldest one's next_attempt_at, by a skip scan of
# the (broker_id, next_attempt_at) index (one descent per broker, not one read per event). ``eligible``: those with
# a due event and room, oldest due first, ranked; no more than p_limit of them can have an event among the p_limit
# oldest. ``candidates``: each one's due events it could take, oldest first, read without a lock: at most its room
# (a broker without a usable endpoint has none: its events are skipped, not sent; its row is read by primary key,
# as a subquery: never a join that could hash every broker) and at most p_limit - rank + 1, since each of the
# rank - 1 brokers before it has an older due event. The broker's events are named as a range of the
# (broker_id, next_attempt_at) index's rows, which no other index can serve: written as ``broker_id = …`` and a
# due time, a plan made from some ANALYZE samples walked the due-time index and filtered by broker, reading a
# hanging broker's whole backlog once per other broker (600-840 ms in 2 of 7 runs at 100,000 events).
# ``due`` locks the oldest of them, one by one
# by primary key in that order until it has p_limit (an ORDER BY … LIMIT over the table itself was planned as a
# walk of the pending-events index by due time, through every due event of a broker at its cap), skipping rows
# other workers hold. The lock names the primary key alone, and its LIMIT 1 keeps the planner from pushing the
# other conditions into it: with them, a plan made while the table was small (kept by the server connection) read
# each one through a pending-events index, every pending event per lock. The locked row is the newest version, so
# the condition after it sees whether it is still due (another worker's claim that committed meanwhile moved it
# into the future); a row locked and not due is released at commit.
_DUE = """        pending_brokers AS (
            (SELECT e.broker_id, e.next_attempt_at FROM webhook_events AS e
             WHERE e.status = 'pending'
             ORDER BY e.broker_id, e.next_attempt_at LIMIT 1)
            UNION ALL
            SELECT n.broker_id, n.next_attempt_at
            FROM pending_brokers AS p CROSS JOIN LATERAL (
                SELECT e.broker_id, e.next_attempt_at FROM webhook_events AS e
                WHERE e.status = 'pending' AND e.broker_id > p.broker_id
                ORDER BY e.broker_id, e.next_attempt_at LIMIT 1
            ) AS n
        ),
        eligible AS (
            SELECT p.broker_id, row_number() OVER (ORDER BY p.next_attempt_at, p.broker_id) AS rank
            FROM pending_brokers AS p
            WHERE p.next_attempt_at <= statement_timestamp() AND p.broker_id <> ALL (p_full_brokers)
            ORDER BY p.next_attempt_at, p.broker_id
            LIMIT p_limit
        ),
        candidates AS MATERIALIZED (
            SELECT c.id, c.next_attempt_at
            FROM eligible AS g LEFT JOIN room AS r ON r.broker_id = g.broker_id
            CROSS JOIN LATERAL (
                SELECT e.id, e.next_attempt_at FROM webhook_events AS e
                WHERE e.status = 'pending'
                  AND (e.broker_id, e.next_attempt_at) >= (g.broker_id, '-infinity'::timestamptz)
                  AND (e.broker_id, e.next_attempt_at) <= (g.broker_id, statement_timestamp())
                ORDER BY e.broker_id, e.next_attempt_at
                LIMIT CASE WHEN (SELECT b.webhook_url IS NOT NULL AND b.webhook_enabled
                                 FROM brokers AS b WHERE b.id = g.broker_id)
                           THEN least(COALESCE(r.room_left, p_per_broker), p_limit - g.rank + 1)
                           ELSE p_limit - g.rank + 1 END
            ) AS c
        ),
        due AS (
            SELECT l.id, l.broker_id, l.next_attempt_at
            FROM (SELECT * FROM candidates ORDER BY next_attempt_at) AS c
            CROSS JOIN LATERAL (
                SELECT e.id, e.broker_id, e.next_attempt_at, e.status
                FROM webhook_events AS e
                WHERE e.id = c.id
                LIMIT 1
                FOR UPDATE OF e SKIP LOCKED
            ) AS l
            WHERE l.status = 'pending' AND l.next_attempt_at <= statement_timestamp()
            ORDER BY c.next_attempt_at
            LIMIT p_limit
        ),
"""

# The events the updates write are the ones ``due`` locked, named as an array: the updates then reach them by
# primary key whatever the statistics the kept plan was made with (joined to the CTE alone, a plan made on an empty
# analysed outbox walked every event of the table to find the few claimed).
_LOCKED = "e.id = ANY (ARRAY(SELECT d.id FROM due AS d))"

# (0017's text, this revision's).
CLAIM_CHANGES = [
    ("CREATE FUNCTION webhook_claim(", "CREATE OR REPLACE FUNCTION webhook_claim("),
    (
        "LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan\n",
        "LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan SET enable_seqscan = off\n",
    ),
    ("RETURN QUERY\n        WITH async_commit AS", "RETURN QUERY\n        WITH RECURSIVE async_commit AS"),
    (_DUE_0017, _DUE),
    (
        "WHERE e.id = r.id AND NOT r.deliverable\n",
        f"WHERE e.id = r.id AND NOT r.deliverable\n              AND {_LOCKED}\n",
    ),
    (
        "WHERE e.id = r.id AND r.deliverable AND r.nth <= r.room_left\n",
        f"WHERE e.id = r.id AND r.deliverable AND r.nth <= r.room_left\n              AND {_LOCKED}\n",
    ),
]


def _changed(function: str, changes: list[tuple[str, str]], name: str) -> str:
    for old, new in changes:
        if function.count(old) != 1:  # a silent no-op replace would leave the previous rule in place
            raise RuntimeError(f"{revision} expected exactly one {old!r} in {name}")
        function = function.replace(old, new)
    return function


def _webhook_claim_0017() -> str:
    """0017's ``webhook_claim`` as ``CREATE OR REPLACE``: 0004's text with 0017's changes, as 0017 builds it."""
    function = str(context.script.get_revision("0004").module.WEBHOOK_CLAIM)
    function = _changed(function, list(context.script.get_revision("0017").module.CLAIM_CHANGES), "0004's claim")
    return _changed(function, CLAIM_CHANGES[:1], "0017's webhook_claim")


_QUERY_START = "    RETURN QUERY\n"
_QUERY_END = "FROM skipped AS s;\n"


def _two_paths(function: str) -> str:
    """``function`` with its one query run only while a broker is at its cap, and 0017's reading of the due events
    (the oldest of the pending-events index, ``LIMIT p_limit``) otherwise: without a broker at its cap, that
    reading already reads only what it may take, and visits no broker with nothing due, which the per-broker
    reading does (a skip-scan descent for every broker with an event pending, in flight ones included: about 78 us
    of PostgreSQL's CPU per delivery in ``ops.bench_webhooks``). A broker with more due events than room fills the
    window then, but only until it is at its cap: the next claim takes the per-broker path."""
    start, end = function.index(_QUERY_START), function.index(_QUERY_END) + len(_QUERY_END)
    per_broker = function[start:end]
    oldest_due = per_broker.replace(_DUE, _DUE_0017).replace("WITH RECURSIVE async_commit", "WITH async_commit")
    if oldest_due.count("ORDER BY e.next_attempt_at\n            LIMIT p_limit\n") != 1:
        raise RuntimeError(f"{revision} expected 0017's due events in the oldest-due path")
    both = "    IF cardinality(p_full_brokers) = 0 THEN\n" + oldest_due + "    ELSE\n" + per_broker + "    END IF;\n"
    return function[:start] + both + function[end:]


def upgrade() -> None:
    for name, definition in INDEXES:
        op.execute(f"CREATE INDEX {name} {definition}")
    op.execute(_two_paths(_changed(_webhook_claim_0017(), CLAIM_CHANGES[1:], "0017's webhook_claim")))


def downgrade() -> None:
    op.execute(_webhook_claim_0017())
    for name, _ in reversed(INDEXES):
        op.execute(f"DROP INDEX {name}")
