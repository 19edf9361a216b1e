"""One delivery attempt of one claimed event: resolve and SSRF-check the URL, POST the stored payload signed,
judge the answer. Never raises (except on cancellation): every attempt ends as an :class:`~store.Attempt` to
record, so no event can be stuck being claimed and crashing forever.

The payload is sent byte-identical on every attempt (``payload::text`` is deterministic for a JSONB value) with
fresh Standard Webhooks headers. A host that does not resolve or is refused by the SSRF guard, and a stored URL
that cannot be requested, are failed attempts like a refused connection or a 500.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import h11
import httpx

from exchange.config import Settings
from exchange.webhooks import signing, ssrf
from exchange.webhooks.http import Endpoint, HttpClient
from exchange.webhooks.outcomes import Outcome, judge
from exchange.webhooks.store import Attempt, Claim

# Outcome: what an attempt led to; importable from here as before (the review proofs import it from this module).
__all__ = ["DeliveryConfig", "Endpoints", "Outcome", "attempt"]

log = logging.getLogger("exchange.webhooks")

USER_AGENT = b"exchange-webhooks/1"
_ERROR_CHARS = 500


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    retry_schedule: tuple[float, ...]
    connect_timeout_s: float
    read_timeout_s: float
    """Bounds sending the request and reading the whole answer (a receiver that trickles is cut off)."""
    lease_s: float
    disable_after: int
    allow_private: bool
    max_in_flight: int
    """Deliveries to one broker in flight at once, per worker process."""

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


class Endpoints:
    """The endpoints of one claimed batch: each distinct URL is resolved and checked once, when its first
    delivery needs it; deliveries to other URLs never wait for it (a slow DNS answer only delays its own URL)."""

    def __init__(self, config: DeliveryConfig) -> None:
        self._config = config
        self._resolving: dict[str, asyncio.Task[Endpoint]] = {}

    async def get(self, url: str) -> Endpoint:
        """Raises ``UnsafeWebhookUrlError`` (refused or unresolvable) or ``httpx.InvalidURL``."""
        task = self._resolving.get(url)
        if task is None:
            task = self._resolving[url] = asyncio.create_task(self._resolve(url))
        return await asyncio.shield(task)  # a cancelled delivery must not cancel its batch-mates' resolution

    async def _resolve(self, url: str) -> Endpoint:
        config = self._config
        destination = await ssrf.resolve_destination_async(url, config.allow_private, config.connect_timeout_s)
        parsed = httpx.URL(url)  # normalizes and percent-encodes; refuses what cannot be requested
        port = parsed.port or (443 if destination.scheme == "https" else 80)
        return Endpoint(
            destination.scheme, destination.host, str(destination.address), port, parsed.raw_path, parsed.netloc
        )


async def attempt(http: HttpClient, endpoints: Endpoints, claim: Claim, config: DeliveryConfig) -> Attempt:
    """POST ``claim``'s event once and judge the answer (see the module docstring)."""
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    status_code: int | None = None
    excerpt: str | None = None
    error: str | None = None
    try:
        endpoint = await endpoints.get(claim.url)
        event_id = str(claim.event_id)
        signed = signing.webhook_headers(claim.secrets, event_id, int(time.time()), claim.body)
        headers = [
            (b"host", endpoint.host_header),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(claim.body)).encode("ascii")),
            (b"user-agent", USER_AGENT),
            *((name.encode("ascii"), value.encode("ascii")) for name, value in signed.items()),
        ]
        reply = await http.post(endpoint, headers, claim.body)
        status_code, excerpt = reply.status_code, reply.excerpt
    except ssrf.UnsafeWebhookUrlError as exc:
        error = f"refused: {exc}"
    except TimeoutError as exc:  # before OSError: TimeoutError is one
        error = f"timeout: {exc}"
    except (httpx.InvalidURL, h11.LocalProtocolError, ValueError) as exc:
        # A stored URL that cannot be requested (a control character, an unencodable host, ...): a failed attempt
        # like any other, so it is recorded and retried / failed on the normal schedule.
        error = f"invalid URL: {type(exc).__name__}: {exc}"
    except (OSError, h11.RemoteProtocolError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # a bug: still an attempt to record, never an event claimed and crashed forever
        log.exception("webhook delivery of event %s failed unexpectedly", claim.event_id)
        error = f"internal error: {type(exc).__name__}: {exc}"
    latency_ms = max(0, int((time.perf_counter() - t0) * 1000))
    if error is None and not 200 <= (status_code or 0) < 300:
        error = f"HTTP {status_code}"
    if error is not None:
        error = error[:_ERROR_CHARS].replace("\x00", "\ufffd")  # PostgreSQL text cannot hold NUL
    verdict = judge(
        status_code,
        error,
        attempt=claim.attempt,
        started=started,
        retry_schedule=config.retry_schedule,
        disable_after=config.disable_after,
    )
    return Attempt(claim, verdict, started, latency_ms, status_code, error, excerpt)
