"""The api's uvicorn protocol (exchange.api.server): responses over real loopback sockets, one write each."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import uvloop
from uvicorn.config import Config
from uvicorn.server import ServerState

from exchange.api.server import MAX_HELD_BYTES, ApiWorker, CoalescingHttpToolsProtocol, CoalescingTransport

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
T = TypeVar("T")
Run = Callable[[Awaitable[T]], T]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Any], Any]:
    """Runs a coroutine on the standard event loop and on uvloop (what the api's workers run on)."""
    factory = asyncio.new_event_loop if request.param == "asyncio" else uvloop.new_event_loop

    def run_on_loop(coroutine: Any) -> Any:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(coroutine)

    return run_on_loop


async def _app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers ``/<text>`` with ``text``; the head and the body are two ASGI messages, as Litestar sends them."""
    if scope["type"] != "http":
        return
    await receive()
    body = scope["path"].lstrip("/").encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _RecordingTransport:
    """Forwards to the real socket transport and records what each ``write`` call carried."""

    def __init__(self, transport: asyncio.Transport, writes: list[bytes]) -> None:
        self._transport = transport
        self._writes = writes

    def write(self, data: bytes) -> None:
        self._writes.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _serve(writes: list[bytes]) -> Callable[[], asyncio.Protocol]:
    config = Config(app=_app, http=CoalescingHttpToolsProtocol, lifespan="off", access_log=False, log_config=None)
    config.load()
    state = ServerState()

    class Recording(CoalescingHttpToolsProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(_RecordingTransport(transport, writes))  # type: ignore[arg-type]

    return lambda: Recording(config=config, server_state=state, app_state={})


async def _exchange(raw: bytes, writes: list[bytes]) -> bytes:
    """Send ``raw`` to a fresh server and read until the server closes the connection (or 2 s of silence)."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_serve(writes), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    received = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 2):
            received += chunk
    except TimeoutError:
        pass
    writer.close()
    server.close()
    await server.wait_closed()
    return received


def test_a_response_head_and_body_leave_in_one_write(run: Run[Any]) -> None:
    writes: list[bytes] = []
    received = run(_exchange(b"GET /hello HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n", writes))
    assert len(writes) == 1
    assert received == writes[0]
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert received.endswith(b"\r\n\r\nhello")


def test_pipelined_requests_on_a_kept_alive_connection_are_answered_in_order(run: Run[Any]) -> None:
    writes: list[bytes] = []
    raw = b"GET /first HTTP/1.1\r\nhost: x\r\n\r\nGET /second HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    received = run(_exchange(raw, writes))
    assert received.count(b"HTTP/1.1 200 OK") == 2
    assert received.index(b"\r\n\r\nfirst") < received.index(b"\r\n\r\nsecond")
    assert received.endswith(b"second")


def test_an_answer_the_server_closes_after_is_sent_whole_first(run: Run[Any]) -> None:
    # HTTP/1.0 without keep-alive: uvicorn closes the transport right after the body; close sends what is held.
    writes: list[bytes] = []
    received = run(_exchange(b"GET /bye HTTP/1.0\r\n\r\n", writes))
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert received.endswith(b"\r\n\r\nbye")


def test_a_malformed_request_gets_its_400_before_the_connection_closes(run: Run[Any]) -> None:
    writes: list[bytes] = []
    received = run(_exchange(b"NOT HTTP\r\n\r\n", writes))
    assert received.startswith(b"HTTP/1.1 400 Bad Request\r\n")


async def _coalescing() -> tuple[CoalescingTransport, asyncio.Transport, socket.socket]:
    """A :class:`CoalescingTransport` over a real socket transport of this loop, that transport, and the peer."""
    ours, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
    theirs.setblocking(False)
    return CoalescingTransport(transport, loop), transport, theirs


async def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 65536), 2):
        data += chunk
    return data


def test_writes_of_one_loop_step_are_held_until_the_step_ends_and_counted_as_buffered(run: Run[Any]) -> None:
    async def scenario() -> tuple[int, int, bytes]:
        coalescing, _, peer = await _coalescing()
        coalescing.write(b"head ")
        coalescing.write(memoryview(b"body"))
        held = coalescing.get_write_buffer_size()
        await asyncio.sleep(0)
        after_step = coalescing.get_write_buffer_size()
        coalescing.close()
        return held, after_step, await _read_all(peer)

    held, after_step, received = run(scenario())
    assert (held, after_step, received) == (9, 0, b"head body")


def test_an_aborted_connection_sends_nothing_it_held(run: Run[Any]) -> None:
    async def scenario() -> bytes:
        coalescing, _, peer = await _coalescing()
        coalescing.write(b"never sent")
        coalescing.abort()
        await asyncio.sleep(0)
        return await _read_all(peer)

    assert run(scenario()) == b""


def test_writes_after_close_are_dropped(run: Run[Any]) -> None:
    async def scenario() -> bytes:
        coalescing, _, peer = await _coalescing()
        coalescing.write(b"last words")
        coalescing.close()
        coalescing.write(b" and more")
        await asyncio.sleep(0)
        return await _read_all(peer)

    assert run(scenario()) == b"last words"


def test_held_writes_reaching_the_limit_are_sent_at_once(run: Run[Any]) -> None:
    async def scenario() -> tuple[int, bytes]:
        coalescing, transport, peer = await _coalescing()
        coalescing.write(b"h" * 10)
        coalescing.write(b"b" * MAX_HELD_BYTES)
        held = coalescing.get_write_buffer_size() - transport.get_write_buffer_size()
        arrived = peer.recv(2 * MAX_HELD_BYTES)  # before the loop step ends: it was sent, not held
        coalescing.close()
        return held, arrived + await _read_all(peer)

    held, received = run(scenario())
    assert held == 0
    assert received == b"h" * 10 + b"b" * MAX_HELD_BYTES


def test_the_end_of_the_stream_follows_what_was_held(run: Run[Any]) -> None:
    async def scenario() -> bytes:
        coalescing, _, peer = await _coalescing()
        coalescing.write(b"last bytes")
        coalescing.write_eof()
        received = await _read_all(peer)  # EOF ends it: written after the held bytes
        coalescing.close()
        return received

    assert run(scenario()) == b"last bytes"


def test_the_gunicorn_worker_serves_with_the_coalescing_protocol() -> None:
    config = Config(app=_app, **ApiWorker.CONFIG_KWARGS)
    config.load()
    assert config.http_protocol_class is CoalescingHttpToolsProtocol
