"""The built-in webhook receiver: a minimal HTTP/1.1 server (keep-alive) in its own process.

It answers every POST with 200 and, for a body with an ``executed_at`` (the seed's ``trade_executed`` event),
records receipt wall time - ``executed_at`` (fill → webhook latency) and each order's earliest ``executed_at``
(order → fill, with the senders' send times). Events executed before the measured run started are counted but not
timed. Signatures are not verified: this measures delivery, not authentication.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec

from ops.bench.http import install_uvloop
from ops.bench.priority import raise_priority

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


@dataclass
class ReceiverResult:
    received: int = 0
    by_event: dict[str, int] = field(default_factory=dict)
    fill_to_webhook_ms: list[float] = field(default_factory=list)
    first_fill_at: dict[str, float] = field(default_factory=dict)
    """Each order's earliest fill (its ``trade_executed`` body's ``executed_at``, epoch s), by ``order_id``."""
    fill_event_ids: set[str] = field(default_factory=set)
    """``event_id`` of every timed ``trade_executed`` webhook (a redelivery counts once): compared after the run with
    the fills the exchange made (:mod:`ops.bench.fills`)."""
    first_at: float = 0.0  # wall time of the first timed webhook
    last_at: float = 0.0
    bad_requests: int = 0
    cpu_s: float = 0.0
    """CPU seconds (user + system) the receiver process used from the run's start to its stop, the webhook grace
    included (0 when it stopped before the run started)."""


class _State:
    def __init__(self, since_wall: Any) -> None:
        self.since_wall = since_wall  # a shared double (multiprocessing RawValue): the run's start, wall time
        self.result = ReceiverResult()

    def record(self, body: bytes, now: float) -> None:
        result = self.result
        result.received += 1
        try:
            doc = msgspec.json.decode(body)
        except msgspec.DecodeError:
            result.bad_requests += 1
            return
        if not isinstance(doc, dict):
            result.bad_requests += 1
            return
        event = str(doc.get("event", doc.get("type", "?")))
        result.by_event[event] = result.by_event.get(event, 0) + 1
        executed = doc.get("executed_at")
        if not isinstance(executed, str):
            return
        try:
            executed_at = datetime.fromisoformat(executed).timestamp()
        except ValueError:
            result.bad_requests += 1
            return
        if executed_at < self.since_wall.value:
            return
        result.fill_to_webhook_ms.append((now - executed_at) * 1000.0)
        event_id = doc.get("event_id")
        if isinstance(event_id, str):
            result.fill_event_ids.add(event_id)
        order_id = doc.get("order_id")
        if isinstance(order_id, str) and executed_at < result.first_fill_at.get(order_id, float("inf")):
            result.first_fill_at[order_id] = executed_at
        if not result.first_at:
            result.first_at = now
        result.last_at = now


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


def receiver_main(port: int, since_wall: Any, stop: Any, ready: Any, queue: Any, progress: Any, nice: int = 0) -> None:
    """multiprocessing target. ``stop``/``ready``: Events; ``since_wall``: shared double, webhooks of fills
    executed before it are not timed; ``progress``: shared int, webhooks received so far; ``nice``: as the
    senders' (:mod:`ops.bench.priority`), so that receipt times are not the receiver's own waits for a core."""
    parent = os.getppid()
    raise_priority(nice)  # a session of its own: a signal to the bench's process group no longer reaches it
    install_uvloop()
    queue.put(asyncio.run(_serve(port, since_wall, stop, ready, progress, parent)))


async def _serve(port: int, since_wall: Any, stop: Any, ready: Any, progress: Any, parent: int) -> ReceiverResult:
    """Serve until ``stop`` is set, or until the bench (``parent``) is gone without setting it (killed)."""
    state = _State(since_wall)
    server = await asyncio.start_server(
        lambda r, w: _handle(state, r, w), "127.0.0.1", port, backlog=1024, limit=1 << 20
    )
    ready.set()
    cpu_at_start: float | None = None
    while not stop.is_set() and os.getppid() == parent:
        progress.value = state.result.received
        if cpu_at_start is None and time.time() >= since_wall.value:
            cpu_at_start = time.process_time()  # the run started (the setup's registrations cost little)
        await asyncio.sleep(0.1)
    server.close()
    # Up to the stop: the webhooks of the run's fills arriving in the grace after it are the run's work too.
    state.result.cpu_s = 0.0 if cpu_at_start is None else time.process_time() - cpu_at_start
    return state.result
