"""The request id of the work being done, for logs (never for decisions).

The api sets it per request (``X-Request-ID`` or a generated id); dramatiq actors set it from the message's
``request_id`` option. It is a :class:`contextvars.ContextVar`, so concurrent requests and threads never see each
other's ids.
"""

from __future__ import annotations

import contextvars
import re
import uuid

REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID_LENGTH = 128
_SAFE = re.compile(r"^[A-Za-z0-9._:/+=@-]+$")

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def current_request_id() -> str | None:
    return request_id_var.get()


def new_request_id() -> str:
    return uuid.uuid4().hex


def accept_request_id(raw: str | None) -> str:
    """The client's request id when it is short and plain (it ends up in log lines), else a fresh one."""
    if raw and len(raw) <= MAX_REQUEST_ID_LENGTH and _SAFE.match(raw):
        return raw
    return new_request_id()
