"""The generator's accounting against real HTTP on 127.0.0.1: every request's latency counts, timeouts included;
the open loop's rate is over the time the answers took; order -> fill from the webhooks the receiver got."""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import time
import urllib.request
from collections import Counter
from datetime import UTC, datetime

import pytest

from ops.bench import model as m
from ops.bench.http import HttpError, Pool
from ops.bench.main import add_arguments, ceiling_server, free_port
from ops.bench.receiver import ReceiverResult, receiver_main
from ops.bench.report import build_report
from ops.bench.runner import WorkerConfig, WorkerResult, _Sender

BODY = b'{"order_id":"o-1","status":"pending"}\n'
ANSWER = b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY)


async def _serve(answered: int) -> tuple[asyncio.Server, int]:
    """Answers the first ``answered`` requests at once; every later one never."""
    seen = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal seen
        while await reader.readuntil(b"\r\n\r\n"):
            seen += 1
            if seen > answered:
                await asyncio.sleep(3600)
            writer.write(ANSWER)
            await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _send_orders(n: int, answered: int, timeout_s: float) -> WorkerResult:
    model = m.build_model(20, 1, "ACCT")
    event = m.Event(0.0, m.ORDER, 0, 0, 0, 0, m.PASSIVE, 100, 100)
    result = WorkerResult(0)

    async def run() -> None:
        server, port = await _serve(answered)
        pool = Pool(f"http://127.0.0.1:{port}", timeout_s=timeout_s, max_connections=n)
        cfg = WorkerConfig(0, f"http://127.0.0.1:{port}", {0: b""}, model, [], time.monotonic(), 1.0, timeout_s, 1)
        sender = _Sender(cfg, pool, result)
        for _ in range(answered):  # one at a time: these are the fast ones
            await sender.send(event, time.monotonic())
        await asyncio.gather(*(sender.send(event, time.monotonic()) for _ in range(n - answered)))
        pool.close()
        server.close()

    asyncio.run(run())
    return result


def _report(result: WorkerResult, duration_s: float) -> dict[str, object]:
    return build_report(
        mode="open_loop",
        config={},
        model=m.build_model(20, 1, "ACCT"),
        scheduled={},
        duration_s=duration_s,
        results=[result],
        receiver=None,
        setup={},
    )


def test_requests_that_time_out_count_in_the_latency_percentiles_at_their_timeout() -> None:
    result = _send_orders(20, answered=10, timeout_s=0.2)

    endpoint = _report(result, 1.0)["endpoints"]["POST /orders"]  # type: ignore[index]

    assert endpoint["statuses"] == {"201": 10, "timeout": 10}
    assert endpoint["p99_ms"] >= 200  # the successes alone: a few ms
    assert endpoint["max_ms"] >= 200


def test_the_open_loop_rate_is_over_the_send_span_and_the_wait_for_the_last_answer_is_reported_apart() -> None:
    result = WorkerResult(0, orders_accepted=1400, elapsed_s=28.0)  # 20 s of sends, the last answer at 28 s

    report = _report(result, 20.0)  # was 50.0 over the 28 s: one straggler could cut every rate by ~40 %

    assert (report["accepted_orders_per_s"], report["drain_tail_s"], report["duration_s"]) == (70.0, 8.0, 20.0)


def test_order_to_fill_times_each_market_order_to_its_first_fill_whatever_its_201_said() -> None:
    ctx = multiprocessing.get_context("fork")
    stop, ready, results, progress = ctx.Event(), ctx.Event(), ctx.Queue(), ctx.RawValue("q", 0)
    sent = time.time()
    port = free_port()
    receiver = ctx.Process(
        target=receiver_main, args=(port, ctx.RawValue("d", sent - 1), stop, ready, results, progress, 0)
    )
    receiver.start()
    assert ready.wait(10)
    for order_id, after_s in (("taker", 0.5), ("taker", 0.4), ("maker", 0.3)):  # two fills of one order
        body = {"event": "trade_executed", "order_id": order_id, "executed_at": _iso(sent + after_s)}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/hook", data=json.dumps(body).encode()) as answer:
            assert answer.status == 200
    stop.set()
    received: ReceiverResult = results.get(timeout=10)
    receiver.join(10)
    senders = WorkerResult(0, market_orders=[("taker", sent), ("never-filled", sent)])  # its 201 said pending

    timed = build_report(
        mode="open_loop",
        config={},
        model=m.build_model(20, 1, "ACCT"),
        scheduled={},
        duration_s=1.0,
        results=[senders],
        receiver=received,
        setup={},
    )["order_to_fill"]

    assert (timed["count"], timed["orders"], timed["not_filled"]) == (1, 2, 1)
    assert 399 <= timed["p50_ms"] <= 401


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat()


def test_a_kept_alive_connection_lost_with_its_server_frees_its_slot_once() -> None:
    async def run() -> tuple[int, int]:
        server, port = await _serve(answered=1)
        pool = Pool(f"http://127.0.0.1:{port}", timeout_s=2.0, max_connections=4)
        await pool.request("GET", "/balance")  # its connection is kept alive, idle
        server.close()
        await server.wait_closed()
        pool.idle[0].writer.transport.abort()  # the server's end of it is gone: write or read fails, as a reset does
        with pytest.raises(HttpError):
            await pool.request("GET", "/balance")  # retried on a new connection, which is refused
        return pool.open_now, len(pool.idle)

    assert asyncio.run(run()) == (0, 0)


def test_a_new_order_is_not_sent_again_when_its_kept_alive_connection_fails() -> None:
    async def run() -> int:
        received = 0

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal received
            await reader.readuntil(b"\r\n\r\n")
            received += 1
            if received == 1:
                writer.write(ANSWER)
                await writer.drain()
                await reader.readuntil(b"\r\n\r\n")  # the second request on this connection: taken, then dropped
                received += 1
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        pool = Pool(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", timeout_s=2.0)
        await pool.request("POST", "/orders", body=b"{}", retry=False)
        with pytest.raises(HttpError):
            await pool.request("POST", "/orders", body=b"{}", retry=False)
        await asyncio.sleep(0.1)
        server.close()
        return received

    assert asyncio.run(run()) == 2  # the server got it once: a retry would have placed it twice


def test_the_ceiling_runs_on_the_exchanges_own_database_server_unless_told() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    server = "postgresql://u@db.example:6000/exchange?host=/sock"

    own = ceiling_server(parser.parse_args(["--database-url", server]))
    told = ceiling_server(parser.parse_args(["--database-url", server, "--pg-url", "postgresql://p@h/postgres"]))

    assert (own, told) == ("postgresql://u@db.example:6000/postgres?host=/sock", "postgresql://p@h/postgres")


def test_a_short_runs_schedule_has_the_models_cancel_and_read_shares() -> None:
    model = m.build_model(100, 1, "ACCT")

    before, run = m.pre_run(m.build_schedule(model, 20.0, 1))

    kinds = Counter(e.kind for e in run)
    reads = sum(kinds[k] for k in (m.GET_ORDER, m.PRICE, m.BOOK, m.BALANCE))
    assert abs(kinds[m.CANCEL] / kinds[m.ORDER] - 0.35) < 0.02  # was 0.13: most cancels come minutes later
    assert abs(reads / len(run) - 0.28) < 0.01
    assert all(e.kind == m.ORDER and e.order_no < -1 for e in before)  # placed in the setup
    cancelled = {e.order_no for e in run if e.kind == m.CANCEL}
    assert {e.order_no for e in before} <= cancelled  # each one is cancelled in the run
