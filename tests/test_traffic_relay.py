"""The control plane's relay (agentapi_proxy.traffic) against scripted agents, in process.

Plain ``http://`` agents are reached over the lean client
(agentapi_proxy.upstream), every other endpoint over aiohttp. The two must be
indistinguishable to the agent and to the caller; the lean one must also
keep the relay's promises on failure and cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator
from typing import cast

import pytest

from agentapi_proxy.drivers.base import Driver
from agentapi_proxy.errors import InvalidArgument, Unavailable
from agentapi_proxy.model import Endpoint
from agentapi_proxy.traffic import CHUNK_BYTES, ResponsePart, TrafficRelay
from agentapi_proxy.v1 import agent_service_pb2 as pb
from tests.test_upstream import DEADLINE, Reply, ScriptedAgent, Seen, fixed

LEAN = "lean"
AIOHTTP = "aiohttp"


class OneAgent:
    """A driver that knows one agent, at one endpoint, and counts the questions."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint_of = endpoint
        self.asked = 0

    async def endpoint(self, agent_id: str) -> Endpoint:
        self.asked += 1
        return self.endpoint_of


async def allow(agent_id: str) -> None:
    return None


def endpoint_for(port: int, client: str) -> Endpoint:
    # An SSL context on an http:// URL changes nothing on the wire, but keeps the relay
    # on aiohttp, the client it uses for TLS and the API server's pod proxy.
    context = ssl.create_default_context() if client == AIOHTTP else None
    return Endpoint(
        base_url=f"http://127.0.0.1:{port}/base/",
        host="localhost:3284",
        headers={"X-Endpoint": "e"},
        ssl=context,
    )


@contextlib.asynccontextmanager
async def relay_to(
    reply: Reply, *, client: str = LEAN
) -> AsyncIterator[tuple[ScriptedAgent, TrafficRelay, OneAgent]]:
    agent = ScriptedAgent(reply)
    server = await asyncio.start_server(agent.serve, "127.0.0.1", 0)
    agent.port = server.sockets[0].getsockname()[1]
    driver = OneAgent(endpoint_for(agent.port, client))
    relay = TrafficRelay(cast(Driver, driver))
    await relay.start()
    try:
        async with asyncio.timeout(DEADLINE):
            yield agent, relay, driver
    finally:
        await relay.close()
        server.close()
        await server.wait_closed()


def request_head(
    method: str = "GET", path: str = "/x", *, query: str = "", headers: dict[str, str] | None = None
) -> pb.HTTPRequestHead:
    return pb.HTTPRequestHead(
        agent_id="a1",
        method=method,
        path=path,
        query=query,
        headers=[pb.HTTPHeader(name=k, value=v) for k, v in (headers or {}).items()],
    )


async def body_messages(*chunks: bytes) -> AsyncIterator[pb.ProxyHTTPRequest]:
    for chunk in chunks:
        yield pb.ProxyHTTPRequest(body=chunk)
    yield pb.ProxyHTTPRequest(end_of_body=True)


async def parts_of(
    relay: TrafficRelay,
    head: pb.HTTPRequestHead,
    *,
    body: bytes = b"",
    rest: AsyncIterator[pb.ProxyHTTPRequest] | None = None,
    caller: str = "alice",
) -> list[ResponsePart]:
    exchange = relay.exchange(
        head, body=body, end_of_body=rest is None, rest=rest, authorize=allow, caller=caller
    )
    return [part async for part in exchange]


def agent_view(seen: list[Seen]) -> list[tuple[str, bytes]]:
    """What the agent read, without the port numbers that differ between runs."""
    return [(s.head, s.body) for s in seen]


def response_view(parts: list[ResponsePart]) -> tuple[object, ...]:
    head = parts[0].head
    assert head is not None
    headers = [(h.name, h.value) for h in head.headers]
    return head.status, headers, b"".join(p.body for p in parts), parts[-1].end_of_body


BIG = 3 * CHUNK_BYTES + 5


async def answer_by_path(seen: Seen, writer: asyncio.StreamWriter) -> None:
    """Small responses for most paths; a large chunked one for /big."""
    if " /base/big " in seen.head.split("\r\n")[0]:
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n"
            b"Keep-Alive: timeout=5\r\nX-Big: 1\r\n\r\n"
        )
        for _ in range(3):
            writer.write(b"%x\r\n%s\r\n" % (CHUNK_BYTES, b"b" * CHUNK_BYTES))
        writer.write(b"5\r\nbbbbb\r\n0\r\n\r\n")
    else:
        reply = b"got %d bytes" % len(seen.body)
        writer.write(
            b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\nX-Reply: r\r\n\r\n%s"
            % (len(reply), reply)
        )
    await writer.drain()


async def test_both_clients_send_the_same_requests_and_relay_the_same_responses() -> None:
    caller_headers = {
        "X-Custom": "c",
        "Authorization": "Bearer secret",
        "Connection": "X-Hop",
        "X-Hop": "1",
        "Host": "caller.example",
    }
    seen: dict[str, list[tuple[str, bytes]]] = {}
    relayed: dict[str, list[tuple[object, ...]]] = {}
    for client in (LEAN, AIOHTTP):
        async with relay_to(answer_by_path, client=client) as (agent, relay, _):
            exchanges = [
                await parts_of(relay, request_head("GET", "/x", query="q=%20&r")),
                await parts_of(
                    relay, request_head("POST", "/post", headers=caller_headers), body=b"in hand"
                ),
                await parts_of(
                    relay, request_head("PUT", "/put"), rest=body_messages(b"stre", b"amed")
                ),
                await parts_of(
                    relay,
                    request_head("POST", "/len", headers={"Content-Length": "6"}),
                    rest=body_messages(b"abc", b"def"),
                ),
                await parts_of(relay, request_head("GET", "/big")),
            ]
            seen[client] = agent_view(agent.seen)
            relayed[client] = [response_view(parts) for parts in exchanges]
            # A small response is one part; a large one streams in chunks after its head.
            assert [len(parts) for parts in exchanges][:4] == [1, 1, 1, 1]
            assert len(exchanges[4]) > 2
            assert all(len(p.body) <= CHUNK_BYTES for p in exchanges[4])

    assert seen[LEAN] == seen[AIOHTTP]
    assert relayed[LEAN] == relayed[AIOHTTP]
    first_head = seen[LEAN][0][0]
    assert first_head.startswith("GET /base/x?q=%20&r HTTP/1.1\r\nHost: localhost:3284\r\n")
    post_head = seen[LEAN][1][0]
    assert "X-Custom: c\r\n" in post_head and "X-Endpoint: e\r\n" in post_head
    assert "Bearer" not in post_head and "X-Hop" not in post_head
    assert "caller.example" not in post_head
    assert seen[LEAN][2] == (seen[LEAN][2][0], b"streamed")
    assert "Transfer-Encoding: chunked" in seen[LEAN][2][0]
    assert seen[LEAN][3][1] == b"abcdef"
    assert relayed[LEAN][4] == (200, [("X-Big", "1")], b"b" * BIG, False)


async def test_exchanges_one_after_another_reuse_one_agent_connection() -> None:
    async with relay_to(answer_by_path) as (agent, relay, _):
        for _ in range(3):
            parts = await parts_of(relay, request_head())
            assert parts[0].body == b"got 0 bytes"
        assert {s.connection for s in agent.seen} == {1}


async def test_a_caller_that_leaves_mid_body_closes_the_agent_connection() -> None:
    async def endless(seen: Seen, writer: asyncio.StreamWriter) -> None:
        if seen.head.startswith("GET /base/endless "):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n")
            writer.write(b"e" * BIG)
        await answer_by_path(seen, writer)

    async with relay_to(endless) as (agent, relay, _):
        exchange = relay.exchange(
            request_head("GET", "/endless"),
            body=b"",
            end_of_body=True,
            authorize=allow,
            caller="alice",
        )
        first = await anext(exchange)
        assert first.head is not None and first.head.status == 200
        assert (await anext(exchange)).body.startswith(b"e")
        await exchange.aclose()
        # Never back in the pool with the rest of the body unread: the agent sees it close.
        await agent.wait_closed(1)
        parts = await parts_of(relay, request_head())
        assert parts[0].body == b"got 0 bytes"
        assert agent.seen[-1].connection == 2


async def test_callers_never_share_a_connection_to_an_agent() -> None:
    """An agent answering late would have its answer read as the next request's."""
    async with relay_to(answer_by_path) as (agent, relay, _):
        for caller in ("alice", "bob", "alice", "bob"):
            await parts_of(relay, request_head(), caller=caller)
        connections = [seen.connection for seen in agent.seen]
        assert connections[0] == connections[2]
        assert connections[1] == connections[3]
        assert connections[0] != connections[1]


async def test_a_cancelled_exchange_waiting_for_the_head_closes_the_agent_connection() -> None:
    answered = asyncio.Event()

    async def silent(seen: Seen, writer: asyncio.StreamWriter) -> None:
        answered.set()

    async with relay_to(silent) as (agent, relay, _):
        task = asyncio.create_task(parts_of(relay, request_head()))
        await answered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await agent.wait_closed(1)


async def test_an_unreachable_agent_is_unavailable_and_its_endpoint_asked_again() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    # Nothing listens on the port any more (the socket never listened).
    driver = OneAgent(endpoint_for(port, LEAN))
    relay = TrafficRelay(cast(Driver, driver))
    await relay.start()
    try:
        async with asyncio.timeout(DEADLINE):
            for asked in (1, 2):
                with pytest.raises(Unavailable) as caught:
                    await parts_of(relay, request_head())
                assert caught.value.reason == "AgentUnreachable"
                assert "'a1' did not answer" in str(caught.value)
                # Forgotten on failure: the next exchange asks the driver again.
                assert driver.asked == asked
    finally:
        await relay.close()


async def test_a_malformed_response_is_agent_response_invalid() -> None:
    bad = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
    async with relay_to(fixed(bad)) as (_, relay, driver):
        for asked in (1, 2):
            with pytest.raises(Unavailable) as caught:
                await parts_of(relay, request_head())
            assert caught.value.reason == "AgentResponseInvalid"
            assert "malformed or broken" in str(caught.value)
            assert driver.asked == asked


async def test_a_streamed_body_longer_than_its_content_length_is_refused() -> None:
    async with relay_to(answer_by_path) as (agent, relay, _):
        with pytest.raises(InvalidArgument, match="longer than its Content-Length 4"):
            await parts_of(
                relay,
                request_head("POST", "/len", headers={"Content-Length": "4"}),
                rest=body_messages(b"abc", b"def"),
            )
        # The agent never got a whole request out of it.
        assert agent.seen == []
        parts = await parts_of(relay, request_head())
        assert parts[0].body == b"got 0 bytes"


async def test_a_head_is_checked_every_time_also_after_a_like_one_passed() -> None:
    async with relay_to(answer_by_path) as (agent, relay, _):
        for _ in range(2):
            parts = await parts_of(relay, request_head(headers={"X-A": "1"}))
            assert parts[0].body == b"got 0 bytes"
        for refused in (
            request_head(headers={"X-A": "1\x00"}),
            request_head(path="/../x", headers={"X-A": "1"}),
            pb.HTTPRequestHead(agent_id="A1", method="GET", path="/x"),
        ):
            for _ in range(2):
                with pytest.raises(InvalidArgument):
                    await parts_of(relay, refused)
        assert len(agent.seen) == 2
