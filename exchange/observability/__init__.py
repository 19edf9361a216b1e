"""Observability shared by every process kind: JSON logs with request ids, Prometheus metrics.

* :mod:`~exchange.observability.context` — the current request id (a contextvar).
* :mod:`~exchange.observability.logs` — :func:`configure_logging` (JSON or text lines, one per event).
* :mod:`~exchange.observability.requests` — the api's ASGI middleware: ``X-Request-ID``, ``X-Process-Time``,
  one access line per request, slow-request warnings, request metrics.
* :mod:`~exchange.observability.propagation` — dramatiq middleware carrying the request id from the api into the
  matcher's logs (webhook deliveries are claimed in batches: their lines carry no request id).
* :mod:`~exchange.observability.metrics` — every metric object, by name, and the exposition helpers.
"""
