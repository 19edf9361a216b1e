"""A minimal keep-alive HTTP/1.1 client over asyncio streams (plain ``http://`` only).

httpx costs several times more CPU per request than the server under test spends on a cheap read; on a 2-core
machine shared with the exchange, that alone would make the generator fall behind its schedule. This client
does only what the benchmark needs: one request at a time per connection, ``Content-Length`` or chunked
responses, a pool of idle connections that grows on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from urllib.parse import urlsplit


def install_uvloop() -> None:
    """Run this process's asyncio loops on uvloop when it is installed (the generator's processes only)."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class HttpError(Exception):
    """The connection failed or the response was not HTTP/1.1 we understand."""


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


def split_base_url(base_url: str) -> tuple[str, int, str]:
    """(host, port, path prefix) of an ``http://`` base URL."""
    parts = urlsplit(base_url)
    if parts.scheme != "http":
        raise ValueError(f"only http:// base URLs are supported, got {base_url!r}")
    return parts.hostname or "127.0.0.1", parts.port or 80, parts.path.rstrip("/")


class Pool:
    """Connections to one server. ``request`` borrows an idle connection or opens a new one."""

    def __init__(self, base_url: str, *, timeout_s: float = 10.0, max_connections: int = 128) -> None:
        self.host, self.port, self.prefix = split_base_url(base_url)
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self.idle: list[_Conn] = []
        # Requests waiting for a connection when ``max_connections`` are busy: each gets a connection handed over
        # by _release, or None ("a slot is free, open one") from _discard.
        self.waiters: deque[asyncio.Future[_Conn | None]] = deque()
        self.waited = 0
        self.opened = 0
        self.open_now = 0
        self.peak_open = 0
        self._host_header = f"Host: {self.host}:{self.port}\r\n".encode()

    async def _connect(self) -> _Conn:
        """Open a connection; its slot counts from now on (released by _discard, or here on failure)."""
        self.open_now += 1
        self.peak_open = max(self.peak_open, self.open_now)
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        except BaseException:
            self._free_slot()
            raise
        self.opened += 1
        return _Conn(reader, writer)

    async def _acquire(self) -> tuple[_Conn, bool]:
        """(a connection, whether it was kept alive from an earlier request). An idle connection the server has
        closed meanwhile (an idle keep-alive timeout: gunicorn's 2 s, uvicorn's 5 s) is dropped, not used: a new
        order on it would fail without a retry."""
        while self.idle:
            conn = self.idle.pop()
            if conn.reader.at_eof() or conn.writer.is_closing():
                self._discard(conn)
                continue
            return conn, True
        if self.open_now < self.max_connections:
            return await self._connect(), False
        self.waited += 1
        waiter: asyncio.Future[_Conn | None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            handed = await waiter
        except asyncio.CancelledError:
            # Cancelled (the request's timeout) in the same loop iteration as a connection or a free slot was
            # handed over: pass it on, or the slot stays taken for good.
            if waiter.done() and not waiter.cancelled():
                handed = waiter.result()
                if handed is None:
                    self._pass_slot()
                else:
                    self._release(handed)
            raise
        if handed is not None:
            return handed, True
        return await self._connect(), False

    def _release(self, conn: _Conn) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self.idle.append(conn)

    def _free_slot(self) -> None:
        self.open_now -= 1
        self._pass_slot()

    def _pass_slot(self) -> None:
        """A slot is free: the first waiter still waiting opens a connection in it."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _discard(self, conn: _Conn) -> None:
        conn.close()
        self._free_slot()

    async def warm(self, n: int) -> None:
        conns = await asyncio.gather(*(self._connect() for _ in range(min(n, self.max_connections))))
        self.idle.extend(conns)

    async def request(
        self,
        method: str,
        path: str,
        *,
        auth: bytes = b"",
        body: bytes | None = None,
        retry: bool = True,
        on_write: Callable[[], None] | None = None,
        timeout_s: float | None = None,
    ) -> tuple[int, bytes]:
        """(status, body). ``auth``: a prebuilt ``Authorization: …\\r\\n`` header line. ``retry``: the request
        may be sent again on a new connection when a kept-alive one fails (not for a request that must not be made
        twice, such as a new order: the server may have taken it before the connection failed). ``on_write``:
        called once, just before the request is first written (after any wait for a connection). ``timeout_s``:
        this request's, if not the pool's. Raises :class:`HttpError` or :class:`TimeoutError`."""
        head = b"%s %s HTTP/1.1\r\n" % (method.encode(), (self.prefix + path).encode())
        head += self._host_header + auth
        if body is not None:
            head += b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
            payload = head + body
        else:
            payload = head + (b"Content-Length: 0\r\n\r\n" if method == "POST" else b"\r\n")
        conn: _Conn | None = None
        try:
            async with asyncio.timeout(self.timeout_s if timeout_s is None else timeout_s):
                conn, reused = await self._acquire()
                if on_write is not None:
                    on_write()
                try:
                    return await self._exchange(conn, payload)
                except (ConnectionError, asyncio.IncompleteReadError, HttpError):
                    if not reused or not retry:
                        raise
                    # A kept-alive connection the server closed meanwhile: retry once on a new one.
                    self._discard(conn)
                    conn = None  # its slot is free: a failed connect below must not free it again
                    conn = await self._connect()
                    return await self._exchange(conn, payload)
        except TimeoutError:
            if conn is not None:
                self._discard(conn)
            raise
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            if conn is not None:
                self._discard(conn)
            raise HttpError(f"{exc.__class__.__name__}: {exc}") from None
        except BaseException:
            if conn is not None:
                self._discard(conn)
            raise

    async def _exchange(self, conn: _Conn, payload: bytes) -> tuple[int, bytes]:
        conn.writer.write(payload)
        reader = conn.reader
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.split(b"\r\n")
        status_line = lines[0]
        if not status_line.startswith(b"HTTP/1."):
            raise HttpError(f"bad status line {status_line[:40]!r}")
        status = int(status_line[9:12])
        length = -1
        chunked = False
        close = status_line.startswith(b"HTTP/1.0")
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                close = b"close" in value.lower()
        if status in (204, 304) or 100 <= status < 200:
            data = b""
        elif chunked:
            parts: list[bytes] = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            data = b"".join(parts)
        elif length >= 0:
            data = await reader.readexactly(length) if length else b""
        else:
            data = await reader.read()
            close = True
        if close:
            self._discard(conn)
        else:
            self._release(conn)
        return status, data

    def close(self) -> None:
        for conn in self.idle:
            self._discard(conn)
        self.idle.clear()
