"""Field cases through the real gateway and control plane: K06, K07, K08, K09."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import grpc
import pytest

from agentapi_proxy.v1 import agent_service_pb2 as pb
from tests.harness import ProxyProcess, running_proxy, stub

NO_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_read=60)
# Reference agent that sends an SSE keepalive comment every second.
CHATTY = f"{sys.executable} -m agentapi_proxy.reference_agent --port {{port}} --sse-keepalive 1"
# Prints one 5 MiB line (no newline inside it), then stays up.
BIG_LINE = "sh -c 'head -c 5242880 /dev/zero | tr \"\\000\" x; echo; exec sleep 3600' # {port}"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ProxyProcess]:
    with running_proxy(tmp_path, env={"AGENTAPI_PROCESS_COMMAND": CHATTY}) as proxy:
        yield proxy


@pytest.fixture
async def http(served: ProxyProcess) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(served.base_url, timeout=NO_TIMEOUT) as session:
        yield session


async def create(http: aiohttp.ClientSession, agent_id: str, *, wait: bool = True) -> None:
    async with http.post("/sessions/s/agents", json={"agent_id": agent_id}) as response:
        assert response.status == 200, await response.text()
    if wait:
        async with http.post(f"/agents/{agent_id}:wait", json={}) as response:
            assert response.status == 200, await response.text()


class TestLargeBodies:
    async def test_five_mib_request_and_larger_response_through_the_gateway(
        self, http: aiohttp.ClientSession
    ) -> None:
        """K07: bodies above gRPC's 4 MiB message limit are split, not refused."""
        await create(http, "big")
        content = "y" * (5 * 1024 * 1024)
        body = io.BytesIO(json.dumps({"content": content, "type": "user"}).encode())
        async with http.post(
            "/agents/big/proxy/message",
            data=body,
            headers={"Content-Type": "application/json"},
        ) as response:
            assert response.status == 200, (await response.text())[:300]
        async with http.post("/agents/big:wait", json={}) as response:
            assert response.status == 200
        for _ in range(100):
            async with http.get("/agents/big/proxy/status") as response:
                if (await response.json())["status"] == "stable":
                    break
            await asyncio.sleep(0.1)
        async with http.get("/agents/big/proxy/messages") as response:
            assert response.status == 200
            body = await response.read()
        assert len(body) > 10 * 1024 * 1024
        messages = json.loads(body)["messages"]
        assert messages[0]["content"] == content
        assert messages[1]["content"] == "echo: " + content

    async def test_a_five_mib_log_line_arrives_whole(self, tmp_path: Path) -> None:
        env = {"AGENTAPI_PROCESS_COMMAND": BIG_LINE}
        with running_proxy(tmp_path, env=env) as proxy:
            async with aiohttp.ClientSession(proxy.base_url, timeout=NO_TIMEOUT) as http:
                await create(http, "bigline", wait=False)
                data = b""
                for _ in range(100):
                    async with http.get(
                        "/agents/bigline/logs", params={"format": "text"}
                    ) as response:
                        assert response.status == 200
                        data = await response.read()
                    if len(data) >= 5 * 1024 * 1024:
                        break
                    await asyncio.sleep(0.2)
                assert data == b"x" * (5 * 1024 * 1024) + b"\n"


class TestStreams:
    async def test_sse_is_not_buffered_compressed_or_sized(
        self, http: aiohttp.ClientSession
    ) -> None:
        """K08: keepalives sent each second arrive one by one through the gateway."""
        await create(http, "sse")
        async with http.get(
            "/agents/sse/proxy/events", headers={"Accept-Encoding": "gzip, deflate"}
        ) as events:
            assert events.status == 200
            assert "Content-Length" not in events.headers
            assert "Content-Encoding" not in events.headers
            arrivals = []
            while len(arrivals) < 4:
                line = await asyncio.wait_for(events.content.readline(), 30)
                if line.startswith(b":"):
                    arrivals.append(time.monotonic())
            # Four keepalives sent a second apart cannot arrive in one buffered lump.
            assert arrivals[-1] - arrivals[0] > 1.5

    async def test_follow_over_http_ends_with_a_visible_record(
        self, http: aiohttp.ClientSession
    ) -> None:
        """K09: before the first byte the real status; after it, a final record."""
        async with http.get("/agents/ghost/logs", params={"follow": "true"}) as response:
            assert response.status == 404
            assert (await response.json())["error"]["status"] == "NOT_FOUND"

        await create(http, "k9")
        async with http.get("/agents/k9/logs", params={"follow": "true"}) as ndjson:
            assert ndjson.status == 200
            first = json.loads(await asyncio.wait_for(ndjson.content.readline(), 30))
            assert "data" in first["result"]
            async with http.delete("/agents/k9") as response:
                assert response.status == 200
            records = [json.loads(line) for line in (await ndjson.read()).splitlines()]
        assert records[-1]["result"]["end"]["reason"] == "AgentDeleted"

    async def test_agent_traffic_to_missing_or_failed_agents(
        self, http: aiohttp.ClientSession
    ) -> None:
        async with http.get("/agents/ghost/proxy/status") as response:
            assert response.status == 404
            assert "ghost" in (await response.json())["error"]["message"]
        async with http.get("/agents/UPPER/proxy/status") as response:
            assert response.status == 400


async def test_sigterm_with_open_streams_exits_within_the_grace_period(
    served: ProxyProcess, http: aiohttp.ClientSession
) -> None:
    """K06: 5 log followers and 2 SSE streams open, then SIGTERM."""
    await create(http, "k6")
    channel, agents = stub(served.grpc_target)
    followers = [
        agents.StreamLogs(pb.StreamLogsRequest(agent_id="k6", follow=True)) for _ in range(5)
    ]
    for call in followers:
        await call.read()
    sse = [await http.get("/agents/k6/proxy/events") for _ in range(2)]
    for response in sse:
        assert response.status == 200
        await response.content.readline()

    assert served.proc is not None
    started = time.monotonic()
    served.proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(served.proc.wait, 60)
    elapsed = time.monotonic() - started
    assert code == 0, served.log_text()[-2000:]
    # Grace is 3 s in the harness; this bound only catches a hang, not slowness.
    assert elapsed < 30, elapsed

    for call in followers:
        assert await call.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    for response in sse:
        # Cut or ended: either way the client is not left hanging.
        with contextlib.suppress(aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
            await asyncio.wait_for(response.content.read(), 30)
        response.release()
    await channel.close()
    assert "Task was destroyed" not in served.log_text()


async def test_gateway_outlives_a_control_plane_restart(tmp_path: Path) -> None:
    """Requests in between get 503 with Retry-After; the gateway reconnects by itself."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        grpc_port = sock.getsockname()[1]
    plane_env = {"AGENTAPI_SERVER_GRPC_LISTEN": f"127.0.0.1:{grpc_port}"}
    gateway_env = {"AGENTAPI_GATEWAY_CONTROL_PLANE": f"127.0.0.1:{grpc_port}"}
    with (
        running_proxy(tmp_path / "plane", env=plane_env, command="control-plane") as plane,
        running_proxy(tmp_path / "gateway", env=gateway_env, command="gateway") as gateway,
    ):
        async with aiohttp.ClientSession(gateway.base_url, timeout=NO_TIMEOUT) as http:
            async with http.get("/agents") as response:
                assert response.status == 200

            plane.stop(signal.SIGKILL)
            async with http.get("/agents") as response:
                assert response.status == 503
                assert int(response.headers["Retry-After"]) >= 1
                assert (await response.json())["error"]["status"] == "UNAVAILABLE"

            plane.start()
            for _ in range(100):
                async with http.get("/agents") as response:
                    if response.status == 200:
                        break
                await asyncio.sleep(0.2)
            assert response.status == 200


async def test_a_client_slow_to_send_its_head_is_cut_off_but_streams_live_on(
    tmp_path: Path,
) -> None:
    """Slowloris: a header line every half second never completes a request."""
    env = {"AGENTAPI_PROCESS_COMMAND": CHATTY, "AGENTAPI_GATEWAY_HEADER_TIMEOUT_SECONDS": "1"}
    with running_proxy(tmp_path, env=env) as proxy:
        async with aiohttp.ClientSession(proxy.base_url, timeout=NO_TIMEOUT) as http:
            await create(http, "slow")
            async with http.get("/agents/slow/proxy/events") as events:
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.http_port)
                writer.write(b"GET /agents HTTP/1.1\r\nHost: x\r\n")
                closed = False
                for index in range(20):
                    await asyncio.sleep(0.5)
                    try:
                        writer.write(b"X-Slow-%d: 1\r\n" % index)
                        await writer.drain()
                        closed = await asyncio.wait_for(reader.read(), 0.01) == b""
                    except (ConnectionError, TimeoutError):
                        closed = closed or writer.transport.is_closing()
                    if closed:
                        break
                writer.close()
                assert closed, "the gateway kept a connection that never sent its head"
                assert index < 10
                # The SSE stream opened before is older than the deadline and still flows.
                line = await asyncio.wait_for(events.content.readline(), 30)
                assert line


async def test_kubectl_style_durations_work_in_queries(http: aiohttp.ClientSession) -> None:
    await create(http, "since")
    for since in ("5m", "1h30m", "300s"):
        async with http.get(
            "/agents/since/logs", params={"since": since, "format": "text"}
        ) as response:
            assert response.status == 200, await response.text()
            assert b"listening" in await response.read()
    async with http.get("/agents/since/logs", params={"since": "5 minutes"}) as response:
        assert response.status == 400
