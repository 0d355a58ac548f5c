"""The agents' HTTP/1.1 client (agentapi_proxy.upstream) against scripted agents.

Each test runs a raw TCP server on 127.0.0.1 that answers with exactly the
bytes the test wrote, so framing (lengths, chunks, closes, malformed heads)
is what the client really receives.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from agentapi_proxy import upstream
from agentapi_proxy.errors import InvalidArgument
from agentapi_proxy.upstream import (
    HIGH_WATER_BYTES,
    AgentResponseInvalid,
    AgentUnreachable,
    Origin,
    UpstreamPool,
    UpstreamResponse,
)

DEADLINE = 30.0


@dataclass
class Seen:
    """One request as the agent read it."""

    connection: int
    head: str
    body: bytes


Reply = Callable[[Seen, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class ScriptedAgent:
    """A raw HTTP/1.1 server whose answers are written by ``reply``, byte for byte."""

    reply: Reply
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    closed: list[int] = field(default_factory=list)
    port: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_closed(self, number: int) -> None:
        """Wait until the agent saw connection ``number`` end."""
        while number not in self.closed:
            self.changed.clear()
            await self.changed.wait()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            while True:
                try:
                    head = (await reader.readuntil(b"\r\n\r\n")).decode()
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                try:
                    body = await _read_body(reader, head)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                seen = Seen(number, head, body)
                self.seen.append(seen)
                await self.reply(seen, writer)
                if writer.is_closing():
                    return
        finally:
            self.closed.append(number)
            self.changed.set()
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def _read_body(reader: asyncio.StreamReader, head: str) -> bytes:
    lines = [line.lower() for line in head.split("\r\n")]
    for line in lines:
        if line.startswith("content-length:"):
            return await reader.readexactly(int(line.split(":", 1)[1]))
    if "transfer-encoding: chunked" in lines:
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            body += await reader.readexactly(size)
            assert await reader.readexactly(2) == b"\r\n"
        assert await reader.readexactly(2) == b"\r\n"
        return body
    return b""


@contextlib.asynccontextmanager
async def scripted(reply: Reply) -> AsyncIterator[tuple[ScriptedAgent, UpstreamPool, Origin]]:
    agent = ScriptedAgent(reply)
    server = await asyncio.start_server(agent.serve, "127.0.0.1", 0)
    agent.port = server.sockets[0].getsockname()[1]
    pool = UpstreamPool()
    origin = pool.origin(f"http://127.0.0.1:{agent.port}")
    assert origin is not None
    try:
        async with asyncio.timeout(DEADLINE):
            yield agent, pool, origin
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()


def fixed(raw: bytes) -> Reply:
    async def reply(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(raw)
        await writer.drain()

    return reply


async def get(
    pool: UpstreamPool, origin: Origin, target: str = "/", *, method: str = "GET"
) -> UpstreamResponse:
    return await pool.request(origin, method, target, headers=[("Host", "h")], body=None)


async def whole(response: UpstreamResponse) -> bytes:
    try:
        return await response.read_all()
    finally:
        response.close()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello"


async def test_a_kept_alive_connection_carries_the_next_request() -> None:
    async with scripted(fixed(OK)) as (agent, pool, origin):
        for _ in range(3):
            response = await get(pool, origin, "/x?y=1")
            assert (response.status, response.content_length) == (200, 5)
            assert ("X-A", "1") in response.headers
            assert await whole(response) == b"hello"
        assert agent.connections == 1
        assert agent.seen[0].head.startswith("GET /x?y=1 HTTP/1.1\r\nHost: h\r\n")


async def test_the_base_urls_path_prefixes_every_target() -> None:
    async with scripted(fixed(OK)) as (agent, pool, _):
        prefixed = pool.origin(f"http://127.0.0.1:{agent.port}/base/")
        assert prefixed is not None
        await whole(await get(pool, prefixed, "/status"))
        assert agent.seen[0].head.startswith("GET /base/status HTTP/1.1\r\n")
    assert pool.origin("https://127.0.0.1:1") is None
    assert pool.origin("http://user:pw@127.0.0.1:1") is None


async def test_chunked_events_arrive_one_by_one_and_trailers_are_dropped() -> None:
    sent_second = asyncio.Event()
    first_read = asyncio.Event()

    async def reply(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"7;ext=1\r\nevent 1\r\n")
        await writer.drain()
        # The second event goes out only once the first was read: no buffering between.
        await first_read.wait()
        writer.write(b"7\r\nevent 2\r\n0\r\nX-Trailer: t\r\n\r\n")
        await writer.drain()
        sent_second.set()

    async with scripted(reply) as (agent, pool, origin):
        response = await get(pool, origin)
        assert response.content_length is None
        assert await response.read_chunk(1024) == b"event 1"
        first_read.set()
        assert await response.read_chunk(1024) == b"event 2"
        assert await response.read_chunk(1024) == b""
        assert response.complete
        response.close()
        await sent_second.wait()
        await whole(await get(pool, origin))
        assert agent.connections == 1, "a whole chunked response leaves the connection reusable"


async def test_a_body_without_length_ends_at_close_and_the_connection_is_not_reused() -> None:
    async def reply(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    async with scripted(reply) as (agent, pool, origin):
        assert await whole(await get(pool, origin)) == b"all of it"
        assert await whole(await get(pool, origin)) == b"all of it"
        assert agent.connections == 2


@pytest.mark.parametrize(
    ("method", "raw"),
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"),
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
        ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\n\r\n"),
    ],
)
async def test_head_204_and_304_have_no_body(method: str, raw: bytes) -> None:
    async with scripted(fixed(raw)) as (agent, pool, origin):
        for _ in range(2):
            response = await get(pool, origin, method=method)
            assert await whole(response) == b""
        assert agent.connections == 1, "the connection stays in step after a bodyless response"


async def test_interim_responses_are_skipped() -> None:
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK
    async with scripted(fixed(raw)) as (_, pool, origin):
        response = await get(pool, origin)
        assert response.status == 200
        assert await whole(response) == b"hello"


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        # Bytes after the response: the connection is out of step.
        OK + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra",
    ],
)
async def test_a_connection_the_agent_ends_or_desyncs_is_not_reused(raw: bytes) -> None:
    async with scripted(fixed(raw)) as (agent, pool, origin):
        assert await whole(await get(pool, origin)) == b"hello"
        assert await whole(await get(pool, origin)) == b"hello"
        assert agent.connections == 2


async def test_bytes_sent_unasked_drop_an_idle_connection() -> None:
    async def reply(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(OK)
        await writer.drain()
        if seen.connection == 1:
            await asyncio.sleep(0.05)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nsneak")
            await writer.drain()

    async with scripted(reply) as (agent, pool, origin):
        assert await whole(await get(pool, origin)) == b"hello"
        await agent.wait_closed(1)
        assert await whole(await get(pool, origin)) == b"hello"
        assert agent.connections == 2


def closes_on_second_request() -> Reply:
    """An agent that answers once per connection, then closes as the next request comes."""
    requests: collections.Counter[int] = collections.Counter()

    async def reply(seen: Seen, writer: asyncio.StreamWriter) -> None:
        requests[seen.connection] += 1
        if requests[seen.connection] > 1:
            writer.close()
            return
        writer.write(OK)
        await writer.drain()

    return reply


@pytest.mark.parametrize(("method", "body"), [("GET", None), ("PUT", b"data")])
async def test_a_stale_connection_is_retried_once_for_idempotent_requests(
    method: str, body: bytes | None
) -> None:
    async with scripted(closes_on_second_request()) as (agent, pool, origin):
        await whole(await get(pool, origin))
        headers = [("Host", "h"), ("Content-Length", str(len(body)))] if body else [("Host", "h")]
        response = await pool.request(origin, method, "/again", headers=headers, body=body)
        assert await whole(response) == b"hello"
        assert agent.connections == 2
        assert [s.body for s in agent.seen[1:]] == [body or b""] * 2


async def test_a_stale_connection_fails_a_post_without_sending_it_twice() -> None:
    async with scripted(closes_on_second_request()) as (agent, pool, origin):
        await whole(await get(pool, origin))
        with pytest.raises(AgentUnreachable):
            await pool.request(
                origin,
                "POST",
                "/message",
                headers=[("Host", "h"), ("Content-Length", "2")],
                body=b"hi",
            )
        assert [s.head.split(" ")[0] for s in agent.seen] == ["GET", "POST"]


async def test_an_agent_that_is_not_listening_is_unreachable() -> None:
    async with scripted(fixed(OK)) as (_, pool, _):
        gone = pool.origin("http://127.0.0.1:1")
        assert gone is not None
        with pytest.raises(AgentUnreachable):
            await get(pool, gone)


async def test_an_agent_that_closes_without_answering_is_unreachable() -> None:
    async def reply(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async with scripted(reply) as (_, pool, origin):
        with pytest.raises(AgentUnreachable):
            await get(pool, origin)


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A : 1\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n",
        # Bare LFs only: the head never completes, and the agent keeps the connection.
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
        b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello!",
        b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\nbody",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
        b"HTTP/1.1 999 Odd\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * 70_000 + b"\r\n\r\n",
        b"garbage\r\n\r\n",
    ],
)
async def test_a_malformed_head_is_refused(raw: bytes) -> None:
    async with scripted(fixed(raw)) as (_, pool, origin):
        with pytest.raises(AgentResponseInvalid):
            await get(pool, origin)


@pytest.mark.parametrize(
    "chunks",
    [
        b"5\r\nhelloXX0\r\n\r\n",
        b"-5\r\nhello\r\n0\r\n\r\n",
        b"5 x\r\nhello\r\n0\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"5\nhello\r\n0\r\n\r\n",
        b"5\r\nhello\r\n0\r\n folded: trailer\r\n\r\n",
        b"ffffffffffffffffff\r\n",
    ],
)
async def test_a_malformed_chunk_fails_the_body(chunks: bytes) -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
    async with scripted(fixed(raw)) as (_, pool, origin):
        response = await get(pool, origin)
        with pytest.raises(AgentResponseInvalid):
            await whole(response)


async def test_a_body_cut_short_fails_and_closes_the_connection() -> None:
    async def reply(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        await writer.drain()
        writer.close()

    async with scripted(reply) as (_, pool, origin):
        response = await get(pool, origin)
        assert await response.read_chunk(1024) == b"only this"
        with pytest.raises(AgentResponseInvalid):
            await response.read_chunk(1024)
        response.close()


async def test_a_line_break_in_a_header_is_refused_before_sending() -> None:
    async with scripted(fixed(OK)) as (agent, pool, origin):
        with pytest.raises(InvalidArgument):
            await pool.request(
                origin, "GET", "/", headers=[("X-A", "1\r\nX-Injected: 2")], body=None
            )
        assert agent.seen == []


async def chunks_of(total: int, *, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        piece = min(size, total - sent)
        yield bytes([sent // size % 251]) * piece
        sent += piece


@pytest.mark.parametrize("declared", [True, False])
async def test_a_five_mib_body_streams_up_in_chunks(declared: bool) -> None:
    total = 5 * 1024 * 1024
    async with scripted(fixed(OK)) as (agent, pool, origin):
        headers = [("Host", "h")] + ([("Content-Length", str(total))] if declared else [])
        response = await pool.request(
            origin, "POST", "/upload", headers=headers, body=chunks_of(total)
        )
        assert await whole(response) == b"hello"
        seen = agent.seen[0]
        assert seen.body == b"".join([c async for c in chunks_of(total)])
        assert ("transfer-encoding: chunked" in seen.head.lower()) is not declared
        await whole(await get(pool, origin))
        assert agent.connections == 1, "a fully sent body leaves the connection reusable"


async def test_a_request_body_that_breaks_off_is_never_completed_at_the_agent() -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"part"
        raise ConnectionResetError("client left")

    async def reply(seen: Seen, writer: asyncio.StreamWriter) -> None:
        raise AssertionError("the agent must never see a whole request")

    async with scripted(reply) as (agent, pool, origin):
        with pytest.raises(InvalidArgument):
            await pool.request(origin, "POST", "/", headers=[("Host", "h")], body=broken())
        await agent.wait_closed(1)
        assert agent.seen == []


async def test_a_large_download_streams_with_bounded_memory() -> None:
    total = 12 * 1024 * 1024
    done = asyncio.Event()

    async def reply(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        async for chunk in chunks_of(total):
            writer.write(chunk)
            await writer.drain()
        done.set()

    async with scripted(reply) as (_, pool, origin):
        response = await get(pool, origin)
        received = 0
        most_buffered = 0
        while chunk := await response.read_chunk(64 * 1024):
            received += len(chunk)
            most_buffered = max(most_buffered, response.buffered)
            # A slow client: the agent must wait instead of the gateway buffering.
            await asyncio.sleep(0)
        response.close()
        assert received == total
        # One socket read may land on top of the high-water mark before reading pauses.
        assert most_buffered <= HIGH_WATER_BYTES + 256 * 1024
        await done.wait()


async def test_letting_go_mid_stream_closes_the_connection() -> None:
    async def reply(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        if seen.connection == 1:
            # Like an SSE stream with heartbeats: it ends only when the reader has gone.
            with contextlib.suppress(ConnectionError):
                while True:
                    await asyncio.sleep(0.01)
                    writer.write(b"1\r\n:\r\n")
                    await writer.drain()
            return
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with scripted(reply) as (agent, pool, origin):
        response = await get(pool, origin)
        assert await response.read_chunk(1024) == b"first"
        response.close()
        await agent.wait_closed(1)
        response = await get(pool, origin)
        assert await whole(response) == b"first"
        assert agent.connections == 2


async def test_idle_connections_are_closed_after_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream, "IDLE_SECONDS", 0.05)
    async with scripted(fixed(OK)) as (agent, pool, origin):
        assert await whole(await get(pool, origin)) == b"hello"
        # Nothing else is sent: only the pool's own sweep can end the connection.
        await agent.wait_closed(1)
        assert await whole(await get(pool, origin)) == b"hello"
        assert agent.connections == 2


async def test_an_answer_before_the_whole_body_was_sent_ends_the_connection() -> None:
    connections = 0
    answered = asyncio.Event()

    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"POST"):
                # Refused at once: the agent never reads the body.
                writer.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                answered.set()
                await reader.read()
                return
            writer.write(OK)
            await writer.drain()
            await reader.read()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b"x" * 1024
        await answered.wait()
        for _ in range(3):
            await asyncio.sleep(0.01)
            yield b"x" * 1024

    server = await asyncio.start_server(early, "127.0.0.1", 0)
    pool = UpstreamPool()
    origin = pool.origin(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    assert origin is not None
    try:
        async with asyncio.timeout(DEADLINE):
            response = await pool.request(
                origin, "POST", "/upload", headers=[("Host", "h")], body=slow_body()
            )
            assert response.status == 413
            assert await whole(response) == b""
            assert await whole(await get(pool, origin)) == b"hello"
            assert connections == 2, "the agent's reading of the rest is unknown: no reuse"
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()
