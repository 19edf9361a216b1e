"""The request id of the work being done, for logs (never for decisions).

The api sets it per request (``X-Request-ID`` or a generated id); dramatiq actors set it from the message's
``request_id`` option. It is a :class:`contextvars.ContextVar`, so concurrent requests and threads never see each
other's ids.
"""

from __future__ import annotations

import contextvars
import itertools
import os
import re
import secrets

REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID_LENGTH = 128
_SAFE = re.compile(r"\A[A-Za-z0-9._:/+=@-]+\Z")

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def current_request_id() -> str | None:
    return request_id_var.get()


class _RequestIds:
    """32 lower-case hex digits, the shape of a UUID4's ``hex``: 16 random to this process, 16 of a counter.

    Unique without a system call per id (``uuid.uuid4`` reads ``os.urandom`` every time: ~3.5 µs of the api's
    ~250 µs for a plain request on the project's machines): a forked child draws a new prefix before it runs."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self.prefix = secrets.token_hex(8)
        self.counter = itertools.count()

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


_request_ids = _RequestIds()


def new_request_id() -> str:
    return _request_ids.next()


def accept_request_id(raw: str | None) -> str:
    """The client's request id when it is short and plain (it ends up in log lines), else a fresh one."""
    if raw and len(raw) <= MAX_REQUEST_ID_LENGTH and _SAFE.match(raw):
        return raw
    return new_request_id()
