"""TunnelHTTP: the gateway carries small agent exchanges over one long-lived stream.

Real ``agentapi-proxy`` processes and a test agent. Whether an exchange took
the tunnel is read from the control plane's metrics (each exchange counts
as ``TunnelHTTP.exchange``, with its status code).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import grpc
import pytest

from agentapi_gateway.errors import http_status
from agentapi_proxy.v1 import agent_service_pb2 as pb
from tests.harness import ProxyProcess, running_proxy, stub

DEADLINE = 60.0
NO_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_read=60)
ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdef00"
# Holds a key but not session:access.
CAROL = "carol-key-0123456789abcdef"
BIG_BYTES = 64 * 1024 * 1024

# /echo answers its body and query back; /big streams BIG_BYTES and counts what it
# wrote; /events sends one SSE event now and one more per POST /fire; /hang and
# /hang-head hold a request open (the latter after sending its head), and /open
# counts the requests held open right now.
AGENT = """
import argparse, asyncio, json, random
from aiohttp import web

state = {"written": 0, "open": 0, "fire": asyncio.Event()}

async def status(request):
    return web.json_response({"status": "stable", "agent_type": "tunnel-test"})

async def echo(request):
    body = await request.read()
    await asyncio.sleep(random.random() / 100)
    return web.Response(body=body + b"|" + request.query_string.encode())

async def big(request):
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = BIG
    await response.prepare(request)
    chunk = b"z" * 65536
    for _ in range(BIG // len(chunk)):
        await response.write(chunk)
        state["written"] += len(chunk)
    await response.write_eof()
    return response

async def written(request):
    return web.json_response(state["written"])

async def events(request):
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for number in range(3):
        await response.write(b"event: tick\\ndata: %d\\n\\n" % number)
        state["fire"] = asyncio.Event()
        await state["fire"].wait()
    await response.write_eof()
    return response

async def fire(request):
    state["fire"].set()
    return web.json_response("fired")

async def hang(request):
    state["open"] += 1
    try:
        if request.path == "/hang-head":
            response = web.StreamResponse()
            await response.prepare(request)
            await response.write(b"started")
        await asyncio.sleep(3600)
    finally:
        state["open"] -= 1

async def held(request):
    return web.json_response(state["open"])

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--big", type=int, required=True)
args = parser.parse_args()
BIG = args.big
app = web.Application()
app.router.add_get("/status", status)
app.router.add_post("/echo", echo)
app.router.add_get("/big", big)
app.router.add_get("/written", written)
app.router.add_get("/events", events)
app.router.add_post("/fire", fire)
app.router.add_get("/hang", hang)
app.router.add_get("/hang-head", hang)
app.router.add_get("/open", held)
web.run_app(app, host="127.0.0.1", port=args.port, print=None, handler_cancellation=True)
"""


def agent_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    script = tmp_path / "tunnel_agent.py"
    script.write_text(AGENT)
    return {
        "AGENTAPI_PROCESS_COMMAND": f"{sys.executable} {script} --port {{port}} --big {BIG_BYTES}",
        "AGENTAPI_SERVER_METRICS_LISTEN": "127.0.0.1:0",
        **extra,
    }


async def create(http: aiohttp.ClientSession, agent_id: str, *, key: str = "") -> None:
    headers = {"X-API-Key": key} if key else {}
    async with http.post(
        "/sessions/s/agents", json={"agent_id": agent_id}, headers=headers
    ) as response:
        assert response.status == 200, await response.text()
    async with http.post(f"/agents/{agent_id}:wait", json={}, headers=headers) as response:
        assert response.status == 200, await response.text()


async def metrics_text(proxy: ProxyProcess) -> str:
    url = f"http://127.0.0.1:{proxy.metrics_port or proxy.http_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.text()


async def tunnel_exchanges(proxy: ProxyProcess) -> dict[str, float]:
    """Tunnel exchanges so far, by status code name."""
    counts: dict[str, float] = {}
    pattern = (
        r'^agentapi_rpc_duration_seconds_count\{code="(\w+)",method="TunnelHTTP.exchange"\} (\S+)$'
    )
    for match in re.finditer(pattern, await metrics_text(proxy), re.MULTILINE):
        counts[match[1]] = float(match[2])
    return counts


async def open_tunnels(proxy: ProxyProcess) -> float:
    match = re.search(
        r'^agentapi_open_streams\{method="TunnelHTTP"\} (\S+)$',
        await metrics_text(proxy),
        re.MULTILINE,
    )
    return float(match[1]) if match else 0.0


async def agent_json(http: aiohttp.ClientSession, agent_id: str, path: str) -> object:
    async with http.get(f"/agents/{agent_id}/proxy{path}") as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def until(check: Callable[[], Awaitable[bool]], *, pause: float = 0.05) -> None:
    """Poll ``check`` until it holds; the test's deadline is the hang guard."""
    for _ in itertools.count():
        if await check():
            return
        await asyncio.sleep(pause)


async def holds(http: aiohttp.ClientSession, count: int) -> bool:
    """Whether the "leaver" agent holds ``count`` requests open now."""
    return await agent_json(http, "leaver", "/open") == count


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ProxyProcess]:
    with running_proxy(tmp_path / "state", env=agent_env(tmp_path)) as proxy:
        try:
            yield proxy
        finally:
            proxy.kill_leftovers()


@pytest.fixture
async def http(served: ProxyProcess) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        served.base_url, timeout=NO_TIMEOUT, connector=connector
    ) as session:
        yield session


async def test_concurrent_exchanges_share_one_tunnel_and_reach_their_callers(
    served: ProxyProcess, http: aiohttp.ClientSession
) -> None:
    async with asyncio.timeout(DEADLINE):
        await create(http, "many")
        before = (await tunnel_exchanges(served)).get("OK", 0.0)

        async def one(index: int) -> tuple[int, bytes]:
            body = f"body-{index}-".encode() * (1 + index % 50)
            async with http.post(f"/agents/many/proxy/echo?n={index}", data=body) as response:
                return response.status, await response.read()

        results = await asyncio.gather(*(one(index) for index in range(300)))
        for index, (status, answer) in enumerate(results):
            assert status == 200
            assert answer == f"body-{index}-".encode() * (1 + index % 50) + f"|n={index}".encode()
        assert (await tunnel_exchanges(served)).get("OK", 0.0) - before >= 300
        assert await open_tunnels(served) == 1


async def test_sse_arrives_event_by_event(
    served: ProxyProcess, http: aiohttp.ClientSession
) -> None:
    """Each event is sent only after the previous one arrived: a buffered one would hang."""
    async with asyncio.timeout(DEADLINE):
        await create(http, "sse")
        async with http.get("/agents/sse/proxy/events") as events:
            assert events.status == 200
            assert "Content-Length" not in events.headers
            for number in range(3):
                assert await events.content.readline() == b"event: tick\n"
                assert await events.content.readline() == f"data: {number}\n".encode()
                assert await events.content.readline() == b"\n"
                async with http.post("/agents/sse/proxy/fire") as fired:
                    assert fired.status == 200
            assert await events.content.read() == b""
        assert (await tunnel_exchanges(served)).get("OK", 0.0) >= 4


async def test_a_slow_reader_of_a_large_download_stalls_only_itself(
    served: ProxyProcess, http: aiohttp.ClientSession
) -> None:
    async with asyncio.timeout(DEADLINE):
        await create(http, "big")
        async with http.get("/agents/big/proxy/big") as download:
            assert download.status == 200
            assert await download.content.readexactly(65536) == b"z" * 65536
            # The client reads no more for now; other exchanges go on meanwhile.
            for _ in range(20):
                async with http.post("/agents/big/proxy/echo", data=b"small") as response:
                    assert response.status == 200
                    assert await response.read() == b"small|"
            # Credit bounds what the agent could send: it stops far short of the end.
            seen: list[object] = []

            async def settled() -> bool:
                seen.append(await agent_json(http, "big", "/written"))
                return len(seen) >= 5 and len(set(seen[-5:])) == 1

            await until(settled, pause=0.1)
            assert isinstance(seen[-1], int) and seen[-1] < BIG_BYTES // 2
            rest = 0
            async for chunk in download.content.iter_any():
                assert chunk == b"z" * len(chunk)
                rest += len(chunk)
            assert rest == BIG_BYTES - 65536


@pytest.mark.parametrize("path", ["/hang", "/hang-head"])
async def test_a_client_that_leaves_cancels_the_agent_request(
    served: ProxyProcess, http: aiohttp.ClientSession, path: str
) -> None:
    async with asyncio.timeout(DEADLINE):
        await create(http, "leaver")
        client = aiohttp.ClientSession(served.base_url, timeout=NO_TIMEOUT)
        try:
            request = asyncio.ensure_future(client.get(f"/agents/leaver/proxy{path}"))
            await until(lambda: holds(http, 1))
            if path == "/hang-head":
                response = await request
                assert await response.content.readexactly(7) == b"started"
                response.close()
            else:
                request.cancel()
        finally:
            await client.close()
        await until(lambda: holds(http, 0))


async def test_each_exchange_is_checked_on_its_own_credentials(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    entries = [
        {"key": ALICE, "user_id": "alice", "permissions": ["*"]},
        {"key": BOB, "user_id": "bob", "permissions": ["*"]},
        {"key": CAROL, "user_id": "carol", "permissions": ["session:list"]},
    ]
    keys.write_text(json.dumps({"api_keys": entries}))
    env = agent_env(tmp_path, AGENTAPI_AUTH_ENABLED="true", AGENTAPI_AUTH_API_KEYS_FILE=str(keys))
    with running_proxy(tmp_path / "state", env=env) as proxy:
        try:
            async with (
                aiohttp.ClientSession(proxy.base_url, timeout=NO_TIMEOUT) as http,
                asyncio.timeout(DEADLINE),
            ):
                await create(http, "mine", key=ALICE)

                async def over_http(key: str) -> int:
                    headers = {"X-API-Key": key} if key else {}
                    async with http.post(
                        "/agents/mine/proxy/echo", data=b"x", headers=headers
                    ) as response:
                        await response.read()
                        return response.status

                async def over_proxy_http(key: str) -> int:
                    channel, agents = stub(proxy.grpc_target)
                    try:
                        call = agents.ProxyHTTP(
                            iter(
                                [
                                    pb.ProxyHTTPRequest(
                                        head=pb.HTTPRequestHead(
                                            agent_id="mine", method="POST", path="/echo"
                                        ),
                                        body=b"x",
                                        end_of_body=True,
                                    )
                                ]
                            ),
                            metadata=(("x-api-key", key),) if key else (),
                        )
                        async for _ in call:
                            pass
                        return http_status(await call.code())
                    except grpc.aio.AioRpcError as exc:
                        return http_status(exc.code())
                    finally:
                        await channel.close()

                # Alice's exchange opens the tunnel; the others ride it with their keys.
                assert await over_http(ALICE) == 200
                expected = {ALICE: 200, BOB: 404, CAROL: 403, "": 401, "not-a-key-0123456789": 401}
                for key, status in expected.items():
                    assert await over_http(key) == status, key
                    assert await over_proxy_http(key) == status, key
                counts = await tunnel_exchanges(proxy)
                assert counts.get("NOT_FOUND") == 1
                assert counts.get("PERMISSION_DENIED") == 1
                assert counts.get("UNAUTHENTICATED") == 2
                assert await open_tunnels(proxy) == 1
        finally:
            proxy.kill_leftovers()


async def test_a_control_plane_restart_fails_open_exchanges_then_recovers(
    tmp_path: Path,
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        grpc_port = sock.getsockname()[1]
    plane_env = agent_env(tmp_path, AGENTAPI_SERVER_GRPC_LISTEN=f"127.0.0.1:{grpc_port}")
    gateway_env = {"AGENTAPI_GATEWAY_CONTROL_PLANE": f"127.0.0.1:{grpc_port}"}
    with (
        running_proxy(tmp_path / "plane", env=plane_env, command="control-plane") as plane,
        running_proxy(tmp_path / "gateway", env=gateway_env, command="gateway") as gateway,
    ):
        try:
            async with (
                aiohttp.ClientSession(gateway.base_url, timeout=NO_TIMEOUT) as http,
                asyncio.timeout(DEADLINE),
            ):
                await create(http, "phoenix")
                async with http.post("/agents/phoenix/proxy/echo", data=b"1") as response:
                    assert response.status == 200
                events = await http.get("/agents/phoenix/proxy/events")
                assert await events.content.readline() == b"event: tick\n"

                plane.stop(signal.SIGKILL)
                # The open stream is broken off, not ended cleanly.
                with pytest.raises(aiohttp.ClientPayloadError):
                    await events.content.read()
                events.release()
                async with http.post("/agents/phoenix/proxy/echo", data=b"2") as response:
                    assert response.status == 503
                    assert int(response.headers["Retry-After"]) >= 1
                    assert (await response.json())["error"]["status"] == "UNAVAILABLE"

                plane.start()
                statuses: list[int] = []

                async def answered() -> bool:
                    async with http.post("/agents/phoenix/proxy/echo", data=b"3") as response:
                        statuses.append(response.status)
                        return response.status == 200 and await response.read() == b"3|"

                await until(answered, pause=0.2)
                assert set(statuses) <= {200, 503}
                assert (await tunnel_exchanges(plane)).get("OK", 0.0) >= 1
        finally:
            plane.kill_leftovers()


async def test_the_tunnel_needs_an_authenticated_opener(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"api_keys": [{"key": ALICE, "user_id": "alice"}]}))
    env = {"AGENTAPI_AUTH_ENABLED": "true", "AGENTAPI_AUTH_API_KEYS_FILE": str(keys)}
    with running_proxy(tmp_path / "state", env=env, command="control-plane") as plane:
        channel, agents = stub(plane.grpc_target)
        try:
            call = agents.TunnelHTTP(iter([pb.TunnelHTTPRequest()]))
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                async for _ in call:
                    pass
            assert failure.value.code() is grpc.StatusCode.UNAUTHENTICATED
        finally:
            await channel.close()


async def test_each_open_tunnel_holds_one_of_its_openers_stream_slots(tmp_path: Path) -> None:
    env = {"AGENTAPI_SERVER_MAX_STREAMS_PER_USER": "2"}
    with running_proxy(tmp_path / "state", env=env, command="control-plane") as plane:
        channel, agents = stub(plane.grpc_target)
        gate = asyncio.Event()

        async def idle() -> AsyncIterator[pb.TunnelHTTPRequest]:
            await gate.wait()
            yield pb.TunnelHTTPRequest()

        try:
            held = [agents.TunnelHTTP(idle()) for _ in range(2)]
            for call in held:
                await asyncio.wait_for(call.initial_metadata(), DEADLINE)
            third = agents.TunnelHTTP(idle())
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                async with asyncio.timeout(DEADLINE):
                    async for _ in third:
                        pass
            assert failure.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_streams_per_user" in (failure.value.details() or "")
            for call in held:
                call.cancel()
        finally:
            gate.set()
            await channel.close()
