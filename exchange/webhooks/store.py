"""The delivery worker's SQL: claim a batch of due events, record a batch of outcomes, hand overdue events to
the sweeper. Each function is ONE statement (one short transaction), whatever the batch size.

Invariants the statements keep:

* **A claim is a lease with a fencing token.** Claiming moves ``next_attempt_at`` one lease into the future and
  bumps ``attempts``; the new ``attempts`` is the claim's token. Claims lock with ``FOR UPDATE SKIP LOCKED``, so
  concurrent workers take disjoint sets and an event is handed to one worker per lease.
* **Retry and failure updates are fenced twice.** ``attempts`` must still equal the claim's token: a worker whose
  lease expired, and whose event was claimed again meanwhile, cannot overwrite the newer attempt's state. And the
  event's ``generation`` must still be the one the claim returned: every redeliver (the one thing that resets an
  event's schedule: :func:`exchange.webhooks.queries.redeliver`) bumps it and leaves ``attempts`` as it is, so an
  attempt claimed before a redeliver and recorded after it can neither end the event ``failed`` nor push its
  "due now" back by a backoff: the redelivery the broker asked for is made (and counts as one more attempt of
  the schedule: after the schedule, its own failure ends the event ``failed`` again).
* **A delivery is not fenced**: a 2xx answer delivered the event whoever's lease or generation it was (the
  receiver has the byte-identical body; sending it again would only be a duplicate), also when a redeliver came
  while it was in flight.
* **An attempt fenced off is still logged** and still judges the broker's endpoint by its URL (a 410 disables it,
  a 2xx resets its failure count); only the events a record actually failed count as consecutive failed events.
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
from psycopg.pq import TransactionStatus
from psycopg.rows import namedtuple_row
from sqlalchemy import Engine

from exchange.db.engines import bounded_transaction, connect_failed, statement_failed
from exchange.webhooks.outcomes import Verdict


@dataclass(frozen=True, slots=True)
class Claim:
    """One claimed event: deliver ``body`` to ``url`` signed with ``secrets`` (current first)."""

    event_id: UUID
    attempt: int
    """The fencing token: this claim's ``attempts`` value."""
    generation: int
    """The event's ``generation`` when claimed: a redeliver since bumped it (see the module docstring)."""
    broker_id: UUID
    body: bytes
    url: str
    secrets: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Claimed:
    claims: list[Claim]
    skipped: list[UUID]
    """Events marked ``skipped`` instead (the broker has no URL or its endpoint is disabled)."""


# One call of ``webhook_claim`` (alembic revision 0004, where the statement and its comments live; 0017 returns each
# claimed event's generation too): locks the oldest
# due events (skipping rows other workers hold and brokers at this worker's per-broker cap), claims at most each
# broker's room of them, and marks events of brokers without a usable endpoint ``skipped`` (returned with NULL
# attempts). A PL/pgSQL function, so the server plans the statement once per server connection instead of on every
# call (pgbouncer 1.18 passes no prepared statements).
_CLAIM = """
    SELECT * FROM webhook_claim(
        CAST(%(room_brokers)s AS uuid[]), CAST(%(room_left)s AS integer[]), CAST(%(full_brokers)s AS uuid[]),
        %(limit)s, %(per_broker)s, %(lease)s
    )
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
        # The secrets rotated out that still sign, space-separated (exchange.webhooks.queries.rotate_secret).
        secrets = (row.webhook_secret, *(row.previous_secret or "").split())
        claims.append(
            Claim(
                row.id,
                row.attempts,
                row.generation,
                row.broker_id,
                row.body.encode("utf-8"),
                row.webhook_url,
                secrets,
            )
        )
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


# One call of ``webhook_record`` (alembic revision 0004, where the statement's comments live; 0017 holds the current
# text): logs every attempt, marks events delivered / due again (fenced) / failed (fenced: by attempts and
# generation), and updates a broker's consecutive failures and endpoint state only when the batch changes them,
# locking those broker rows in id order as the matcher does (no deadlock between the two).
_RECORD = "SELECT webhook_record(CAST(%(batch)s AS jsonb), %(limit)s)"


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
            "generation": a.claim.generation,
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
    """Run one statement in a transaction of its own on a pooled psycopg connection; returns its rows.

    The transaction is :func:`~exchange.db.engines.bounded_transaction`'s: a worker frozen after the statement and
    before its ``COMMIT`` keeps the rows it locked (claimed events; broker rows a record changes, which a matcher's
    write waits for while it holds its books) for 2 s at most. The same three round trips as psycopg's own
    ``BEGIN``, statement and ``COMMIT``: in autocommit, with no round trip for ``BEGIN``/``COMMIT``, the workers
    claimed more often for fewer events, and no gain in the orders' latency was found (``ops/MEASURED.md``)."""
    try:
        pooled = engine.raw_connection()
    except psycopg.Error as exc:  # the pool raises the driver's own error here, and no handle_error hook sees it
        connect_failed(exc)
        raise
    conn = cast(psycopg.Connection[Any], pooled.driver_connection)
    try:
        with bounded_transaction(conn, row_factory=namedtuple_row) as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else []
    except psycopg.Error as exc:
        # Unusable (a session the server or pgbouncer ended, or answering what it cannot: no SQLSTATE), broken, or
        # left inside a transaction (and in autocommit mode): such a connection must not go back to the pool.
        lost = statement_failed(exc) or conn.broken  # (counted whatever conn.broken says: the rule runs first)
        if lost or conn.info.transaction_status != TransactionStatus.IDLE:
            pooled.invalidate()
        raise
    finally:
        pooled.close()


# --------------------------------------------------------------------------------------------------- sweeper

_REQUEUE_DUE = """
    UPDATE webhook_events SET next_attempt_at = clock_timestamp()
    WHERE id IN (SELECT id FROM webhook_events
                 WHERE status = 'pending'
                   AND next_attempt_at <= statement_timestamp() - make_interval(secs => %(older)s)  -- an index bound
                 ORDER BY next_attempt_at
                 LIMIT %(limit)s
                 FOR UPDATE SKIP LOCKED)
    RETURNING id
    """


def take_overdue(engine: Engine, *, older_than_s: float, limit: int = 1000) -> list[UUID]:
    """Events due for more than ``older_than_s`` (lost hint, crashed worker, retry left to the sweeper).

    Their ``next_attempt_at`` is reset to now, so the same event is handed out again only after another
    ``older_than_s``: a dead delivery worker costs one hint per period, not one per sweep.
    """
    # One statement in autocommit: its own transaction, one round trip, no lock held between round trips.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        return [row.id for row in conn.exec_driver_sql(_REQUEUE_DUE, {"older": older_than_s, "limit": limit})]
