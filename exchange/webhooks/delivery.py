"""One delivery attempt of one claimed event: resolve and SSRF-check the URL (one lookup per host, reused for a
short while: :class:`Resolver`), POST the stored payload signed, judge the answer. Never raises (except on
cancellation): every attempt ends as an :class:`~store.Attempt` to record, so no event can be stuck being claimed
and crashing forever.

The payload is sent byte-identical on every attempt (``payload::text`` is deterministic for a JSONB value) with
fresh Standard Webhooks headers, and the URL's credentials (``user:password@``), if any, as basic auth. A host
that does not resolve or is refused by the SSRF guard, and a stored URL that cannot be requested, are failed
attempts like a refused connection or a 500.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx

from exchange.config import Settings
from exchange.webhooks import signing, ssrf
from exchange.webhooks.http import Endpoint, HttpClient, InvalidRequestError, RemoteProtocolError
from exchange.webhooks.outcomes import Outcome, judge
from exchange.webhooks.store import Attempt, Claim

# Outcome: what an attempt led to; importable from here as before (the review proofs import it from this module).
__all__ = ["DeliveryConfig", "Endpoints", "Outcome", "Resolver", "attempt"]

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
    record_linger_s: float = 0.0
    """How long the recorder waits after an attempt ends for more to record with it (see the pump); 0 here unless
    given, ``EXCHANGE_WEBHOOK_RECORD_LINGER_MS`` in a worker (:meth:`from_settings`)."""

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
            record_linger_s=settings.webhook_record_linger_ms / 1000,
        )


DNS_TTL_S = 30.0
"""A host's checked address is reused this long after its lookup ended (a changed DNS record reaches deliveries
within half a minute; rebinding cannot exploit the reuse: requests are pinned to the checked address anyway)."""
DNS_FAILURE_TTL_S = 5.0
"""A failed lookup (no such name, a resolver error, a forbidden address) is reused this long: a broker whose name
does not resolve costs one lookup per 5 s, not one per delivery."""
_MAX_CACHED = 4096
"""Above this many cached hosts / URLs, expired hosts are dropped (URLs: all) before a new one is added."""

HostLookup = Callable[[str, bool], ssrf.IPAddress]
"""``(host, allow_private) -> checked address``, blocking (:func:`ssrf.resolve_host`; tests pass a slow one)."""


@dataclass(slots=True)
class _Lookup:
    answer: asyncio.Future[ssrf.IPAddress]
    expires_at: float = math.inf
    """Loop time after which the answer is not reused; infinite while the lookup runs (it is shared, not redone)."""


class Resolver:
    """Host name → the checked address deliveries connect to; one per pump, shared by every batch it claims.

    Invariants:

    * at most one lookup per host runs at a time: deliveries needing the host meanwhile wait for that one, each at
      most ``timeout_s`` (then the attempt fails like an unresolvable host). A lookup its waiters gave up on keeps
      running and is NOT started again: when it ends, its answer is cached like any other. A DNS server that hangs
      therefore holds one thread per host, not one per batch or per delivery;
    * an address is reused for ``ttl_s`` after its lookup ended, a failure (no such name, a resolver error, an
      address the SSRF guard refuses) for ``failure_ttl_s``; then the next delivery that needs the host looks up;
      a host that is an IP address needs no lookup: it is checked once and its address kept, or refused each time;
    * lookups run on ``executor`` (the pump's DNS threads, see :mod:`exchange.webhooks.pump`), never on the threads
      that claim and record, so a slow DNS server cannot delay the database work of other brokers' deliveries.
    """

    def __init__(
        self,
        executor: Executor,
        *,
        allow_private: bool,
        timeout_s: float,
        lookup: HostLookup = ssrf.resolve_host,
        ttl_s: float = DNS_TTL_S,
        failure_ttl_s: float = DNS_FAILURE_TTL_S,
    ) -> None:
        self._executor = executor
        self._allow_private = allow_private
        self._timeout_s = timeout_s
        self._lookup = lookup
        self._ttl_s = ttl_s
        self._failure_ttl_s = failure_ttl_s
        self._hosts: dict[str, _Lookup] = {}
        self._literals: dict[str, ssrf.IPAddress] = {}
        """IP-address hosts and their checked address (parsed and checked once, not per delivery)."""

    async def address(self, host: str) -> ssrf.IPAddress:
        """Raises :class:`ssrf.UnsafeWebhookUrlError` (refused, unresolvable, or no answer within the timeout)."""
        literal = self._literals.get(host)
        if literal is not None:
            return literal
        if ssrf.is_literal(host):  # no DNS: checked on the spot, once (the answer cannot change); refusals each time
            if len(self._literals) >= _MAX_CACHED:
                self._literals.clear()
            literal = self._literals[host] = ssrf.resolve_host(host, self._allow_private)
            return literal
        loop = asyncio.get_running_loop()
        lookup = self._hosts.get(host)
        if lookup is None or lookup.expires_at <= loop.time():
            lookup = self._start(loop, host)
        try:
            # shield: a waiter that gives up (or is cancelled) must not cancel the lookup other waiters share
            return await asyncio.wait_for(asyncio.shield(lookup.answer), self._timeout_s)
        except TimeoutError:
            raise ssrf.UnsafeWebhookUrlError(
                f"cannot resolve host {host!r}: no answer within {self._timeout_s:g} s"
            ) from None

    def _start(self, loop: asyncio.AbstractEventLoop, host: str) -> _Lookup:
        if len(self._hosts) >= _MAX_CACHED:
            now = loop.time()
            self._hosts = {h: known for h, known in self._hosts.items() if known.expires_at > now}
        answer = loop.run_in_executor(self._executor, self._lookup, host, self._allow_private)
        lookup = self._hosts[host] = _Lookup(answer)
        answer.add_done_callback(lambda done: self._ended(loop, lookup, done))
        return lookup

    def _ended(self, loop: asyncio.AbstractEventLoop, lookup: _Lookup, answer: asyncio.Future[ssrf.IPAddress]) -> None:
        if answer.cancelled():  # the executor was shut down: nothing to reuse
            lookup.expires_at = -math.inf
        elif answer.exception() is not None:  # retrieved here too: waiters that gave up never will
            lookup.expires_at = loop.time() + self._failure_ttl_s
        else:
            lookup.expires_at = loop.time() + self._ttl_s


@dataclass(frozen=True, slots=True)
class _Target:
    """What a URL says about its requests, parsed once (``Endpoint`` without the address)."""

    scheme: str
    host: str
    port: int
    target: bytes
    host_header: bytes
    authorization: bytes | None


def basic_authorization(url: httpx.URL) -> bytes | None:
    """The ``Authorization`` header value of ``url``'s credentials (``user:password@``, percent-decoded, UTF-8), or
    None when it has none: a receiver behind basic auth takes its credentials from the URL the broker registered,
    as httpx, curl and the seed's client send them. They never go into the ``Host`` header."""
    if not url.userinfo:
        return None
    credentials = f"{url.username}:{url.password}".encode()
    return b"Basic " + base64.b64encode(credentials)


class Endpoints:
    """URL → :class:`Endpoint` for one pump: each URL is parsed once, its host's address comes from the
    :class:`Resolver`. Deliveries to other hosts never wait for a host's lookup (a slow DNS answer only delays
    the deliveries that need it)."""

    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver
        self._targets: dict[str, _Target] = {}

    async def get(self, url: str) -> Endpoint:
        """Raises ``UnsafeWebhookUrlError`` (refused or unresolvable) or ``httpx.InvalidURL``."""
        target = self._targets.get(url) or self._parse(url)
        address = await self._resolver.address(target.host)
        return Endpoint(
            target.scheme,
            target.host,
            str(address),
            target.port,
            target.target,
            target.host_header,
            target.authorization,
        )

    def _parse(self, url: str) -> _Target:
        scheme, host, port = ssrf.split_url(url)
        parsed = httpx.URL(url)  # normalizes and percent-encodes; refuses what cannot be requested
        if len(self._targets) >= _MAX_CACHED:
            self._targets.clear()
        target = self._targets[url] = _Target(
            scheme, host, port, parsed.raw_path, parsed.netloc, basic_authorization(parsed)
        )
        return target


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
            (b"user-agent", USER_AGENT),
            *((name.encode("ascii"), value.encode("ascii")) for name, value in signed.items()),
        ]
        if endpoint.authorization is not None:
            headers.append((b"authorization", endpoint.authorization))
        reply = await http.post(endpoint, headers, claim.body)
        status_code, excerpt = reply.status_code, reply.excerpt
    except ssrf.UnsafeWebhookUrlError as exc:
        error = f"refused: {exc}"
    except TimeoutError as exc:  # before OSError: TimeoutError is one
        error = f"timeout: {exc}"
    except (httpx.InvalidURL, InvalidRequestError, ValueError) as exc:
        # A stored URL that cannot be requested (a control character, an unencodable host, ...): a failed attempt
        # like any other, so it is recorded and retried / failed on the normal schedule.
        error = f"invalid URL: {type(exc).__name__}: {exc}"
    except (OSError, RemoteProtocolError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # a bug: still an attempt to record, never an event claimed and crashed forever
        log.exception("webhook delivery of event %s failed unexpectedly", claim.event_id)
        error = f"internal error: {type(exc).__name__}: {exc}"
    latency_ms = max(0, int((time.perf_counter() - t0) * 1000))
    if error is None and not 200 <= (status_code or 0) < 300:
        error = f"HTTP {status_code}"
    if error is not None:
        error = error[:_ERROR_CHARS]  # NULs are replaced where text is stored (store.record)
    verdict = judge(
        status_code,
        error,
        attempt=claim.attempt,
        started=started,
        retry_schedule=config.retry_schedule,
        disable_after=config.disable_after,
    )
    return Attempt(claim, verdict, started, latency_ms, status_code, error, excerpt)
