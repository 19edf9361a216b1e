"""The delivery worker's SQL: claim a batch of due events, record a batch of outcomes, hand overdue events to
the sweeper. Each function is ONE statement (one round trip, one short transaction), whatever the batch size.

Invariants the statements keep:

* **A claim is a lease with a fencing token.** Claiming moves ``next_attempt_at`` one lease into the future and
  bumps ``attempts``; the new ``attempts`` is the claim's token. Claims lock with ``FOR UPDATE SKIP LOCKED``, so
  concurrent workers take disjoint sets and an event is handed to one worker per lease.
* **Retry and failure updates are fenced** (``attempts`` must still equal the token): a worker whose lease
  expired, and whose event was claimed again meanwhile, cannot overwrite the newer attempt's state. ``delivered``
  is not fenced: a 2xx answer is a delivery whoever's lease it was.
* Claim and record commit with ``synchronous_commit = off`` (transaction-local, safe through pgbouncer): a
  database crash can only lose their last few hundred milliseconds, which makes an event be sent again
  (at-least-once) or an attempt row go missing — never an event lost.

Claim and record run on the pooled engine's psycopg connection directly, and a recorded batch travels as ONE
JSON parameter: measured for a batch of 8, that costs the worker 0.18 ms of CPU per statement against 0.42 ms
through SQLAlchemy's statement layer with one array parameter per column; at thousands of deliveries per second
it is a sizeable share of the worker.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast
from uuid import UUID

import msgspec
import psycopg
from psycopg.rows import namedtuple_row
from sqlalchemy import Engine, text

from exchange.webhooks.outcomes import Verdict


@dataclass(frozen=True, slots=True)
class Claim:
    """One claimed event: deliver ``body`` to ``url`` signed with ``secrets`` (current first)."""

    event_id: UUID
    attempt: int
    """The fencing token: this claim's ``attempts`` value."""
    broker_id: UUID
    body: bytes
    url: str
    secrets: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Claimed:
    claims: list[Claim]
    skipped: list[UUID]
    """Events marked ``skipped`` instead (the broker has no URL or its endpoint is disabled)."""


# ``due`` locks the oldest due events, skipping rows other workers hold and brokers this worker already has at its
# per-broker cap; ``picked`` keeps at most ``room`` of them per broker. Rows locked but not picked are released at
# commit and stay due. "Due" is bounded by ``statement_timestamp()``, not ``clock_timestamp()``: a volatile bound
# cannot end the index scan, so every claim that finds nothing would walk the whole pending index.
_CLAIM = """
    WITH async_commit AS (SELECT set_config('synchronous_commit', 'off', true) AS v),
    room AS (
        SELECT * FROM unnest(CAST(%(room_brokers)s AS uuid[]), CAST(%(room_left)s AS integer[]))
            AS r(broker_id, room_left)
    ),
    due AS (
        SELECT e.id, e.broker_id, e.next_attempt_at
        FROM webhook_events AS e
        WHERE e.status = 'pending' AND e.next_attempt_at <= statement_timestamp()
          AND e.broker_id <> ALL (CAST(%(full_brokers)s AS uuid[]))
        ORDER BY e.next_attempt_at
        LIMIT %(limit)s
        FOR UPDATE OF e SKIP LOCKED
    ),
    ranked AS (
        SELECT d.id, d.next_attempt_at, b.webhook_url IS NOT NULL AND b.webhook_enabled AS deliverable,
               CASE WHEN b.webhook_url IS NULL THEN 'broker has no webhook URL'
                    ELSE 'endpoint disabled: ' || COALESCE(b.webhook_disabled_reason, 'by the broker') END AS why_not,
               row_number() OVER (PARTITION BY d.broker_id ORDER BY d.next_attempt_at) AS nth,
               COALESCE(r.room_left, %(per_broker)s) AS room_left,
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
        SET attempts = e.attempts + 1, next_attempt_at = clock_timestamp() + make_interval(secs => %(lease)s)
        FROM ranked AS r, async_commit
        WHERE e.id = r.id AND r.deliverable AND r.nth <= r.room_left
        RETURNING e.id, e.attempts, e.broker_id, e.payload::text AS body
    )
    SELECT c.id, c.attempts, c.broker_id, c.body, r.webhook_url, r.webhook_secret, r.previous_secret
    FROM claimed AS c JOIN ranked AS r ON r.id = c.id
    UNION ALL
    SELECT s.id, NULL, NULL, NULL, NULL, NULL, NULL FROM skipped AS s
"""


def claim(
    engine: Engine,
    *,
    limit: int,
    lease_s: float,
    per_broker: int,
    busy: Mapping[UUID, int] | None = None,
) -> Claimed:
    """Claim up to ``limit`` due events, at most ``per_broker - busy[broker]`` of any one broker.

    ``busy`` counts this worker's deliveries in flight per broker; brokers at ``per_broker`` are not even
    scanned, so a hanging receiver with a long backlog does not take the batch from everyone else.
    """
    busy = busy or {}
    full = [broker for broker, n in busy.items() if n >= per_broker]
    partial = {broker: per_broker - n for broker, n in busy.items() if 0 < n < per_broker}
    params = {
        "limit": limit,
        "lease": lease_s,
        "per_broker": per_broker,
        "full_brokers": full,
        "room_brokers": list(partial),
        "room_left": list(partial.values()),
    }
    rows = _execute(engine, _CLAIM, params)
    claims: list[Claim] = []
    skipped: list[UUID] = []
    for row in rows:
        if row.attempts is None:
            skipped.append(row.id)
            continue
        secrets = (row.webhook_secret,) if row.previous_secret is None else (row.webhook_secret, row.previous_secret)
        claims.append(Claim(row.id, row.attempts, row.broker_id, row.body.encode("utf-8"), row.webhook_url, secrets))
    return Claimed(claims, skipped)


# ---------------------------------------------------------------------------------------------------- record


@dataclass(frozen=True, slots=True)
class Attempt:
    """One finished attempt of a claim, ready to record."""

    claim: Claim
    verdict: Verdict
    started: datetime
    latency_ms: int
    status_code: int | None
    error: str | None
    excerpt: str | None


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

_RECORD = f"""
    WITH async_commit AS (SELECT set_config('synchronous_commit', 'off', true) AS v),
    o AS (
        SELECT * FROM jsonb_to_recordset(CAST(%(batch)s AS jsonb)) AS o(
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
        webhook_enabled = b.webhook_enabled AND NOT t.gone AND {_FAILURES} < %(limit)s,
        webhook_disabled_reason = CASE WHEN b.webhook_enabled AND (t.gone OR {_FAILURES} >= %(limit)s) THEN t.reason
                                       ELSE b.webhook_disabled_reason END
    FROM tally AS t
    WHERE b.id = t.broker_id AND b.id IN (SELECT id FROM locked) AND {_CHANGES}
"""  # noqa: S608  # constant SQL fragments only


def record(engine: Engine, attempts: Sequence[Attempt], *, disable_after: int) -> None:
    """Record a batch of attempts (in completion order; each event at most once) in one statement.

    The receiver's answer and the error texts are stored with NUL replaced by U+FFFD: PostgreSQL text (and a
    jsonb string, which carries the batch) cannot hold NUL. This is the one place that rule is applied.
    """
    if not attempts:
        return
    batch = [
        {
            "ord": n,
            "id": a.claim.event_id,
            "broker_id": a.claim.broker_id,
            "attempt": a.claim.attempt,
            "kind": a.verdict.kind.value,
            "started": a.started,
            "url": a.claim.url,
            "status_code": a.status_code,
            "latency_ms": a.latency_ms,
            "error": _text(a.error),
            "excerpt": _text(a.excerpt),
            "delay": a.verdict.retry_in_s,
            "reason": _text(a.verdict.disable_reason),
        }
        for n, a in enumerate(attempts, 1)
    ]
    _execute(engine, _RECORD, {"batch": msgspec.json.encode(batch).decode(), "limit": disable_after})


def _text(value: str | None) -> str | None:
    """``value`` as PostgreSQL text can hold it (see :func:`record`)."""
    return None if value is None else value.replace("\x00", "\ufffd")


def _execute(engine: Engine, sql: str, params: Mapping[str, Any]) -> list[Any]:
    """Run one statement in a transaction of its own on a pooled psycopg connection; returns its rows."""
    pooled = engine.raw_connection()
    try:
        conn = cast(psycopg.Connection[Any], pooled.driver_connection)
        with conn.cursor(row_factory=namedtuple_row) as cursor:
            cursor.execute(sql, params)
            rows = cursor.fetchall() if cursor.description else []
        conn.commit()
        return rows
    except psycopg.OperationalError:
        pooled.invalidate()  # a broken connection must not go back to the pool
        raise
    finally:
        pooled.close()


# --------------------------------------------------------------------------------------------------- sweeper

_REQUEUE_DUE = text(
    """
    UPDATE webhook_events SET next_attempt_at = clock_timestamp()
    WHERE id IN (SELECT id FROM webhook_events
                 WHERE status = 'pending'
                   AND next_attempt_at <= statement_timestamp() - make_interval(secs => :older)  -- an index bound
                 ORDER BY next_attempt_at
                 LIMIT :limit
                 FOR UPDATE SKIP LOCKED)
    RETURNING id
    """
)


def take_overdue(engine: Engine, *, older_than_s: float, limit: int = 1000) -> list[UUID]:
    """Events due for more than ``older_than_s`` (lost hint, crashed worker, retry left to the sweeper).

    Their ``next_attempt_at`` is reset to now, so the same event is handed out again only after another
    ``older_than_s``: a dead delivery worker costs one hint per period, not one per sweep.
    """
    with engine.begin() as conn:
        return [row.id for row in conn.execute(_REQUEUE_DUE, {"older": older_than_s, "limit": limit})]
