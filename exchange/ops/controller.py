"""Routes of the ops surfaces: ``/ops``, ``/ops/data.json``, ``/ops/login`` and ``/metrics``.

``/metrics`` needs no key (it holds counts, never ids or secrets) so Prometheus can scrape it; expose the api
port only to trusted networks, as for ``/health``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable
from typing import Annotated, Any
from urllib.parse import unquote

from litestar import Controller, MediaType, Request, Response, get
from litestar.datastructures import Cookie
from litestar.params import QueryParameter
from litestar.response import Redirect

from exchange.api.auth import configured_admin_key, key_matches
from exchange.api.dependencies import API, Api
from exchange.api.errors import ADMIN_ERRORS, error_responses, unauthorized
from exchange.observability.metrics import CONTENT_TYPE, exposition, state_registry
from exchange.ops import data, page
from exchange.ops.auth import COOKIE_MAX_AGE_S, COOKIE_NAME, COOKIE_PATH, ops_guard, session_token

log = logging.getLogger("exchange.ops")


def _snapshot(api: Api) -> Awaitable[dict[str, Any]]:
    """The process's ops snapshot: one read per page refresh interval, shared by every tab and by data.json."""
    return api.ops_snapshot.get(lambda: data.snapshot(api.pool, api.redis, api.names.get, api.settings.partitions))


def is_ops_path(path: str) -> bool:
    """Whether ``path`` is ``/ops`` or a path under ``/ops/`` that a browser resolves to itself: no empty (``//``),
    ``.`` or ``..`` segment, plain or percent-encoded in up to 3 layers (a path still changing after 4 decodings is
    refused), no backslash (browsers read it as ``/``), no control character. Strict: a ``..`` anywhere, query
    included, refuses the whole path, and so does a query on ``/ops`` itself (``/ops?x=1``): refused means the
    redirect goes to ``/ops``."""
    decoded = path
    for _ in range(4):
        decoded, previous = unquote(decoded), decoded
        if decoded == previous:
            break
    else:
        return False  # still changing after 4 decodings
    if any(p != "/ops" and not p.startswith("/ops/") for p in (path, decoded)):
        return False
    if "//" in decoded or "\\" in decoded or any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
        return False
    return not any(piece in (".", "..") for piece in re.split(r"[/?#;]", decoded))


class OpsController(Controller):
    path = "/ops"
    dependencies = API

    @get("/", guards=[ops_guard], media_type=MediaType.HTML, responses=error_responses(*ADMIN_ERRORS))
    async def page(self, api: Api) -> str:
        """The ops page (HTML)."""
        return page.render(await _snapshot(api))

    @get("/data.json", guards=[ops_guard], responses=error_responses(*ADMIN_ERRORS))
    async def data_json(self, api: Api) -> dict[str, Any]:
        """The ops snapshot the page shows, as JSON."""
        return await _snapshot(api)

    @get(
        "/login",
        status_code=303,
        responses=error_responses("unauthorized", "validation_error", "admin_disabled"),
    )
    async def login(
        self,
        request: Request[Any, Any, Any],
        key: Annotated[str, QueryParameter(max_length=512)],
        next_path: Annotated[str, QueryParameter(name="next", max_length=512)] = "/ops",
    ) -> Redirect:
        """Browser login: a valid admin key sets the ops cookie and redirects to ``next`` (an /ops path)."""
        expected = configured_admin_key(request)
        if not key_matches(key, expected):
            raise unauthorized("invalid admin key")
        target = next_path if is_ops_path(next_path) else "/ops"
        cookie = Cookie(
            key=COOKIE_NAME,
            value=session_token(expected, int(time.time())),
            path=COOKIE_PATH,
            max_age=COOKIE_MAX_AGE_S,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return Redirect(path=target, status_code=303, cookies=[cookie])


class MetricsController(Controller):
    path = "/metrics"
    dependencies = API

    @get("/", media_type=CONTENT_TYPE, responses=error_responses())
    async def metrics(self, api: Api) -> Response[bytes]:
        """Prometheus exposition: every api worker's counters/histograms plus gauges read at scrape time: pending
        commands per partition from Postgres (at most once per :data:`~exchange.ops.data.GAUGES_TTL_S` per process,
        shared by concurrent scrapes), queue depths from Redis. A failing source omits its gauges, never the rest."""
        pending: list[tuple[int, int, float]] = []
        try:
            rows = await api.pending_gauges.get(
                lambda: asyncio.wait_for(
                    data.pending_by_partition(api.pool, api.settings.partitions), data.READ_TIMEOUT_S
                )
            )
            pending = [(r["partition"], r["pending"], r["oldest_age_s"]) for r in rows]
        except Exception as exc:
            log.warning("metrics: pending commands unavailable: %s", exc.__class__.__name__)
        depths = await data.queue_depths_or_none(api.redis, api.names.get, api.settings.partitions)
        queues = [(d["queue"], state, d[state]) for d in depths or () for state in ("ready", "delayed", "dead")]
        body = await asyncio.to_thread(exposition, state_registry(pending, queues))
        return Response(body, media_type=CONTENT_TYPE)
