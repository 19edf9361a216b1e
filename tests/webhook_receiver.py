"""A real HTTP webhook receiver for tests: a ThreadingHTTPServer on 127.0.0.1 in a background thread.

It records every request (path, headers, body) and answers by the current behaviour: ``fail_next(n)`` answers
the next ``n`` requests with ``status``; ``gone()`` answers 410; ``hang()`` holds every request open until
``release()`` (or stop); ``delay_s`` slows every answer; ``answer_body`` replaces every answer's body. ``stop()``
(also on ``with`` exit) ends it; it can be started again on the same port (``start(port=...)``) to simulate a
receiver that comes back.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # the sender hung up mid-request (a webhooks worker killed by a fault test): not an error here
        super().handle_error(request, client_address)


class Receiver:
    def __init__(self) -> None:
        self.received: list[Received] = []
        self.lock = threading.Lock()
        self.failures_left = 0
        self.failure_status = 500
        self.always_status: int | None = None
        self.delay_s = 0.0
        self.answer_body: bytes | None = None
        """The body of every answer when set (else a small JSON object saying whether it was taken)."""
        self.open = threading.Event()
        """Cleared by ``hang()``: requests wait for it (at most 30 s) before they are answered."""
        self.open.set()
        self.server: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None
        self.port = 0

    # ------------------------------------------------------------------------------------------ control

    def fail_next(self, n: int, status: int = 500) -> None:
        with self.lock:
            self.failures_left = n
            self.failure_status = status

    def gone(self) -> None:
        self.always_status = 410

    def hang(self) -> None:
        self.open.clear()

    def release(self) -> None:
        self.open.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def accepted(self) -> list[Received]:
        """Requests answered 2xx."""
        with self.lock:
            return [r for r in self.received if r.status < 300]

    def bodies(self) -> list[dict[str, Any]]:
        return [r.json for r in self.accepted()]

    def event_ids(self) -> set[str]:
        return {b["event_id"] for b in self.bodies()}

    # ------------------------------------------------------------------------------------------ serving

    def _answer(self) -> int:
        with self.lock:
            if self.always_status is not None:
                return self.always_status
            if self.failures_left > 0:
                self.failures_left -= 1
                return self.failure_status
        return 200

    def start(self, port: int = 0) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real receivers do

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                receiver.open.wait(30)
                if receiver.delay_s:
                    time.sleep(receiver.delay_s)
                status = receiver._answer()
                with receiver.lock:
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    receiver.received.append(Received(self.path, headers, body, status))
                answer = receiver.answer_body
                if answer is None:
                    answer = b'{"ok":true}' if status < 300 else b'{"error":"nope"}'
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:  # silence per-request logs
                pass

        self.server = _Server(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.release()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        if self.thread is not None:
            self.thread.join(5)
            self.thread = None

    def __enter__(self) -> Receiver:
        return self if self.server is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
