"""The api middleware's per-request helpers: request ids and the HTTP metrics' label children."""

from __future__ import annotations

import os
import re

from exchange.observability import requests
from exchange.observability.context import new_request_id
from exchange.observability.metrics import HTTP_LATENCY, HTTP_REQUESTS


def test_generated_request_ids_are_32_hex_digits_and_distinct() -> None:
    ids = [new_request_id() for _ in range(10_000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_child_generates_ids_under_a_prefix_of_its_own() -> None:
    parent = new_request_id()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: write one id and leave without running the parent's atexit/pytest machinery
        os.write(write_end, new_request_id().encode())
        os._exit(0)
    os.close(write_end)
    child = os.read(read_end, 64).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    assert len(child) == 32
    assert child[:16] != parent[:16]  # the same counter value in both would otherwise repeat an id


def test_each_request_counts_under_its_own_method_route_and_status() -> None:
    route = "/test-observability/{id}"
    ok = HTTP_REQUESTS.labels("GET", route, "200")
    missing = HTTP_REQUESTS.labels("GET", route, "404")
    latency = HTTP_LATENCY.labels("GET", route)
    before = (ok._value.get(), missing._value.get(), latency._sum.get())
    requests._count("GET", route, 200, 0.5)
    requests._count("GET", route, 200, 0.25)
    requests._count("GET", route, 404, 0.125)
    assert ok._value.get() - before[0] == 2
    assert missing._value.get() - before[1] == 1
    assert latency._sum.get() - before[2] == 0.875
