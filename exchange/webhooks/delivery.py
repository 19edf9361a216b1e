"""The delivery service: one attempt to deliver one outbox event, and what follows from its answer.

:meth:`Deliverer.deliver` runs three short steps, each safe to be interrupted by a crash:

1. **Claim** (one UPDATE): a ``pending`` event that is due and whose broker has an enabled URL gets
   ``attempts + 1`` and ``next_attempt_at = now + lease``. The new ``attempts`` value is the claim's fencing
   token. Crash after this: the event is due again when the lease ends and the sweeper re-enqueues it.
2. **POST** (no transaction open): resolve and SSRF-check the host, POST the stored payload byte-identical
   (``payload::text`` is deterministic for a JSONB value) with fresh Standard Webhooks headers, read the first
   bytes of the answer. Crash here: as above (the receiver may get the event twice: at-least-once). A host that
   does not resolve or is refused by the SSRF guard, and a stored URL httpx refuses, are failed attempts too.
3. **Record** (one statement, whatever the outcome): insert the attempt row, then by outcome —
   2xx → ``delivered`` and the broker's consecutive-failure count back to 0;
   410 → event ``failed`` and the endpoint disabled at once (reason stored);
   anything else → ``next_attempt_at = now + retry_delay`` while the schedule lasts, else ``failed``, and the
   broker's consecutive failed events + 1 (the endpoint is disabled with a reason at ``disable_after``).
   Retry and failure updates only apply while the fencing token still matches, so a worker whose lease
   expired cannot overwrite a newer attempt's state.

Claim and record commit with ``synchronous_commit = off`` (transaction-local, so safe through pgbouncer): a
database crash can only lose the last few hundred milliseconds of them, which makes an event be sent again
(at-least-once) or an attempt row go missing — never an event lost. It halves the cost of a delivery.

Events of brokers without a URL, or whose endpoint is disabled, are marked ``skipped`` instead of claimed:
they stay in the broker's durable log (``GET /events``) and can be redelivered on request.

A slow receiver cannot take every worker thread: at most ``max_in_flight`` deliveries per broker run at once in a
process; an event over the cap is released (claim undone) and re-sent a little later.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from uuid import UUID

import httpx
from sqlalchemy import Engine, text

from exchange.config import Settings
from exchange.webhooks import schedule, signing, ssrf

log = logging.getLogger("exchange.webhooks")

EXCERPT_BYTES = 512
"""Bytes of the receiver's answer kept in the attempt log."""
MAX_READ_BYTES = 64 * 1024
"""Answers are read up to this size (so small answers leave the connection reusable), the rest is dropped."""
DEFER_S = 1.0
"""How long an event over the per-broker in-flight cap waits before it is tried again."""
MAX_BROKER_DELAY_S = 900.0
"""Retries due within this are re-sent as delayed dramatiq messages; later ones are left to the sweeper."""
USER_AGENT = "exchange-webhooks/1"

Reenqueue = Callable[[UUID, int], None]
"""``reenqueue(event_id, delay_ms)``: send ``deliver(event_id)`` again after ``delay_ms``."""


class Outcome(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    """Failed; another attempt is scheduled."""
    FAILED = "failed"
    """Failed for good (schedule exhausted, or 410 Gone)."""
    SKIPPED = "skipped"
    """Not sent: no URL or endpoint disabled."""
    NOT_DUE = "not_due"
    """Nothing to do now: already delivered, scheduled later, in flight elsewhere, or unknown."""
    DEFERRED = "deferred"
    """Over the per-broker in-flight cap: released and re-sent later."""


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    retry_schedule: tuple[float, ...]
    connect_timeout_s: float
    read_timeout_s: float
    lease_s: float
    disable_after: int
    allow_private: bool
    max_in_flight: int

    @classmethod
    def from_settings(cls, settings: Settings) -> DeliveryConfig:
        return cls(
            retry_schedule=settings.webhook_retry_schedule,
            connect_timeout_s=settings.webhook_connect_timeout_ms / 1000,
            read_timeout_s=settings.webhook_read_timeout_ms / 1000,
            lease_s=settings.webhook_lease_ms / 1000,
            disable_after=settings.webhook_disable_after,
            allow_private=settings.webhook_allow_private,
            max_in_flight=settings.webhook_max_in_flight,
        )


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    event_id: UUID
    outcome: Outcome
    attempt: int | None = None
    status_code: int | None = None
    error: str | None = None
    retry_in_s: float | None = None


@dataclass(frozen=True, slots=True)
class _Claim:
    attempt: int
    broker_id: UUID
    body: bytes
    url: str
    secrets: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Answer:
    started: datetime
    latency_ms: int
    status_code: int | None
    error: str | None
    excerpt: str | None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


_CLAIM = text(
    """
    UPDATE webhook_events AS e
    SET attempts = e.attempts + 1, next_attempt_at = clock_timestamp() + make_interval(secs => :lease)
    FROM brokers AS b, (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit
    WHERE e.id = :id AND e.status = 'pending' AND e.next_attempt_at <= clock_timestamp()
      AND b.id = e.broker_id AND b.webhook_url IS NOT NULL AND b.webhook_enabled
    RETURNING e.attempts, e.broker_id, e.payload::text AS body, b.webhook_url, b.webhook_secret,
              CASE WHEN b.webhook_secret_previous_expires_at > clock_timestamp()
                   THEN b.webhook_secret_previous END AS previous_secret
    """
)

_SKIP = text(
    """
    UPDATE webhook_events AS e
    SET status = 'skipped',
        last_error = CASE WHEN b.webhook_url IS NULL THEN 'broker has no webhook URL'
                          ELSE 'endpoint disabled: ' || COALESCE(b.webhook_disabled_reason, 'by the broker') END
    FROM brokers AS b
    WHERE e.id = :id AND e.status = 'pending' AND b.id = e.broker_id
      AND (b.webhook_url IS NULL OR NOT b.webhook_enabled)
    RETURNING e.id
    """
)

_RELEASE = text(
    """
    UPDATE webhook_events
    SET attempts = attempts - 1, next_attempt_at = clock_timestamp() + make_interval(secs => :defer)
    WHERE id = :id AND status = 'pending' AND attempts = :attempt
    """
)

# Every record statement inserts the attempt row and commits asynchronously; each outcome adds its updates as
# further CTEs, so recording any answer is one statement. Retry and failure updates are fenced by ``attempts``.
_ATTEMPT_CTES = """
    async_commit AS (SELECT set_config('synchronous_commit', 'off', true) AS v),
    attempt AS (
        INSERT INTO webhook_attempts (event_id, broker_id, attempted_at, url, status_code, latency_ms, error,
                                      response_excerpt)
        SELECT CAST(:id AS uuid), CAST(:broker_id AS uuid), CAST(:started AS timestamptz), CAST(:url AS text),
               CAST(:status_code AS integer), CAST(:latency_ms AS integer), CAST(:error AS text),
               CAST(:excerpt AS text)
        FROM async_commit
    )"""

_MARK_FAILED_CTE = """
    failed AS (
        UPDATE webhook_events SET status = 'failed', last_error = :error
        WHERE id = :id AND status = 'pending' AND attempts = :attempt
        RETURNING id
    )"""

_RECORD_DELIVERED = text(
    f"""
    WITH {_ATTEMPT_CTES},
    delivered AS (
        UPDATE webhook_events SET status = 'delivered', delivered_at = clock_timestamp(), last_error = NULL
        WHERE id = :id AND status = 'pending'
    )
    UPDATE brokers SET webhook_consecutive_failures = 0
    WHERE id = :broker_id AND webhook_consecutive_failures <> 0
    """  # noqa: S608  # constant SQL fragments only
)

_RECORD_GONE = text(
    f"""
    WITH {_ATTEMPT_CTES}, {_MARK_FAILED_CTE}
    UPDATE brokers SET webhook_enabled = false, webhook_disabled_reason = :reason
    WHERE id = :broker_id AND webhook_enabled
    """  # noqa: S608  # constant SQL fragments only
)

_RECORD_RETRY = text(
    f"""
    WITH {_ATTEMPT_CTES}
    UPDATE webhook_events
    SET next_attempt_at = clock_timestamp() + make_interval(secs => :delay), last_error = :error
    WHERE id = :id AND status = 'pending' AND attempts = :attempt
    """  # noqa: S608  # constant SQL fragments only
)

# The broker's count of consecutive failed events only moves when this attempt's fenced update failed the event.
_RECORD_FAILED = text(
    f"""
    WITH {_ATTEMPT_CTES}, {_MARK_FAILED_CTE}
    UPDATE brokers
    SET webhook_consecutive_failures = webhook_consecutive_failures + 1,
        webhook_enabled = webhook_enabled AND webhook_consecutive_failures + 1 < :limit,
        webhook_disabled_reason = CASE
            WHEN webhook_enabled AND webhook_consecutive_failures + 1 >= :limit THEN :reason
            ELSE webhook_disabled_reason END
    WHERE id = :broker_id AND EXISTS (SELECT FROM failed)
    """  # noqa: S608  # constant SQL fragments only
)


class _InFlight:
    """Per-broker count of deliveries running in this process."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._counts: dict[UUID, int] = {}

    def try_acquire(self, broker_id: UUID) -> bool:
        with self._lock:
            n = self._counts.get(broker_id, 0)
            if n >= self.limit:
                return False
            self._counts[broker_id] = n + 1
            return True

    def release(self, broker_id: UUID) -> None:
        with self._lock:
            n = self._counts.get(broker_id, 1) - 1
            if n <= 0:
                self._counts.pop(broker_id, None)
            else:
                self._counts[broker_id] = n


def make_client(config: DeliveryConfig, *, max_connections: int = 100) -> httpx.Client:
    """The shared HTTP client: keep-alive pool, explicit timeouts, no redirects, no proxies from the environment
    (a proxy would defeat the SSRF pinning)."""
    return httpx.Client(
        timeout=httpx.Timeout(
            connect=config.connect_timeout_s,
            read=config.read_timeout_s,
            write=config.read_timeout_s,
            pool=config.connect_timeout_s,
        ),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        follow_redirects=False,
        trust_env=False,
    )


class Deliverer:
    """Delivers events; thread-safe (one instance per worker process, shared by its threads)."""

    def __init__(
        self,
        engine: Engine,
        config: DeliveryConfig,
        *,
        client: httpx.Client | None = None,
        reenqueue: Reenqueue | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.client = client or make_client(config)
        self._owns_client = client is None
        self.reenqueue = reenqueue
        self.in_flight = _InFlight(config.max_in_flight)

    def close(self) -> None:
        if self._owns_client:
            self.client.close()

    # ------------------------------------------------------------------------------------------- steps

    def deliver(self, event_id: UUID) -> DeliveryResult:
        """Make at most one attempt to deliver ``event_id`` (see the module docstring)."""
        claim = self._claim(event_id)
        if claim is None:
            with self.engine.begin() as conn:
                skipped = conn.execute(_SKIP, {"id": event_id}).first() is not None
            return DeliveryResult(event_id, Outcome.SKIPPED if skipped else Outcome.NOT_DUE)
        if not self.in_flight.try_acquire(claim.broker_id):
            return self._defer(event_id, claim)
        try:
            answer = self._post(event_id, claim)
        finally:
            self.in_flight.release(claim.broker_id)
        return self._record(event_id, claim, answer)

    def _claim(self, event_id: UUID) -> _Claim | None:
        with self.engine.begin() as conn:
            row = conn.execute(_CLAIM, {"id": event_id, "lease": self.config.lease_s}).first()
        if row is None:
            return None
        secrets = (row.webhook_secret,) if row.previous_secret is None else (row.webhook_secret, row.previous_secret)
        return _Claim(row.attempts, row.broker_id, row.body.encode("utf-8"), row.webhook_url, secrets)

    def _defer(self, event_id: UUID, claim: _Claim) -> DeliveryResult:
        with self.engine.begin() as conn:
            conn.execute(_RELEASE, {"id": event_id, "attempt": claim.attempt, "defer": DEFER_S})
        if self.reenqueue is not None:
            self.reenqueue(event_id, int(DEFER_S * 1000))
        return DeliveryResult(event_id, Outcome.DEFERRED)

    def _post(self, event_id: UUID, claim: _Claim) -> _Answer:
        started = datetime.now(UTC)
        t0 = time.perf_counter()
        status_code: int | None = None
        error: str | None = None
        excerpt: str | None = None
        try:
            destination = ssrf.resolve_destination(claim.url, self.config.allow_private)
            url = httpx.URL(claim.url)
            headers = signing.webhook_headers(claim.secrets, str(event_id), int(time.time()), claim.body)
            headers.update({"content-type": "application/json", "user-agent": USER_AGENT})
            headers["host"] = url.netloc.decode("ascii")
            extensions: dict[str, Any] = {}
            if destination.scheme == "https":
                extensions["sni_hostname"] = destination.host
            pinned = url.copy_with(host=str(destination.address))
            with self.client.stream(
                "POST", pinned, content=claim.body, headers=headers, extensions=extensions
            ) as response:
                status_code = response.status_code
                excerpt = _read_excerpt(response)
        except ssrf.UnsafeWebhookUrlError as exc:
            error = f"refused: {exc}"
        except httpx.TimeoutException as exc:
            error = f"timeout: {type(exc).__name__}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        except (httpx.InvalidURL, ValueError) as exc:
            # A stored URL httpx refuses (a control character, an unencodable host, ...): a failed attempt like
            # any other, so it is recorded and retried / failed on the normal schedule instead of raising out of
            # deliver() and being re-claimed by the sweeper forever.
            error = f"invalid URL: {type(exc).__name__}: {exc}"[:500]
        latency_ms = max(0, int((time.perf_counter() - t0) * 1000))
        if error is None and status_code is not None and not 200 <= status_code < 300:
            error = f"HTTP {status_code}"
        return _Answer(started, latency_ms, status_code, error, excerpt)

    def _record(self, event_id: UUID, claim: _Claim, answer: _Answer) -> DeliveryResult:
        params: dict[str, Any] = {
            "id": event_id,
            "broker_id": claim.broker_id,
            "attempt": claim.attempt,
            "started": answer.started,
            "url": claim.url,
            "status_code": answer.status_code,
            "latency_ms": answer.latency_ms,
            "error": answer.error,
            "excerpt": answer.excerpt,
        }
        retry_in: float | None = None
        if answer.ok:
            statement, outcome = _RECORD_DELIVERED, Outcome.DELIVERED
        elif answer.status_code == 410:
            params["reason"] = f"receiver answered 410 Gone at {answer.started.isoformat(timespec='seconds')}"
            statement, outcome = _RECORD_GONE, Outcome.FAILED
        elif (retry_in := schedule.retry_delay(self.config.retry_schedule, claim.attempt)) is not None:
            params["delay"] = retry_in
            statement, outcome = _RECORD_RETRY, Outcome.RETRY
        else:
            limit = self.config.disable_after
            reason = f"{limit} consecutive events failed after every retry; last error: {answer.error}"
            params.update(limit=limit, reason=reason[:1000])
            statement, outcome = _RECORD_FAILED, Outcome.FAILED
        with self.engine.begin() as conn:
            conn.execute(statement, params)
        if retry_in is not None and retry_in <= MAX_BROKER_DELAY_S and self.reenqueue:
            self.reenqueue(event_id, int(retry_in * 1000) + 1)
        if outcome is not Outcome.DELIVERED:
            log.info("delivery event=%s attempt=%d outcome=%s error=%s", event_id, claim.attempt, outcome, answer.error)
        return DeliveryResult(event_id, outcome, claim.attempt, answer.status_code, answer.error, retry_in)


def _read_excerpt(response: httpx.Response) -> str:
    kept = bytearray()
    read = 0
    for chunk in response.iter_bytes():
        read += len(chunk)
        if len(kept) < EXCERPT_BYTES:
            kept += chunk[: EXCERPT_BYTES - len(kept)]
        if read >= MAX_READ_BYTES:
            break
    # PostgreSQL text cannot hold NUL; the excerpt is for humans reading the delivery log.
    return kept.decode("utf-8", errors="replace").replace("\x00", "\ufffd")


# ----------------------------------------------------------------------------------------------- sweeper

_REQUEUE_DUE = text(
    """
    UPDATE webhook_events SET next_attempt_at = clock_timestamp()
    WHERE id IN (SELECT id FROM webhook_events
                 WHERE status = 'pending' AND next_attempt_at <= clock_timestamp() - make_interval(secs => :older)
                 ORDER BY next_attempt_at
                 LIMIT :limit
                 FOR UPDATE SKIP LOCKED)
    RETURNING id
    """
)


def take_overdue(engine: Engine, *, older_than_s: float, limit: int = 1000) -> list[UUID]:
    """Events due for more than ``older_than_s`` (lost message, crashed worker, retry left to the sweeper).

    Their ``next_attempt_at`` is reset to now, so the same event is handed out again only after another
    ``older_than_s``: a dead delivery worker costs one message per event per period, not one per sweep.
    """
    with engine.begin() as conn:
        return [row.id for row in conn.execute(_REQUEUE_DUE, {"older": older_than_s, "limit": limit})]
