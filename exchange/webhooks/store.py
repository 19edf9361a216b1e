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
  The record returns the events of the failed attempts it fenced off, so that the worker reports those attempts
  ``superseded``, not ``failed`` or ``retry`` (their events were neither failed nor scheduled by them).
* **Every attempt can be recorded, whatever it carries** (:func:`record` makes each value one its column holds;
  :func:`with_texts_replaced` is the last resort for a text the database's encoding lacks): an attempt left
  unrecorded leaves its event pending, sent again every lease, forever, never failed nor counted for its broker.
* Claim and record commit with ``synchronous_commit = off`` (transaction-local, safe through pgbouncer): a
  database crash can only lose their last few hundred milliseconds, which makes an event be sent again
  (at-least-once) or an attempt row go missing — never an event lost.

Claim and record run on the pooled engine's psycopg connection directly, and a recorded batch travels as ONE
JSON parameter: measured for a batch of 8, that costs the worker 0.18 ms of CPU per statement against 0.42 ms
through SQLAlchemy's statement layer with one array parameter per column; at thousands of deliveries per second
it is a sizeable share of the worker.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, cast
from uuid import UUID

import msgspec
import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import namedtuple_row
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from exchange.db.engines import bounded_transaction, connect_failed, statement_failed
from exchange.db.errors import is_deterministic
from exchange.webhooks.outcomes import Kind, Outcome, Verdict


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
# claimed event's generation too; 0019 reads each broker's due events apart): locks the oldest due events among
# each broker's first ``room`` (skipping rows other workers hold and brokers at this worker's per-broker cap, whose
# events are not read at all), claims them, and marks events of brokers without a usable endpoint ``skipped``
# (returned with NULL attempts). A PL/pgSQL function, so the server plans the statement once per server connection
# instead of on every call (pgbouncer 1.18 passes no prepared statements).
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


# One call of ``webhook_record`` (alembic revision 0004, where the statement's comments live; 0017 added the
# generation fence, 0020 the result): logs every attempt, marks events delivered / due again (fenced) / failed
# (fenced: by attempts and generation), updates a broker's consecutive failures and endpoint state only when the
# batch changes them, locking those broker rows in id order as the matcher does (no deadlock between the two), and
# returns the events of the failed attempts its fence set aside.
_RECORD = "SELECT superseded FROM webhook_record(CAST(%(batch)s AS jsonb), %(limit)s) AS superseded"


def record(engine: Engine, attempts: Sequence[Attempt], *, disable_after: int) -> list[Outcome]:
    """Record a batch of attempts (in completion order; each event at most once) in one statement; returns each
    attempt's outcome as recorded, in the batch's order: its verdict's (:attr:`Verdict.outcome`), except
    :attr:`Outcome.SUPERSEDED` for a failed attempt that the fence kept from its event (a redeliver since its claim,
    a newer claim of the event, or an attempt that already ended it: the module docstring). Only the record knows
    that: a worker reports what this returns, never the verdict alone.

    Every value is first made one its column holds (:func:`_row`, the one place where that is done), so that no
    receiver's answer and no error text can make the database refuse a record. What remains refusable depends on
    the database, not on the data's form: a character its encoding lacks (a LATIN1 database). :func:`is_refused`
    tells such a failure from a passing one, and :func:`with_texts_replaced` is the attempt as any database holds
    it.
    """
    if not attempts:
        return []
    batch = [_row(n, a) for n, a in enumerate(attempts, 1)]
    rows = _execute(engine, _RECORD, {"batch": msgspec.json.encode(batch).decode(), "limit": disable_after})
    superseded = {row.superseded for row in rows}
    return [Outcome.SUPERSEDED if a.claim.event_id in superseded else a.verdict.outcome for a in attempts]


STATUS_CODES = range(100, 600)
"""The statuses the attempts' table holds (its check constraint)."""
_INTEGER_MAX = 2**31 - 1
"""The largest value of an ``integer`` column (``latency_ms``)."""
MAX_RETRY_DELAY_S = 30 * 86_400.0
"""The longest delay a retry is recorded with: far beyond any the settings allow (7 days, +20 % jitter), far
within what keeps ``clock_timestamp() + delay`` a timestamp."""
_SURROGATES = re.compile("[\ud800-\udfff]")


def _row(n: int, attempt: Attempt) -> dict[str, Any]:
    """Attempt number ``n`` of a batch as ``webhook_record`` reads it, each value in its column's range:

    * texts (error, answer excerpt, disable reason) with NUL and lone surrogates replaced by U+FFFD;
    * a status outside 100-599 as no status, its number kept in the error text (a failed attempt has one);
    * the latency clamped to 0 .. 2^31 - 1 ms;
    * a retry's delay clamped to 0 .. :data:`MAX_RETRY_DELAY_S` (none or NaN: due at once), so that the event's
      next attempt is a timestamp (JSON has no infinity or NaN: either would become NULL).

    The URL is stored as the claim read it from this database, which held it: the broker's tally compares it with
    the broker's ``webhook_url``.
    """
    verdict = attempt.verdict
    status, error = attempt.status_code, attempt.error
    if status is not None and status not in STATUS_CODES:
        status, error = None, error or f"HTTP {status}"
    return {
        "ord": n,
        "id": attempt.claim.event_id,
        "broker_id": attempt.claim.broker_id,
        "attempt": attempt.claim.attempt,
        "generation": attempt.claim.generation,
        "kind": verdict.kind.value,
        "started": attempt.started,
        "url": attempt.claim.url,
        "status_code": status,
        "latency_ms": min(max(attempt.latency_ms, 0), _INTEGER_MAX),
        "error": _text(error),
        "excerpt": _text(attempt.excerpt),
        "delay": _retry_delay(verdict),
        "reason": _text(verdict.disable_reason),
    }


def _text(value: str | None) -> str | None:
    """``value`` as PostgreSQL text can hold it: NUL (which no text, nor a jsonb string, holds) and lone surrogates
    (not characters: UTF-8, hence the batch's JSON, cannot encode them) replaced by U+FFFD."""
    if value is None:
        return None
    value = value.replace("\x00", "\ufffd")
    # isascii() reads a flag of the string: most texts (HTTP errors, JSON answers) cost no scan for surrogates
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:  # only a surrogate fails
            value = _SURROGATES.sub("\ufffd", value)
    return value


def _retry_delay(verdict: Verdict) -> float | None:
    """Seconds until a retry's next attempt (see :func:`_row`); None for other kinds, which do not read it."""
    if verdict.kind is not Kind.RETRY:
        return None
    delay = verdict.retry_in_s
    if delay is None or math.isnan(delay):
        return 0.0
    return min(max(delay, 0.0), MAX_RETRY_DELAY_S)


def is_refused(exc: BaseException) -> bool:
    """``exc``, raised by :func:`record`, says that the batch's data cannot be stored as it is, however often it is
    tried: the database refused it (SQLSTATE class 22 or 23), or psycopg could not encode it in the connection's
    client encoding (``UnicodeEncodeError``: no SQLSTATE, nothing was sent; e.g. a character LATIN1 lacks)."""
    if isinstance(exc, psycopg.Error | DBAPIError):
        return is_deterministic(exc)
    return isinstance(exc, UnicodeEncodeError)


REFUSED_TEXT = "[replaced: the database refused to store this text]"
"""Stored instead of a text of an attempt the database refused (:func:`with_texts_replaced`)."""


def with_texts_replaced(attempt: Attempt) -> Attempt:
    """``attempt`` with each free text that is not plain ASCII (its error, answer excerpt, disable reason) replaced
    by :data:`REFUSED_TEXT`: the last resort for an attempt refused even once made storable by :func:`record`.

    Once the record has made it storable, only a character the database's encoding lacks can be refused in a text
    (the columns have no other constraint), and every PostgreSQL server encoding holds ASCII. So this attempt is
    refused only if the rest is: its ids, its URL (read from this database), its numbers (kept in range) — e.g. an
    event deleted since its claim. Absent texts stay absent (an attempt without an error is a success to the log's
    readers), and so do the attempt's verdict, status and latency: its event is scheduled, failed or delivered,
    and counted for its broker, like any other.
    """
    verdict = attempt.verdict
    return replace(
        attempt,
        verdict=replace(verdict, disable_reason=_ascii_or_marker(verdict.disable_reason)),
        error=_ascii_or_marker(attempt.error),
        excerpt=_ascii_or_marker(attempt.excerpt),
    )


def _ascii_or_marker(value: str | None) -> str | None:
    # NUL is ASCII, but no text holds it: what _text would have replaced counts as not ASCII.
    return value if value is None or (value.isascii() and "\x00" not in value) else REFUSED_TEXT


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

# Reads, never writes: the sweeper only hints, and the claim's order (oldest due first) stays the order in which
# events came due. Whether a hint is due is the newest overdue event's due time (max(): one entry of the due-time
# index, read backwards from the overdue bound, whatever the statistics say; an EXISTS over the two bounds was
# planned as a sequential scan that stops at its first match, which reads the whole table when none matches).
# The ids are read only when a hint is due: the first ``limit`` entries of the same index.
_OVERDUE = """
    SELECT e.id, statement_timestamp() AS at
    FROM webhook_events AS e
    WHERE e.status = 'pending' AND e.next_attempt_at <= statement_timestamp() - make_interval(secs => %(older)s)
      AND (SELECT max(n.next_attempt_at) FROM webhook_events AS n
           WHERE n.status = 'pending' AND n.next_attempt_at <= statement_timestamp() - make_interval(secs => %(older)s))
          > CASE WHEN CAST(%(hinted_at)s AS timestamptz) > statement_timestamp() - make_interval(secs => %(older)s)
                 THEN CAST(%(hinted_at)s AS timestamptz) - make_interval(secs => %(older)s)
                 ELSE '-infinity' END
    ORDER BY e.next_attempt_at
    LIMIT %(limit)s
    """


@dataclass(frozen=True, slots=True)
class Overdue:
    ids: list[UUID]
    """The events due for more than the period, oldest due first (at most the limit); none if no hint is due."""
    at: datetime | None
    """The database's time of the reading (pass it as the next reading's ``hinted_at`` once the hint is sent)."""


def overdue(engine: Engine, *, older_than_s: float, hinted_at: datetime | None = None, limit: int = 1000) -> Overdue:
    """The events the sweeper is to hint the workers about now: pending (not in flight) and due for more than
    ``older_than_s`` (a lost hint, a worker that died with them claimed, a retry timed by no worker), if one of them
    became so since the last hint (``hinted_at``: that reading's :attr:`Overdue.at`) or that hint is ``older_than_s``
    old; else none.

    So each event that a hint missed is hinted about once, ``older_than_s`` after it came due, and a backlog that
    stays (every worker dead, or all behind) costs one hint per ``older_than_s``, not one per sweep. Nothing is
    written: the events keep their due times, and the claim takes them oldest due first, in the order they came due
    (it reset them to "now" once: a backlog older than ``older_than_s`` then went behind the newer events, sweep after
    sweep, and a broker behind got its events in shuffled order, the oldest last).
    """
    # One statement in autocommit: its own transaction, one round trip, no lock held.
    params = {"older": older_than_s, "hinted_at": hinted_at, "limit": limit}
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        rows = conn.exec_driver_sql(_OVERDUE, params).all()
    return Overdue([row.id for row in rows], rows[0].at if rows else None)
