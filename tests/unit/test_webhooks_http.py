"""The webhook HTTP client against real sockets: small asyncio servers on 127.0.0.1 that answer in the ways
receivers do (keep-alive, closing idle connections, chunked, huge, never); and the resolver that gives it the
checked address to connect to (DNS stood in for by a blocking lookup that can hang)."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

from exchange.webhooks import ssrf
from exchange.webhooks.delivery import Resolver
from exchange.webhooks.http import (
    EXCERPT_BYTES,
    Endpoint,
    HttpClient,
    InvalidRequestError,
    ReadTimeoutError,
    RemoteProtocolError,
    Reply,
)

BODY = b'{"event":"trade_executed"}'


@dataclass
class Server:
    """Counts connections and requests; ``answer(writer)`` writes each response, ``close_after`` closes the
    connection after answering (without saying so: an idle keep-alive connection the receiver dropped)."""

    answer: Callable[[asyncio.StreamWriter], Awaitable[None]]
    close_after: bool = False
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                self.requests.append(head)
                await self.answer(writer)
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


async def ok(writer: asyncio.StreamWriter) -> None:
    writer.write(b'HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n{"ok":true}')
    await writer.drain()


def endpoint(port: int, target: bytes = b"/hook", host_header: bytes = b"receiver.example") -> Endpoint:
    return Endpoint("http", "receiver.example", "127.0.0.1", port, target, host_header)


def headers(host: bytes = b"receiver.example") -> list[tuple[bytes, bytes]]:
    return [(b"host", host), (b"content-type", b"application/json")]


def run(server: Server, scenario: Callable[[HttpClient], Awaitable[object]], read_timeout_s: float = 5.0) -> object:
    async def main() -> object:
        listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
        server.port = listener.sockets[0].getsockname()[1]
        client = HttpClient(connect_timeout_s=2.0, read_timeout_s=read_timeout_s)
        try:
            return await scenario(client)
        finally:
            client.close()
            listener.close()

    return asyncio.run(main())


def test_requests_to_one_endpoint_reuse_a_kept_alive_connection() -> None:
    server = Server(ok)

    async def scenario(client: HttpClient) -> object:
        return [await client.post(endpoint(server.port), headers(), BODY) for _ in range(3)]

    replies = run(server, scenario)

    assert [r.status_code for r in replies] == [200, 200, 200]  # type: ignore[attr-defined]
    assert replies[0].excerpt == '{"ok":true}'  # type: ignore[index]
    assert (server.connections, len(server.requests)) == (1, 3)


def test_the_request_goes_to_the_pinned_address_with_the_urls_host_and_path() -> None:
    server = Server(ok)

    async def scenario(client: HttpClient) -> object:
        host = b"hooks.example:8443"  # the URL's; the connection goes to 127.0.0.1, the checked address
        return await client.post(endpoint(server.port, b"/hook?x=1", host), headers(host), BODY)

    run(server, scenario)

    (head,) = server.requests
    assert head.startswith(b"POST /hook?x=1 HTTP/1.1\r\n")
    assert b"\r\nhost: hooks.example:8443\r\n" in head


def test_an_idle_connection_the_receiver_closed_is_replaced_and_the_event_sent_once() -> None:
    server = Server(ok, close_after=True)

    async def scenario(client: HttpClient) -> object:
        first = await client.post(endpoint(server.port), headers(), BODY)
        await asyncio.sleep(0.05)  # the receiver's close reaches the idle connection
        second = await client.post(endpoint(server.port), headers(), BODY)
        return first.status_code, second.status_code

    assert run(server, scenario) == (200, 200)
    assert (server.connections, len(server.requests)) == (2, 2)


def test_an_idle_connection_with_an_unsolicited_answer_is_not_reused_and_that_answer_is_not_the_next_ones() -> None:
    async def ok_then_time_out(writer: asyncio.StreamWriter) -> None:
        await ok(writer)
        await asyncio.sleep(0.02)  # idle a while, then time the connection out as some servers do: 408, then close
        writer.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await writer.drain()

    server = Server(ok_then_time_out, close_after=True)

    async def scenario(client: HttpClient) -> object:
        first = await client.post(endpoint(server.port), headers(), BODY)
        await asyncio.sleep(0.1)  # the 408 and the close reach the idle connection
        second = await client.post(endpoint(server.port), headers(), BODY)
        return first.status_code, second.status_code

    assert run(server, scenario) == (200, 200)
    assert (server.connections, len(server.requests)) == (2, 2)


def test_a_chunked_answer_is_read_and_the_connection_kept() -> None:
    async def chunked(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n5\r\nbusy!\r\n0\r\n\r\n")
        await writer.drain()

    server = Server(chunked)

    async def scenario(client: HttpClient) -> object:
        return [await client.post(endpoint(server.port), headers(), BODY) for _ in range(2)]

    replies = run(server, scenario)

    assert [(r.status_code, r.excerpt) for r in replies] == [(503, "busy!")] * 2  # type: ignore[attr-defined]
    assert server.connections == 1


def test_a_huge_answer_is_cut_short_and_its_connection_not_reused() -> None:
    async def huge(writer: asyncio.StreamWriter) -> None:
        size = 1024 * 1024
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size + b"\x00" * size)
        await writer.drain()

    server = Server(huge)

    async def scenario(client: HttpClient) -> object:
        return [await client.post(endpoint(server.port), headers(), BODY) for _ in range(2)]

    replies = run(server, scenario)

    assert [r.status_code for r in replies] == [200, 200]  # type: ignore[attr-defined]
    assert replies[0].excerpt == "\x00" * EXCERPT_BYTES  # type: ignore[index]  # NULs: replaced by store.record
    assert server.connections == 2


def answering(raw: bytes) -> Callable[[asyncio.StreamWriter], Awaitable[None]]:
    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(raw)
        await writer.drain()

    return answer


def two_posts(server: Server) -> list[Reply]:
    async def scenario(client: HttpClient) -> object:
        return [await client.post(endpoint(server.port), headers(), BODY) for _ in range(2)]

    return run(server, scenario)  # type: ignore[return-value]


def test_an_answer_ended_by_the_connection_closing_is_read_and_the_next_request_opens_a_new_connection() -> None:
    server = Server(answering(b"HTTP/1.1 202 Accepted\r\n\r\nqueued"), close_after=True)

    assert [(r.status_code, r.excerpt) for r in two_posts(server)] == [(202, "queued")] * 2
    assert (server.connections, len(server.requests)) == (2, 2)


@pytest.mark.parametrize(
    ("raw", "connections"),
    [
        (b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok", 2),  # the receiver keeps it open
        (b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok", 2),
        (b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok", 1),
        (b"HTTP/1.1 204 No Content\r\n\r\n", 1),  # complete at its head
    ],
)
def test_a_connection_is_reused_only_when_the_answer_keeps_it_alive(raw: bytes, connections: int) -> None:
    server = Server(answering(raw))

    status = int(raw.split(b" ", 2)[1])
    assert [r.status_code for r in two_posts(server)] == [status, status]
    assert server.connections == connections


def test_interim_answers_arriving_byte_by_byte_are_skipped_and_the_final_status_is_reported() -> None:
    raw = (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"
        b"HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    )

    async def trickle(writer: asyncio.StreamWriter) -> None:
        for i in range(len(raw)):  # one byte per read: each answer is parsed alone
            writer.write(raw[i : i + 1])
            await writer.drain()
            await asyncio.sleep(0)

    server = Server(trickle)

    assert [(r.status_code, r.excerpt) for r in two_posts(server)] == [(201, "ok")] * 2
    assert server.connections == 1


def test_answer_lines_ended_by_a_bare_lf_are_read() -> None:
    server = Server(answering(b"HTTP/1.1 200 OK\ncontent-length: 2\n\nok"))

    assert [(r.status_code, r.excerpt) for r in two_posts(server)] == [(200, "ok")] * 2


def test_bytes_after_the_answer_neither_replace_it_nor_reach_the_next_request() -> None:
    second_answer = Server(
        answering(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 500 X\r\ncontent-length: 3\r\n\r\nbad")
    )
    stray_byte = Server(answering(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok!"))
    half_answer = Server(answering(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 5"))

    for server in (second_answer, stray_byte, half_answer):
        assert [(r.status_code, r.excerpt) for r in two_posts(server)] == [(200, "ok")] * 2
        assert server.connections == 2  # the connection the bytes came on is not reused


def test_endless_headers_are_cut_off_at_max_head_bytes() -> None:
    sent = 0

    async def endless(writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        writer.write(b"HTTP/1.1 200 OK\r\nx-long: ")
        try:
            for _ in range(4096):  # 64 MiB, unless the client stops reading
                writer.write(b"a" * 16384)
                await writer.drain()
                sent += 16384
        except ConnectionError:
            pass

    server = Server(endless)

    async def scenario(client: HttpClient) -> object:
        with pytest.raises(RemoteProtocolError, match="no final answer head"):
            await client.post(endpoint(server.port), headers(), BODY)
        return None

    run(server, scenario, read_timeout_s=30.0)
    assert sent < 64 * 1024 * 1024  # the client hung up long before the receiver was done


def test_a_switch_of_protocols_is_a_protocol_error() -> None:
    server = Server(answering(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"))

    async def scenario(client: HttpClient) -> object:
        with pytest.raises(RemoteProtocolError, match="switched protocols"):
            await client.post(endpoint(server.port), headers(), BODY)
        return None

    run(server, scenario)


def test_a_request_sent_again_after_a_reused_connection_failed_late_gets_only_the_rest_of_the_read_timeout() -> None:
    # The receiver holds the request on the reused connection, then closes it without a byte of answer (sent again
    # elsewhere), and holds the request on the new one too: each exchange alone stays under the read timeout, but
    # the attempt must not outlast it (the lease only exceeds lookup + connect + one read timeout).
    requests = 0

    async def late(writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        requests += 1
        if requests == 1:
            await ok(writer)
            return
        await asyncio.sleep(0.7)
        if requests == 2:
            raise ConnectionResetError  # Server.handle closes the connection, no answer written
        await ok(writer)

    server = Server(late)

    async def scenario(client: HttpClient) -> object:
        await client.post(endpoint(server.port), headers(), BODY)
        started = time.monotonic()
        with pytest.raises(ReadTimeoutError):
            await client.post(endpoint(server.port), headers(), BODY)
        return time.monotonic() - started

    elapsed = run(server, scenario, read_timeout_s=1.0)

    assert server.connections == 2
    assert 1.0 <= elapsed < 1.3  # type: ignore[operator]


def test_a_reused_connection_closed_after_part_of_an_answer_is_an_error_not_sent_again() -> None:
    answers = iter([b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", b"HTTP/1.1 200 OK\r\ncontent-le"])

    async def then_half(writer: asyncio.StreamWriter) -> None:
        writer.write(next(answers))
        await writer.drain()

    server = Server(then_half)

    async def scenario(client: HttpClient) -> object:
        await client.post(endpoint(server.port), headers(), BODY)
        server.close_after = True  # the second answer is cut off by the receiver closing
        with pytest.raises(ConnectionResetError):
            await client.post(endpoint(server.port), headers(), BODY)
        return None

    run(server, scenario)
    assert (server.connections, len(server.requests)) == (1, 2)  # the body went out once, not again elsewhere


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", RemoteProtocolError),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b", ConnectionResetError),  # then closed
        (b"HTTP/1.1 200 OK\r\ncontent-le", ConnectionResetError),  # closed within the headers
        (b"HTTP/1.1 999 Odd\r\ncontent-length: 0\r\n\r\n", RemoteProtocolError),  # no HTTP status
        (b"HTTP/1.1 600 Odd\r\ncontent-length: 0\r\n\r\n", RemoteProtocolError),
    ],
)
def test_a_malformed_or_cut_off_answer_is_an_error_not_a_reply(raw: bytes, error: type[Exception]) -> None:
    server = Server(answering(raw), close_after=True)

    async def scenario(client: HttpClient) -> object:
        with pytest.raises(error):
            await client.post(endpoint(server.port), headers(), BODY)
        return None

    run(server, scenario)


@pytest.mark.parametrize(
    ("target", "extra"),
    [
        (b"/hook\r\nx-injected: 1", ()),
        (b"/hook HTTP/1.1\r\n\r\nPOST /second", ()),
        (b"/hook", ((b"x-note", b"line\r\nx-injected: 1"),)),
        (b"/hook", ((b"bad name", b"v"),)),
        (b"/a b", ()),
        (b"/hook", ((b"Content-Length", b"0"),)),  # written from the body only
    ],
)
def test_a_target_or_header_that_could_inject_a_line_is_refused_and_nothing_is_sent(
    target: bytes, extra: tuple[tuple[bytes, bytes], ...]
) -> None:
    server = Server(ok)

    async def scenario(client: HttpClient) -> object:
        with pytest.raises(InvalidRequestError):
            await client.post(endpoint(server.port, target), [*headers(), *extra], BODY)
        return None

    run(server, scenario)
    assert (server.connections, server.requests) == (0, [])


def test_a_receiver_that_never_answers_times_out() -> None:
    async def never(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    server = Server(never)

    async def scenario(client: HttpClient) -> object:
        started = time.monotonic()
        with pytest.raises(ReadTimeoutError):
            await client.post(endpoint(server.port), headers(), BODY)
        return time.monotonic() - started

    elapsed = run(server, scenario, read_timeout_s=0.3)

    assert 0.3 <= elapsed < 5  # type: ignore[operator]


def test_a_refused_connection_is_an_os_error() -> None:
    async def scenario(client: HttpClient) -> object:
        with pytest.raises(ConnectionRefusedError):
            await client.post(endpoint(9), headers(), BODY)
        return None

    run(Server(ok), scenario)


# ------------------------------------------------------------------------------------------------ resolver

ADDRESS = ipaddress.ip_address("93.184.215.14")


class Dns:
    """A blocking lookup (:func:`ssrf.resolve_host`'s signature) that waits for ``open`` (cleared: DNS hangs);
    ``bad.example`` does not resolve. Counts lookups per host."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.open = threading.Event()
        self.open.set()

    def __call__(self, host: str, allow_private: bool) -> ssrf.IPAddress:
        self.calls[host] += 1
        self.open.wait(10)
        if host == "bad.example":
            raise ssrf.UnsafeWebhookUrlError(f"cannot resolve host {host!r}: no such name")
        return ADDRESS


def resolve(dns: Dns, scenario: Callable[[Resolver], Awaitable[None]], timeout_s: float = 1.0, **ttls: float) -> None:
    async def main() -> None:
        with ThreadPoolExecutor(4) as pool:
            try:
                await scenario(Resolver(pool, allow_private=False, timeout_s=timeout_s, lookup=dns, **ttls))
            finally:
                dns.open.set()  # the pool's threads must end

    asyncio.run(main())


def test_a_lookup_that_outlives_its_waiters_is_joined_by_later_deliveries_not_started_again() -> None:
    dns = Dns()
    dns.open.clear()

    async def scenario(resolver: Resolver) -> None:
        for _ in range(3):  # three batches' deliveries give up on the hanging lookup
            with pytest.raises(ssrf.UnsafeWebhookUrlError, match=r"no answer within 0\.1 s"):
                await resolver.address("slow.example")
        assert dns.calls == {"slow.example": 1}
        dns.open.set()
        assert await resolver.address("slow.example") == ADDRESS  # the same lookup's answer

    resolve(dns, scenario, timeout_s=0.1)
    assert dns.calls == {"slow.example": 1}


def test_concurrent_deliveries_share_one_lookup_and_reuse_its_answer_until_it_expires() -> None:
    dns = Dns()

    async def scenario(resolver: Resolver) -> None:
        answers = await asyncio.gather(*(resolver.address("hook.example") for _ in range(5)))
        assert answers == [ADDRESS] * 5
        assert await resolver.address("hook.example") == ADDRESS
        assert dns.calls == {"hook.example": 1}
        await asyncio.sleep(0.6)
        assert await resolver.address("hook.example") == ADDRESS
        assert dns.calls == {"hook.example": 2}

    resolve(dns, scenario, ttl_s=0.5)


def test_a_failed_lookup_is_reused_for_the_failure_ttl() -> None:
    dns = Dns()

    async def scenario(resolver: Resolver) -> None:
        for _ in range(2):
            with pytest.raises(ssrf.UnsafeWebhookUrlError, match="no such name"):
                await resolver.address("bad.example")
        assert dns.calls == {"bad.example": 1}
        await asyncio.sleep(0.6)
        with pytest.raises(ssrf.UnsafeWebhookUrlError, match="no such name"):
            await resolver.address("bad.example")
        assert dns.calls == {"bad.example": 2}

    resolve(dns, scenario, failure_ttl_s=0.5)


def test_a_hanging_host_does_not_delay_another_hosts_lookup_and_literals_need_none() -> None:
    dns = Dns()
    hang = threading.Event()

    def lookup(host: str, allow_private: bool) -> ssrf.IPAddress:
        if host == "slow.example":
            hang.wait(10)
        return dns(host, allow_private)

    async def scenario(resolver: Resolver) -> None:
        slow = asyncio.ensure_future(resolver.address("slow.example"))
        await asyncio.sleep(0)  # its lookup is running (and hangs)
        assert await resolver.address("fast.example") == ADDRESS  # within the timeout
        assert await resolver.address("93.184.215.14") == ADDRESS
        with pytest.raises(ssrf.UnsafeWebhookUrlError, match="private address"):
            await resolver.address("10.0.0.1")
        with pytest.raises(ssrf.UnsafeWebhookUrlError, match="no answer within"):
            await slow

    async def main() -> None:
        with ThreadPoolExecutor(4) as pool:
            try:
                await scenario(Resolver(pool, allow_private=False, timeout_s=0.5, lookup=lookup))
            finally:
                hang.set()

    asyncio.run(main())
    assert dns.calls == {"fast.example": 1, "slow.example": 1}  # literals are checked without a lookup


def test_an_ip_address_host_is_checked_once_and_kept_and_a_refused_one_is_refused_every_time() -> None:
    dns = Dns()

    async def scenario(resolver: Resolver) -> None:
        for _ in range(3):
            assert await resolver.address("93.184.215.14") == ADDRESS
            with pytest.raises(ssrf.UnsafeWebhookUrlError, match="private address"):
                await resolver.address("10.0.0.1")
        assert resolver._literals == {"93.184.215.14": ADDRESS}  # the refused one is not kept

    resolve(dns, scenario)
    assert dns.calls == {}
