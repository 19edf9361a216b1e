"""The api's gunicorn worker: uvicorn's, with each response written to the socket once instead of twice.

uvicorn writes a response's status line and headers as soon as the app sends ``http.response.start`` and the body
when it sends ``http.response.body``: two ``send()`` system calls per response, each running the loopback TCP path
and waking the reader. :class:`CoalescingHttpToolsProtocol` gives uvicorn a transport whose ``write`` collects
what one step of the event loop writes and sends it as one buffer before the loop next waits for I/O
(``call_soon``), or at once when it reaches ``MAX_HELD_BYTES``. Order is kept (one buffer per connection, appended
in call order); ``close`` and ``write_eof`` send what is collected first, so a ``Connection: close`` or error
answer is never cut; ``abort`` drops it, as the real transport would. Everything else is the real transport's.

``gunicorn.conf.py`` names :class:`ApiWorker` as the worker class.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn_worker import UvicornWorker  # type: ignore[import-untyped]

MAX_HELD_BYTES = 64 * 1024
"""Held writes reaching this size are sent at once: a large or streamed body goes out (and meets the socket's
flow control: uvicorn waits for the buffer to drain only once the real transport pauses writing) instead of
piling up until the event-loop step ends."""


class CoalescingTransport:
    """A stream transport whose writes of one event-loop step go out as one ``write`` of the wrapped one."""

    __slots__ = ("_held", "_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._held = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self.flush)
        chunk = bytes(data)
        self._pending.append(chunk)
        self._held += len(chunk)
        if self._held >= MAX_HELD_BYTES:
            self.flush()  # the scheduled flush then finds nothing

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        """Send what was collected (nothing if it was already sent, dropped or the connection is closing)."""
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending = []
        self._held = 0
        if not self._transport.is_closing():
            self._transport.write(data)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._held

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._transport.close()

    def abort(self) -> None:
        self._pending = []
        self._held = 0
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        # is_closing, get_extra_info, pause_reading/resume_reading (uvicorn's flow control), set_protocol, …
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a :class:`CoalescingTransport`."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        coalescing = CoalescingTransport(cast(asyncio.Transport, transport), self.loop)
        super().connection_made(cast(asyncio.Transport, coalescing))


class ApiWorker(UvicornWorker):  # type: ignore[misc]  # uvicorn_worker ships no type information
    """gunicorn worker class of the api: uvicorn (uvloop, httptools) with :class:`CoalescingHttpToolsProtocol`."""

    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {
        **UvicornWorker.CONFIG_KWARGS,
        "http": f"{__name__}:{CoalescingHttpToolsProtocol.__name__}",
    }
