"""Operator surfaces served by the api under ``/ops`` (admin key) and ``/metrics``.

* ``/ops`` — the exchange's own ops page (server-rendered HTML, refreshes itself); ``/ops/data.json`` — the same
  snapshot as JSON (:mod:`exchange.ops.data`).
* ``/ops/dramatiq`` — dramatiq-dashboard (a WSGI app) mounted through a2wsgi (:mod:`exchange.ops.dashboard`).
* ``/ops/login?key=<admin key>`` — for browsers: sets an HttpOnly cookie and redirects (:mod:`exchange.ops.auth`).
* ``/metrics`` — Prometheus exposition of every api worker plus scrape-time gauges (:mod:`exchange.ops.controller`).
"""
