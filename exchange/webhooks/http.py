"""A small HTTP/1.1 client for webhook POSTs: asyncio streams, keep-alive connections per pinned endpoint, answers
parsed by llhttp (``httptools``, the parser uvicorn uses).

Why not httpx: measured on a 2-core machine against a local receiver, ``httpx.AsyncClient`` costs 0.6 to 2.3 ms of
CPU per request and gets slower as concurrency grows (httpcore walks every pooled connection and calls
``getpeername()`` on each, per request); the sync client in threads costs 0.5 to 0.9 ms. Why not h11 (this
client's protocol layer until it was measured): ~150 µs of CPU per exchange against ~12 µs for llhttp and a request
written here, a quarter of a delivery's CPU. Deliveries need little: POST a small body with headers this module
checks, read the status and the first bytes of the answer, reuse the connection when the answer allows it.

Invariants:

* a connection is only ever opened to ``Endpoint.address`` (the address the SSRF guard checked); the ``Host``
  header, TLS SNI and the certificate check use the URL's host name;
* the request line and headers are sent only when the target and every header value are printable ASCII
  (:class:`InvalidRequestError` otherwise): no stored URL can inject a header or a second request;
* ``Content-Length`` is written here from the body, never taken from the caller;
* a connection returns to the idle pool only after a complete answer that keeps it alive (llhttp's keep-alive rule:
  HTTP/1.1 without ``Connection: close``, or HTTP/1.0 with ``Connection: keep-alive``); anything else (an error, a
  timeout, an answer longer than ``MAX_READ_BYTES`` or whose non-body bytes exceed ``MAX_HEAD_BYTES``, an answer
  delimited by the connection closing, bytes after the answer) closes it, and an idle connection is taken again only
  while nothing arrived on it (a receiver's unsolicited answer, say a 408 before it closes, is never read as the
  answer to the next request);
* interim ``1xx`` answers are skipped; the status reported is the final one, and bytes after it are not parsed
  as part of this exchange (they cannot replace its status or reach the next request);
* a request on a reused idle connection that fails before any byte of an answer arrived is sent again on another
  connection (the receiver had closed the idle one); the receiver may then get the body twice, which
  at-least-once delivery allows. The read timeout bounds a request's exchanges together: sending again gets only
  what the failed ones left of it.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections import OrderedDict
from dataclasses import dataclass

import httptools

EXCERPT_BYTES = 512
"""Bytes of the receiver's answer kept for the attempt log."""
MAX_READ_BYTES = 64 * 1024
"""Answers are read up to this size (so small answers leave the connection reusable), the rest is dropped."""
MAX_HEAD_BYTES = 64 * 1024
"""Bytes of an answer that are not its body (status lines, headers, chunk framing, interim answers) read at most:
llhttp itself has no limit, and a receiver must not keep a pump's loop busy with endless headers."""
_READ_CHUNK = 16 * 1024


class ConnectTimeoutError(TimeoutError):
    """No connection (TCP and TLS handshake) within the connect timeout."""


class ReadTimeoutError(TimeoutError):
    """The request was not sent and answered within the read timeout."""


class InvalidRequestError(ValueError):
    """The target or a header value is not printable ASCII: the request is not sent."""


class RemoteProtocolError(Exception):
    """The receiver's answer is not HTTP/1.x (or ends before it is complete)."""


class _SurplusError(Exception):
    """Bytes after the final answer (raised from a parser callback to stop llhttp there)."""


class _StaleConnectionError(Exception):
    """A reused connection failed before any byte of an answer: the receiver had closed it while idle."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where one delivery goes: connect to ``address``:``port``; ``host`` is the URL's host (SNI, certificate)."""

    scheme: str
    host: str
    address: str
    port: int
    target: bytes
    """Path and query, percent-encoded."""
    host_header: bytes
    authorization: bytes | None = None
    """The ``Authorization`` value of the URL's credentials (``Basic …``), None when it has none."""

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.scheme, self.host, self.address, self.port)


@dataclass(frozen=True, slots=True)
class Reply:
    status_code: int
    excerpt: str
    """The first ``EXCERPT_BYTES`` of the body, for humans (undecodable bytes replaced; NULs are replaced where
    text is stored, :func:`exchange.webhooks.store.record`)."""


_TARGET = re.compile(rb"[\x21-\x7e]+\Z")
_HEADER_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_HEADER_VALUE = re.compile(rb"[\x20-\x7e]*\Z")


def _request(target: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    if not _TARGET.match(target):
        raise InvalidRequestError(f"request target {target[:100]!r} is not printable ASCII")
    lines = [b"POST ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        if not (_HEADER_NAME.match(name) and _HEADER_VALUE.match(value)):
            raise InvalidRequestError(f"header {name[:100]!r} is not a token with a printable ASCII value")
        if name.lower() == b"content-length":
            raise InvalidRequestError("Content-Length is written from the body, not given")
        lines += (name, b": ", value, b"\r\n")
    lines += (b"content-length: %d\r\n\r\n" % len(body), body)
    return b"".join(lines)


MAX_STATUS_CODE = 599
"""The highest HTTP status; llhttp takes any three digits, the attempts' table only 100-599."""


class _Answer:
    """llhttp's callbacks for the answers on one connection: the final status, the first bytes of its body."""

    __slots__ = ("complete", "framed", "keep_alive", "kept", "parser", "read", "status_code")

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        # Lines ended by a bare LF are read as h11 read them: a client parsing its own answers smuggles nothing.
        self.parser.set_dangerous_leniencies(lenient_optional_cr_before_lf=True)
        self.reset()

    def reset(self) -> None:
        self.status_code = 0
        self.framed = False
        """A Content-Length or Transfer-Encoding header: the body ends by itself, not when the connection closes."""
        self.kept = bytearray()
        self.read = 0
        self.complete = False
        self.keep_alive = False

    def on_message_begin(self) -> None:
        if self.complete:  # bytes after the final answer: not an answer to this request; stop parsing here
            raise _SurplusError

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.status_code = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.read += len(body)
        if len(self.kept) < EXCERPT_BYTES:
            self.kept += body[: EXCERPT_BYTES - len(self.kept)]

    def on_message_complete(self) -> None:
        if self.status_code < 200:  # an interim answer (100 Continue, 103 Early Hints): the final one follows
            self.reset()
        else:
            self.complete = True
            self.keep_alive = self.parser.should_keep_alive()  # llhttp's rule; read here: it resets after the message

    def ended_by_close(self) -> bool:
        """At the end of the stream: the answer was complete when the closing connection delimits its body."""
        return self.status_code >= 200 and not self.framed  # 204/304 complete at their head: never asked


class _Connection:
    __slots__ = ("answer", "reader", "reused", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.answer = _Answer()
        self.reused = False

    def usable(self) -> bool:
        # Idle, a connection has nothing to read: bytes that arrived meanwhile (a server's unsolicited 408 before it
        # closes) would be taken for the next request's answer, and at_eof() is False while they are buffered.
        buffered = len(getattr(self.reader, "_buffer", b""))  # StreamReader has no public way to ask
        return not (buffered or self.reader.at_eof() or self.writer.is_closing())

    def close(self) -> None:
        self.writer.close()


class HttpClient:
    """POSTs over keep-alive connections; one per event loop. Not thread-safe (use it from its loop only)."""

    def __init__(
        self,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        max_idle: int = 256,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_idle = max_idle
        self._ssl_context = ssl_context
        self._idle: OrderedDict[tuple[str, str, str, int], list[_Connection]] = OrderedDict()
        self._idle_count = 0

    async def post(self, endpoint: Endpoint, headers: list[tuple[bytes, bytes]], body: bytes) -> Reply:
        """POST ``body`` with ``headers`` (which must include Host, and not Content-Length: it is written from
        ``body``). Raises :class:`ConnectTimeoutError` / :class:`ReadTimeoutError`, ``OSError`` (refused, reset,
        TLS), :class:`RemoteProtocolError` (a malformed or cut-off answer) or :class:`InvalidRequestError` (nothing
        sent)."""
        request = _request(endpoint.target, headers, body)
        # The read timeout bounds all of this request's exchanges together, not each: a reused connection that
        # failed late (the receiver held the request, then closed without answering) leaves the next one only what
        # remains, so an attempt never outlasts lookup + connect + read timeout (Settings.longest_webhook_attempt_ms,
        # which the lease must exceed) however many idle connections it tries.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout_s
        while (idle := self._take_idle(endpoint.key)) is not None:
            try:
                return await self._exchange(idle, endpoint, request, deadline)
            except _StaleConnectionError:
                continue
        started = loop.time()
        connection = await self._connect(endpoint)
        deadline += loop.time() - started  # the connect has its own timeout
        try:
            return await self._exchange(connection, endpoint, request, deadline)
        except _StaleConnectionError as exc:  # a new connection is never stale: report what happened to it
            raise exc.__cause__ or ConnectionResetError("connection closed before an answer") from None

    def close(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()
        self._idle_count = 0

    # ----------------------------------------------------------------------------------------- internals

    def _ssl(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    async def _connect(self, endpoint: Endpoint) -> _Connection:
        tls = endpoint.scheme == "https"
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                reader, writer = await asyncio.open_connection(
                    endpoint.address,
                    endpoint.port,
                    ssl=self._ssl() if tls else None,
                    server_hostname=endpoint.host if tls else None,
                )
        except TimeoutError:
            raise ConnectTimeoutError(
                f"no connection to {endpoint.address}:{endpoint.port} within {self.connect_timeout_s:g} s"
            ) from None
        return _Connection(reader, writer)

    async def _exchange(self, connection: _Connection, endpoint: Endpoint, request: bytes, deadline: float) -> Reply:
        answer = connection.answer
        answer.reset()
        answered = False
        fed = 0
        try:
            async with asyncio.timeout_at(deadline):
                connection.writer.write(request)
                await connection.writer.drain()
                while not answer.complete and answer.read < MAX_READ_BYTES and fed - answer.read < MAX_HEAD_BYTES:
                    chunk = await connection.reader.read(_READ_CHUNK)
                    if not chunk:
                        if answer.ended_by_close():
                            break
                        raise ConnectionResetError("connection closed before a complete answer")
                    answered = True
                    fed += len(chunk)
                    answer.parser.feed_data(chunk)
                if answer.status_code < 200:  # stopped by MAX_HEAD_BYTES before a final answer's head ended
                    raise RemoteProtocolError(f"no final answer head within {fed} bytes")
                if answer.status_code > MAX_STATUS_CODE:  # three digits, but of no class (RFC 9110, section 15)
                    raise RemoteProtocolError(f"status {answer.status_code} is not an HTTP status (100-599)")
        except TimeoutError:
            connection.close()
            raise ReadTimeoutError(f"no complete answer within {self.read_timeout_s:g} s") from None
        except httptools.HttpParserUpgrade:
            connection.close()
            raise RemoteProtocolError("the receiver switched protocols") from None
        except httptools.HttpParserError as exc:  # _SurplusError arrives wrapped as HttpParserCallbackError
            connection.close()
            if not answer.complete:
                raise RemoteProtocolError(f"malformed answer: {exc}") from None
            answer.keep_alive = False  # bytes after the final answer: the answer stands, the connection does not
        except OSError as exc:
            connection.close()
            if connection.reused and not answered:
                raise _StaleConnectionError from exc
            raise
        except BaseException:
            connection.close()
            raise
        if answer.complete and answer.keep_alive:
            self._put_idle(endpoint.key, connection)
        else:
            connection.close()
        return Reply(answer.status_code, answer.kept.decode("utf-8", errors="replace"))

    def _take_idle(self, key: tuple[str, str, str, int]) -> _Connection | None:
        connections = self._idle.get(key)
        while connections:
            connection = connections.pop()  # the most recently used: the most likely to be alive
            self._idle_count -= 1
            if connection.usable():
                connection.reused = True
                if not connections:
                    del self._idle[key]
                return connection
            connection.close()
        self._idle.pop(key, None)
        return None

    def _put_idle(self, key: tuple[str, str, str, int], connection: _Connection) -> None:
        self._idle.setdefault(key, []).append(connection)
        self._idle.move_to_end(key)
        self._idle_count += 1
        while self._idle_count > self.max_idle:  # close the least recently used endpoint's oldest connection
            oldest_key, oldest = next(iter(self._idle.items()))
            oldest.pop(0).close()
            self._idle_count -= 1
            if not oldest:
                del self._idle[oldest_key]
