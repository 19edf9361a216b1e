"""The built-in webhook receiver: a minimal HTTP/1.1 server (keep-alive) in its own process.

It answers every POST with 200 and, for a body with an ``executed_at`` (the seed's ``trade_executed`` event),
records receipt wall time - ``executed_at`` (fill → webhook latency). Events executed before the measured run
started are counted but not timed. Signatures are not verified: this measures delivery, not authentication.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


@dataclass
class ReceiverResult:
    received: int = 0
    by_event: dict[str, int] = field(default_factory=dict)
    fill_to_webhook_ms: list[float] = field(default_factory=list)
    first_at: float = 0.0  # wall time of the first timed webhook
    last_at: float = 0.0
    bad_requests: int = 0


class _State:
    def __init__(self, since_wall: Any) -> None:
        self.since_wall = since_wall  # a shared double (multiprocessing RawValue): the run's start, wall time
        self.received = 0
        self.by_event: dict[str, int] = defaultdict(int)
        self.latencies: list[float] = []
        self.first_at = 0.0
        self.last_at = 0.0
        self.bad = 0

    def record(self, body: bytes, now: float) -> None:
        self.received += 1
        try:
            doc = msgspec.json.decode(body)
        except msgspec.DecodeError:
            self.bad += 1
            return
        if not isinstance(doc, dict):
            self.bad += 1
            return
        self.by_event[str(doc.get("event", doc.get("type", "?")))] += 1
        executed = doc.get("executed_at")
        if not isinstance(executed, str):
            return
        try:
            executed_at = datetime.fromisoformat(executed).timestamp()
        except ValueError:
            self.bad += 1
            return
        if executed_at < self.since_wall.value:
            return
        self.latencies.append((now - executed_at) * 1000.0)
        if not self.first_at:
            self.first_at = now
        self.last_at = now


async def _handle(state: _State, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            close = False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection":
                    close = b"close" in value.lower()
            body = await reader.readexactly(length) if length else b""
            state.record(body, time.time())
            writer.write(OK)
            if close:
                break
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError):
        pass
    except asyncio.CancelledError:
        pass  # shutting down with the connection open: nothing to report
    finally:
        with contextlib.suppress(Exception):
            writer.close()


def receiver_main(port: int, since_wall: Any, stop: Any, ready: Any, queue: Any, progress: Any) -> None:
    """multiprocessing target. ``stop``/``ready``: Events; ``since_wall``: shared double, webhooks of fills
    executed before it are not timed; ``progress``: shared int, webhooks received so far."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    queue.put(asyncio.run(_serve(port, since_wall, stop, ready, progress)))


async def _serve(port: int, since_wall: Any, stop: Any, ready: Any, progress: Any) -> ReceiverResult:
    state = _State(since_wall)
    server = await asyncio.start_server(
        lambda r, w: _handle(state, r, w), "127.0.0.1", port, backlog=1024, limit=1 << 20
    )
    ready.set()
    while not stop.is_set():
        progress.value = state.received
        await asyncio.sleep(0.1)
    server.close()
    return ReceiverResult(
        received=state.received,
        by_event=dict(state.by_event),
        fill_to_webhook_ms=state.latencies,
        first_at=state.first_at,
        last_at=state.last_at,
        bad_requests=state.bad,
    )
