"""Routes of the ops surfaces: ``/ops``, ``/ops/data.json``, ``/ops/login`` and ``/metrics``.

``/metrics`` needs no key (it holds counts, never ids or secrets) so Prometheus can scrape it; expose the api
port only to trusted networks, as for ``/health``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated, Any

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


class OpsController(Controller):
    path = "/ops"
    dependencies = API

    @get("/", guards=[ops_guard], media_type=MediaType.HTML, responses=error_responses(*ADMIN_ERRORS))
    async def page(self, api: Api) -> str:
        """The ops page (HTML)."""
        return page.render(await data.snapshot(api.pool, api.redis, api.settings.partitions))

    @get("/data.json", guards=[ops_guard], responses=error_responses(*ADMIN_ERRORS))
    async def data_json(self, api: Api) -> dict[str, Any]:
        """The ops snapshot the page shows, as JSON."""
        return await data.snapshot(api.pool, api.redis, api.settings.partitions)

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
        target = next_path if next_path.startswith("/ops") and "//" not in next_path else "/ops"
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
        """Prometheus exposition: every api worker's counters/histograms plus gauges read now from Postgres and
        Redis (pending commands per partition, queue depths). A failing source omits its gauges, never the rest."""
        pending: list[tuple[int, int, float]] = []
        try:
            rows = await asyncio.wait_for(
                data.pending_by_partition(api.pool, api.settings.partitions), data.READ_TIMEOUT_S
            )
            pending = [(r["partition"], r["pending"], r["oldest_age_s"]) for r in rows]
        except Exception as exc:
            log.warning("metrics: pending commands unavailable: %s", exc.__class__.__name__)
        depths = await data.queue_depths_or_none(api.redis, api.settings.partitions)
        queues = [(d["queue"], state, d[state]) for d in depths or () for state in ("ready", "delayed", "dead")]
        body = await asyncio.to_thread(exposition, state_registry(pending, queues))
        return Response(body, media_type=CONTENT_TYPE)
