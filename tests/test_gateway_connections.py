"""How many connections the gateway holds: per client address and in all.

The gateway runs in-process on 127.0.0.1; "other clients" connect from other
loopback source addresses (127.0.0.2, ...), which Linux routes to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from agentapi_gateway.app import run_gateway
from agentapi_gateway.connections import connection_limit
from agentapi_proxy.settings import GatewaySettings

GET_HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n"


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def gateway(**limits: int) -> AsyncIterator[int]:
    settings = GatewaySettings(
        listen="127.0.0.1:0", control_plane=f"127.0.0.1:{unused_port()}", **limits
    )
    runner: web.AppRunner = await run_gateway(settings, shutdown_timeout=1)
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def healthz(self) -> tuple[int, bytes]:
        """Send GET /healthz; the status and the raw answer (the whole of it if closed)."""
        self.writer.write(GET_HEALTHZ)
        await self.writer.drain()
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        body = await asyncio.wait_for(self.reader.readexactly(length), 10)
        return int(head.split(b" ", 2)[1]), head + body

    def close(self) -> None:
        self.writer.close()


async def connect(port: int, *, source: str = "127.0.0.1") -> Connection:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    return Connection(reader, writer)


async def test_one_client_past_its_limit_gets_429_and_others_are_still_served() -> None:
    async with gateway(max_connections=100, max_connections_per_client=3) as port:
        held = [await connect(port) for _ in range(3)]
        try:
            for connection in held:
                assert (await connection.healthz())[0] == 200

            extra = await connect(port)
            status, answer = await extra.healthz()
            assert status == 429
            error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
            assert error["status"] == "RESOURCE_EXHAUSTED"
            assert "max_connections_per_client" in error["message"]
            assert b"Retry-After: 1" in answer
            # Refused connections are closed, not kept.
            assert await asyncio.wait_for(extra.reader.read(), 10) == b""
            extra.close()

            other = await connect(port, source="127.0.0.2")
            assert (await other.healthz())[0] == 200
            other.close()

            # A connection closed makes room for the next one from the same client.
            held.pop().close()
            for _ in range(100):
                again = await connect(port)
                status, _ = await again.healthz()
                again.close()
                if status == 200:
                    break
                await asyncio.sleep(0.05)
            assert status == 200
        finally:
            for connection in held:
                connection.close()


async def test_past_the_total_limit_new_connections_get_503() -> None:
    async with gateway(max_connections=2, max_connections_per_client=0) as port:
        held = [await connect(port, source=f"127.0.0.{n}") for n in (2, 3)]
        try:
            for connection in held:
                assert (await connection.healthz())[0] == 200
            refused = await connect(port, source="127.0.0.4")
            status, answer = await refused.healthz()
            refused.close()
            assert status == 503
            assert b'"UNAVAILABLE"' in answer
        finally:
            for connection in held:
                connection.close()


def test_the_default_total_limit_leaves_descriptors_for_agents_and_logs() -> None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert 16 <= connection_limit(0) < soft // 2 + 1
    assert connection_limit(7) == 7


@pytest.mark.parametrize("field", ["max_connections", "max_connections_per_client"])
def test_negative_limits_are_refused_at_start(field: str) -> None:
    from agentapi_proxy.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match=field):
        load_settings(None, environ={f"AGENTAPI_GATEWAY_{field.upper()}": "-1"})


async def test_empty_lines_before_the_request_line_do_not_count_as_a_head() -> None:
    """Slowloris behind leading CRLFs: parsers skip them, so they must not stop the clock."""
    settings = GatewaySettings(
        listen="127.0.0.1:0",
        control_plane=f"127.0.0.1:{unused_port()}",
        header_timeout_seconds=1.0,
    )
    runner = await run_gateway(settings, shutdown_timeout=1)
    try:
        port = int(runner.addresses[0][1])
        connection = await connect(port)
        connection.writer.write(b"\r\n\r\nGET /healthz HTTP/1.1\r\n")
        closed = False
        for index in range(20):
            await asyncio.sleep(0.25)
            with contextlib.suppress(ConnectionError):
                connection.writer.write(b"X-Slow-%d: 1\r\n" % index)
            try:
                closed = await asyncio.wait_for(connection.reader.read(), 0.01) == b""
            except TimeoutError:
                closed = False
            except ConnectionError:
                closed = True
            if closed:
                break
        connection.close()
        assert closed, "a head that never ends kept its connection"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def gateway_with_head_deadline(seconds: float) -> AsyncIterator[int]:
    settings = GatewaySettings(
        listen="127.0.0.1:0",
        control_plane=f"127.0.0.1:{unused_port()}",
        header_timeout_seconds=seconds,
    )
    runner = await run_gateway(settings, shutdown_timeout=1)
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


async def closed_while_dripping(connection: Connection, *, steps: int = 20) -> bool:
    """Send a header line every 0.25 s; whether the gateway closed the connection."""
    for index in range(steps):
        await asyncio.sleep(0.25)
        with contextlib.suppress(ConnectionError):
            connection.writer.write(b"X-Slow-%d: 1\r\n" % index)
        try:
            if await asyncio.wait_for(connection.reader.read(), 0.01) == b"":
                return True
        except TimeoutError:
            continue
        except ConnectionError:
            return True
    return False


async def test_a_later_head_on_a_kept_alive_connection_has_a_deadline_too() -> None:
    async with gateway_with_head_deadline(1.0) as port:
        connection = await connect(port)
        try:
            # A first request with a body, so the gateway must skip it to find the next head.
            connection.writer.write(
                b"POST /healthz HTTP/1.1\r\nHost: g\r\nContent-Length: 5\r\n\r\nhello"
            )
            head = await asyncio.wait_for(connection.reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 ")
            connection.writer.write(b"GET /healthz HTTP/1.1\r\n")
            assert await closed_while_dripping(connection), "a later head never ended"
        finally:
            connection.close()


async def test_an_idle_kept_alive_connection_outlives_the_head_deadline() -> None:
    async with gateway_with_head_deadline(0.5) as port:
        connection = await connect(port)
        try:
            assert (await connection.healthz())[0] == 200
            await asyncio.sleep(1.5)
            assert (await connection.healthz())[0] == 200
        finally:
            connection.close()


@pytest.mark.parametrize(
    "first",
    [
        b"POST /healthz HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: g\r\nUpgrade: something\r\n\r\n",
    ],
)
async def test_after_a_chunked_body_or_an_upgrade_header_heads_are_still_timed(
    first: bytes,
) -> None:
    async with gateway_with_head_deadline(1.0) as port:
        connection = await connect(port)
        try:
            connection.writer.write(first)
            head = await asyncio.wait_for(connection.reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 ")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await connection.reader.readexactly(length)
            # The framing was followed to its end: a prompt request is served...
            assert (await connection.healthz())[0] == 200
            # ... and a dripped one is cut off.
            connection.writer.write(b"GET /healthz HTTP/1.1\r\n")
            assert await closed_while_dripping(connection), "a later head never ended"
        finally:
            connection.close()
