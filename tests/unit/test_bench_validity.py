"""What makes an ``exchange bench`` run valid, and what its rates and lags count: the generator's own waits, the
requests it did not send, the late answers, the fills whose webhooks never came; its connection pool's reuse of
idle connections (where ``--ceiling`` runs: tests/integration/test_bench_ceiling.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
import uvloop

from exchange.config import Settings
from ops.bench import model as m
from ops.bench import runner
from ops.bench.fills import PAGE, fetch_fills
from ops.bench.http import Pool
from ops.bench.main import add_arguments, resolve_defaults
from ops.bench.receiver import ReceiverResult
from ops.bench.report import build_report
from ops.bench.runner import WorkerConfig, WorkerResult, _Sender

BODY = b'{"order_id":"o-1","status":"pending"}'
ANSWER = b"HTTP/1.1 201 Created\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY)
MODEL = m.build_model(20, 1, "VALI")


async def _server(delay_s: float, *, close_after_answer: bool = False) -> tuple[asyncio.Server, str]:
    """Answers every request after ``delay_s``; ``close_after_answer``: then closes the connection, as a server
    closes an idle kept-alive one."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:") and int(line.split(b":")[1]):
                        await reader.readexactly(int(line.split(b":")[1]))
                if delay_s:
                    await asyncio.sleep(delay_s)
                writer.write(ANSWER)
                await writer.drain()
                if close_after_answer:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def _report(
    result: WorkerResult,
    duration_s: float,
    receiver: ReceiverResult | None = None,
    fills_made: dict[str, str] | None = None,
) -> dict[str, Any]:
    return build_report(
        mode="open_loop",
        config={},
        model=MODEL,
        scheduled={},
        duration_s=duration_s,
        results=[result],
        receiver=receiver,
        setup={},
        fills_made=fills_made,
    )


def _open_loop(
    events: list[m.Event], delay_s: float, max_connections: int, *, on_uvloop: bool = False, timeout_s: float = 5.0
) -> WorkerResult:
    result = WorkerResult(0)

    async def run() -> None:
        server, url = await _server(delay_s)
        auth = dict.fromkeys(range(MODEL.brokers), b"")
        duration = events[-1].t + 0.01
        cfg = WorkerConfig(0, url, auth, MODEL, events, time.monotonic() + 0.2, duration, timeout_s, 1)
        cfg.warm_connections, cfg.max_connections = min(4, max_connections), max_connections
        await runner._open_loop(cfg, result)
        server.close()

    if on_uvloop:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as loop_runner:
            loop_runner.run(run())
    else:
        asyncio.run(run())
    return result


def _orders(n: int, gap_s: float) -> list[m.Event]:
    return [m.Event(i * gap_s, m.ORDER, 0, i, 0, 0, m.PASSIVE, 100, 100) for i in range(n)]


def test_a_wait_for_one_of_the_generators_own_connections_is_schedule_lag_and_invalidates_the_run() -> None:
    result = _open_loop(_orders(20, 0.01), delay_s=0.05, max_connections=1)  # 50 ms answers, one every 10 ms

    report = _report(result, 0.2)

    assert result.waited_for_connection > 0
    assert report["schedule_lag"]["p99_ms"] > 100  # was ~0: lag taken before the wait
    assert report["valid"] is False
    assert any("schedule lag" in r for r in report["invalid_reasons"])


def test_requests_not_sent_for_want_of_an_answered_order_make_the_run_invalid() -> None:
    result = WorkerResult(0, skipped={"POST /orders/{id}/cancel": 10, "GET /orders/{id}": 26})

    report = _report(result, 1.0)

    assert report["valid"] is False
    assert any("36 scheduled requests not sent" in r for r in report["invalid_reasons"])


def test_a_cancel_scheduled_before_its_order_was_answered_waits_for_the_answer_and_is_sent() -> None:
    order = m.Event(0.0, m.ORDER, 0, 0, 0, 0, m.PASSIVE, 100, 100)
    cancel = m.Event(0.05, m.CANCEL, 0, 0, 0)  # 50 ms after its order, which is answered after 200 ms

    result = _open_loop([order, cancel], delay_s=0.2, max_connections=4)
    report = _report(result, 0.1)

    assert result.skipped == {}  # was {'POST /orders/{id}/cancel': 1}: not sent, the run invalid
    assert result.waited_for_order == 1
    assert result.statuses["POST /orders/{id}/cancel"] == {"201": 1}
    assert min(result.latencies_ms["POST /orders/{id}/cancel"]) > 300  # from its schedule: the order's wait too
    assert report["schedule_lag"]["p99_ms"] < 50  # the wait for the order's answer is the server's, not lag
    assert report["cancels_that_waited_for_their_order"] == 1


def test_a_cancel_that_waited_for_its_order_times_out_at_the_timeout_counted_from_its_schedule() -> None:
    order = m.Event(0.0, m.ORDER, 0, 0, 0, 0, m.PASSIVE, 100, 100)
    cancel = m.Event(0.1, m.CANCEL, 0, 0, 0)  # its order answered after 0.8 s; 0.2 s of its 1-s timeout left then

    result = _open_loop([order, cancel], delay_s=0.8, max_connections=4, timeout_s=1.0)

    # Was lost from the results: its own request got a whole new timeout and outlived the run's end.
    assert result.statuses["POST /orders/{id}/cancel"] == {"timeout": 1}
    assert 1000 <= result.latencies_ms["POST /orders/{id}/cancel"][0] < 1300


def test_a_status_read_before_any_answered_order_of_the_run_reads_an_order_of_the_setup() -> None:
    cfg = WorkerConfig(0, "http://127.0.0.1:1", {3: b""}, MODEL, [], 0.0, 1.0, 1.0, 1, known_before={3: ["s-1"]})
    sender = _Sender(cfg, Pool(cfg.base_url), WorkerResult(0))

    request = sender._request_for(m.Event(0.0, m.GET_ORDER, 3, -1, 0))

    assert request == ("GET", "/orders/s-1", None)


def test_fills_whose_webhook_never_came_invalidate_the_run_and_are_told_apart_from_orders_without_a_fill() -> None:
    now = time.time()
    receiver = ReceiverResult(
        received=1, fill_to_webhook_ms=[5.0], first_fill_at={"taker": now + 0.01}, fill_event_ids={"e-taker"}
    )
    senders = WorkerResult(0, market_orders=[("taker", now), ("late", now), ("no-liquidity", now)])
    made = {"e-taker": "taker", "e-maker": "maker", "e-late": "late"}

    report = _report(senders, 1.0, receiver=receiver, fills_made=made)

    webhooks, to_fill = report["webhooks"], report["order_to_fill"]
    assert (webhooks["fills_made"], webhooks["fills_without_webhook"]) == (3, 2)
    assert (to_fill["not_filled"], to_fill["not_filled_no_fill"], to_fill["not_filled_webhook_missing"]) == (2, 1, 1)
    assert report["valid"] is False


def test_the_fills_made_are_read_from_every_page_of_each_brokers_event_log() -> None:
    since = time.time()
    late, early = "2100-01-01T00:00:00+00:00", "2000-01-01T00:00:00+00:00"
    log = [
        {"event": "trade_executed", "event_id": f"e{i}", "order_id": f"o{i}", "executed_at": late}
        for i in range(PAGE + 5)
    ]
    log.insert(3, {"event": "trade_executed", "event_id": "old", "order_id": "o", "executed_at": early})
    log.insert(7, {"event": "order_cancelled", "event_id": "c", "order_id": "o", "occurred_at": late})

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                query = head.split(b" ")[1].decode().split("?")[1]
                params = dict(p.split("=") for p in query.split("&"))
                after, limit = int(params["after"]), int(params["limit"])
                page = [{"sequence": after + 1 + i, "payload": e} for i, e in enumerate(log[after : after + limit])]
                body = json.dumps({"items": page, "next_after": page[-1]["sequence"] if page else after}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        except asyncio.IncompleteReadError:
            writer.close()

    async def run() -> dict[str, str]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        fills = await fetch_fills(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", {0: b""}, since)
        server.close()
        return fills

    fills = asyncio.run(run())

    assert len(fills) == PAGE + 5
    assert fills[f"e{PAGE + 4}"] == f"o{PAGE + 4}"  # on the second page
    assert "old" not in fills


def test_an_idle_connection_the_server_closed_is_not_used_for_a_new_order() -> None:
    async def run() -> int:
        server, url = await _server(0.0, close_after_answer=True)
        pool = Pool(url, timeout_s=2.0)
        await pool.request("POST", "/orders", body=b"{}", retry=False)
        await asyncio.sleep(0.1)  # the server's close arrives: the idle connection's reader is at EOF
        status, _ = await pool.request("POST", "/orders", body=b"{}", retry=False)  # was HttpError
        pool.close()
        server.close()
        return status

    assert asyncio.run(run()) == 201


def test_a_connection_handed_to_a_waiter_its_timeout_just_cancelled_goes_to_the_next_request() -> None:
    async def run() -> tuple[int, int]:
        server, url = await _server(0.0)
        pool = Pool(url, timeout_s=0.5, max_connections=1)
        conn, _ = await pool._acquire()  # a request holds the only connection
        waiting = asyncio.create_task(pool.request("GET", "/b"))
        await asyncio.sleep(0.01)
        pool._release(conn)  # its answer hands the connection over as the waiter is cancelled, in one iteration
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        status, _ = await pool.request("GET", "/c")  # was a TimeoutError: the only slot had leaked
        open_now = pool.open_now
        pool.close()
        server.close()
        return status, open_now

    assert asyncio.run(run()) == (201, 1)


def test_no_request_is_sent_before_its_scheduled_time_on_uvloop() -> None:
    result = _open_loop(_orders(300, 0.0017), delay_s=0.0, max_connections=8, on_uvloop=True)

    assert len(result.lags_ms) == 300
    assert min(result.lags_ms) >= 0.0  # uvloop's millisecond timers woke ~1/5 of them up to 1.3 ms early


def test_the_exchanges_database_and_redis_default_to_its_settings_dotenv_included(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("EXCHANGE_DATABASE_URL=postgresql://u@db.example:6000/x\nEXCHANGE_REDIS_URL=redis://r:7/1\n")
    monkeypatch.delenv("EXCHANGE_DATABASE_URL", raising=False)
    monkeypatch.delenv("EXCHANGE_REDIS_URL", raising=False)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])

    resolve_defaults(args, Settings.from_env(env_file=dotenv))

    assert (args.database_url, args.redis_url) == ("postgresql://u@db.example:6000/x", "redis://r:7/1")
