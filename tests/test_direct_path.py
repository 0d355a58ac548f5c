"""The direct path (gateway.traffic_path = "direct"): same behaviour as ProxyHTTP, one hop less.

Real ``agentapi-proxy serve`` processes with real agents. Whether a request
took the direct path is read from the control plane's metrics: the direct
path calls GrantAgentAccess and never ProxyHTTP.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from yarl import URL

from agentapi_gateway.control_plane import ControlPlane
from agentapi_gateway.direct import ClientHeaderMap, Grant, GrantCache, PassedRequests
from agentapi_gateway.exchange import AgentRequest
from agentapi_proxy.errors import InvalidArgument
from agentapi_proxy.v1 import agent_service_pb2 as pb
from tests.harness import ProxyProcess, running_proxy, sse_events

DEADLINE = 60.0
NO_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_read=60)
ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdef00"

# An agent that answers every request with what it received, as JSON.
ECHO_AGENT = """
import argparse
from aiohttp import web

async def status(request):
    return web.json_response({"status": "stable", "agent_type": "echo"})

async def echo(request):
    body = await request.read()
    return web.json_response({
        "method": request.method,
        "target": request.raw_path,
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
        "body_bytes": len(body),
    })

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
app = web.Application(client_max_size=8 * 1024 * 1024)
app.router.add_get("/status", status)
app.router.add_route("*", "/{tail:.*}", echo)
web.run_app(app, host="127.0.0.1", port=parser.parse_args().port, print=None)
"""


def direct_env(**extra: str) -> dict[str, str]:
    return {
        "AGENTAPI_GATEWAY_TRAFFIC_PATH": "direct",
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


async def rpc_counts(proxy: ProxyProcess) -> dict[str, float]:
    """Calls per method from the control plane's metrics."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{proxy.metrics_port}/metrics") as response,
    ):
        text = await response.text()
    counts: dict[str, float] = {}
    for match in re.finditer(
        r'^agentapi_rpc_duration_seconds_count\{code="[A-Z_]+",method="(\w+)"\} (\S+)$',
        text,
        re.MULTILINE,
    ):
        counts[match[1]] = counts.get(match[1], 0.0) + float(match[2])
    return counts


# --- messages, SSE and large bodies over the direct path -----------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ProxyProcess]:
    with running_proxy(tmp_path, env=direct_env()) as proxy:
        yield proxy


@pytest.fixture
async def http(served: ProxyProcess) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(served.base_url, timeout=NO_TIMEOUT) as session:
        yield session


async def test_message_and_events_take_the_direct_path(
    served: ProxyProcess, http: aiohttp.ClientSession
) -> None:
    async with asyncio.timeout(DEADLINE):
        await create(http, "demo")
        async with http.get("/agents/demo/proxy/events") as events:
            assert events.status == 200
            assert events.headers["Content-Type"].startswith("text/event-stream")
            assert events.headers["X-Accel-Buffering"] == "no"
            assert "Content-Length" not in events.headers
            stream = sse_events(events)
            assert (await anext(stream))[0] == "status_change"

            async with http.post(
                "/agents/demo/proxy/message", json={"content": "hello", "type": "user"}
            ) as response:
                assert response.status == 200
                assert await response.json() == {"ok": True}

            texts = []
            async for name, data in stream:
                if name == "message_update" and data["role"] == "agent":
                    texts.append(data["message"])
                if name == "status_change" and data["status"] == "stable":
                    break
        assert texts[-1] == "echo: hello"
        assert len(texts) > 1, "the answer must arrive as it grows, not in one piece"

        counts = await rpc_counts(served)
    assert counts.get("GrantAgentAccess", 0) >= 1
    assert "ProxyHTTP" not in counts


async def test_five_mib_up_and_back_in_chunks(
    served: ProxyProcess, http: aiohttp.ClientSession
) -> None:
    content = "y" * (5 * 1024 * 1024)

    async def pieces() -> AsyncIterator[bytes]:
        data = json.dumps({"content": content, "type": "raw"}).encode()
        for offset in range(0, len(data), 256 * 1024):
            yield data[offset : offset + 256 * 1024]

    async with asyncio.timeout(DEADLINE):
        await create(http, "big")
        async with http.post(
            "/agents/big/proxy/message",
            data=pieces(),
            headers={"Content-Type": "application/json"},
        ) as response:
            assert response.status == 200, await response.text()
        as_one_piece = io.BytesIO(json.dumps({"content": content, "type": "user"}).encode())
        async with http.post(
            "/agents/big/proxy/message",
            data=as_one_piece,
            headers={"Content-Type": "application/json"},
        ) as response:
            assert response.status == 200, await response.text()
        async with http.get("/agents/big/proxy/messages") as response:
            assert response.status == 200
            reads = 0
            body = b""
            async for chunk in response.content.iter_any():
                reads += 1
                body += chunk
        messages = json.loads(body)["messages"]
    assert messages[0]["content"] == content
    assert reads > 1
    assert "ProxyHTTP" not in await rpc_counts(served)


async def test_sigterm_breaks_open_direct_streams_off(tmp_path: Path) -> None:
    # A grace period far beyond the hang guard: only breaking the stream off can pass.
    env = direct_env(AGENTAPI_SERVER_SHUTDOWN_GRACE_SECONDS="120")
    with running_proxy(tmp_path, env=env) as served:
        async with (
            aiohttp.ClientSession(served.base_url, timeout=NO_TIMEOUT) as http,
            asyncio.timeout(DEADLINE),
        ):
            await create(http, "sse")
            async with http.get("/agents/sse/proxy/events") as events:
                await events.content.readuntil(b"\n\n")
                assert served.proc is not None
                served.proc.send_signal(signal.SIGTERM)
                with pytest.raises(aiohttp.ClientPayloadError):
                    await events.read()
            code = await asyncio.to_thread(served.proc.wait, DEADLINE)
        assert code == 0, served.log_text()[-2000:]
        assert "Task was destroyed" not in served.log_text()


# --- authorization: the control plane decides, the gateway remembers briefly ---------------


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[ProxyProcess]:
    keys = tmp_path / "keys.json"
    write_keys(keys, [("alice", ALICE), ("bob", BOB)])
    env = direct_env(
        AGENTAPI_AUTH_ENABLED="true",
        AGENTAPI_AUTH_API_KEYS_FILE=str(keys),
        AGENTAPI_GATEWAY_DIRECT_GRANT_TTL_SECONDS="0.5",
    )
    with running_proxy(tmp_path / "state", env=env) as proxy:
        yield proxy


def write_keys(path: Path, users: list[tuple[str, str]]) -> None:
    entries = [
        {"key": key, "user_id": user, "role": "user", "permissions": ["*"]} for user, key in users
    ]
    path.write_text(json.dumps({"api_keys": entries}))


async def status_of(http: aiohttp.ClientSession, path: str, *, key: str = "") -> int:
    headers = {"X-API-Key": key} if key else {}
    async with http.get(path, headers=headers) as response:
        await response.read()
        return response.status


async def test_another_users_agent_is_not_found(secured: ProxyProcess) -> None:
    async with (
        aiohttp.ClientSession(secured.base_url, timeout=NO_TIMEOUT) as http,
        asyncio.timeout(DEADLINE),
    ):
        await create(http, "mine", key=ALICE)
        assert await status_of(http, "/agents/mine/proxy/status", key=ALICE) == 200

        async with http.get("/agents/mine/proxy/status", headers={"X-API-Key": BOB}) as theirs:
            refused = await theirs.json()
        async with http.get("/agents/none/proxy/status", headers={"X-API-Key": BOB}) as missing:
            absent = await missing.json()
        assert (theirs.status, missing.status) == (404, 404)
        assert refused["error"]["message"].replace("mine", "X") == absent["error"][
            "message"
        ].replace("none", "X")
        assert await status_of(http, "/agents/mine/proxy/status") == 401


async def test_a_revoked_key_stops_working_when_its_grant_runs_out(
    secured: ProxyProcess, tmp_path: Path
) -> None:
    async with (
        aiohttp.ClientSession(secured.base_url, timeout=NO_TIMEOUT) as http,
        asyncio.timeout(DEADLINE),
    ):
        await create(http, "kept", key=ALICE)
        assert await status_of(http, "/agents/kept/proxy/status", key=ALICE) == 200
        write_keys(tmp_path / "keys.json", [("bob", BOB)])

        last = 200
        while last == 200:
            last = await status_of(http, "/agents/kept/proxy/status", key=ALICE)
            await asyncio.sleep(0.05)
        assert last == 401


async def test_a_deleted_agent_is_not_found_at_once(secured: ProxyProcess) -> None:
    async with (
        aiohttp.ClientSession(secured.base_url, timeout=NO_TIMEOUT) as http,
        asyncio.timeout(DEADLINE),
    ):
        await create(http, "gone", key=ALICE)
        assert await status_of(http, "/agents/gone/proxy/status", key=ALICE) == 200
        async with http.delete("/agents/gone", headers={"X-API-Key": ALICE}) as response:
            assert response.status == 200
        # The grant is still fresh: the failed connection sends the gateway back to
        # the control plane, whose answer is the one the client sees.
        assert await status_of(http, "/agents/gone/proxy/status", key=ALICE) == 404


# --- the agent sees exactly what it sees through ProxyHTTP ----------------------------------


@pytest.fixture
def both_paths(tmp_path: Path) -> Iterator[dict[str, ProxyProcess]]:
    script = tmp_path / "echo_agent.py"
    script.write_text(ECHO_AGENT)
    command = f"{sys.executable} {script} --port {{port}}"
    with (
        running_proxy(tmp_path / "grpc", env={"AGENTAPI_PROCESS_COMMAND": command}) as through_grpc,
        running_proxy(
            tmp_path / "direct", env=direct_env(AGENTAPI_PROCESS_COMMAND=command)
        ) as direct_proxy,
    ):
        yield {"grpc": through_grpc, "direct": direct_proxy}


async def raw_status(url: str) -> int:
    """GET ``url`` exactly as written: the client resolves no dot-segments."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(URL(url, encoded=True)) as response,
    ):
        await response.read()
        return response.status


def normalized(echoed: dict[str, Any], proxy: ProxyProcess) -> dict[str, Any]:
    """The echo with this path's own ports replaced, so both paths compare equal."""
    headers = []
    for name, value in echoed["headers"]:
        if name.lower() == "host":
            value = re.sub(r":\d+$", ":AGENT", value)
        value = value.replace(f":{proxy.http_port}", ":GATEWAY")
        headers.append((name, value))
    return {**echoed, "headers": headers}


async def test_headers_path_and_body_reach_the_agent_as_through_grpc(
    both_paths: dict[str, ProxyProcess],
) -> None:
    sent_headers = {
        "Authorization": "Bearer t0k",
        "X-API-Key": "k1",
        "Connection": "X-Hop, keep-alive",
        "X-Hop": "1",
        "Proxy-Authorization": "Basic eA==",
        "TE": "trailers",
        "X-End": "2",
        "X-Forwarded-For": "10.0.0.1",
    }
    seen: dict[str, list[dict[str, Any]]] = {}
    async with asyncio.timeout(DEADLINE):
        for name, proxy in both_paths.items():
            async with aiohttp.ClientSession(proxy.base_url, timeout=NO_TIMEOUT) as http:
                await create(http, "echo")
                echoes = []
                for method, body in (("GET", None), ("POST", b"z" * 100_000)):
                    async with http.request(
                        method,
                        "/agents/echo/proxy/files/a%20b?x=%20y&z",
                        headers=sent_headers,
                        data=body,
                    ) as response:
                        assert response.status == 200, await response.text()
                        echoes.append(normalized(await response.json(), proxy))
                        echoes.append({"response_headers": sorted(response.headers)})
                async with http.head("/agents/echo/proxy/status") as response:
                    echoes.append({"head": (response.status, response.headers["Content-Length"])})
                for refused in ("/agents/echo/proxy/a%2Fb", "/agents/echo/proxy/%2e%2e/x"):
                    assert await raw_status(proxy.base_url + refused) == 400, (name, refused)
                seen[name] = echoes

    assert seen["direct"] == seen["grpc"]
    got, _, posted, _, head = seen["direct"]
    assert head["head"][0] == 200 and int(head["head"][1]) > 0
    names = {header.lower() for header, _ in got["headers"]}
    assert got["target"] == "/files/a%20b?x=%20y&z"
    assert dict((k.lower(), v) for k, v in got["headers"])["host"] == "localhost:AGENT"
    assert {"x-end", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto"} <= names
    assert not {"authorization", "x-api-key", "x-hop", "proxy-authorization", "te"} & names
    assert posted["body_bytes"] == 100_000
    assert "ProxyHTTP" not in await rpc_counts(both_paths["direct"])


# --- the pieces, without servers ------------------------------------------------------------


class FakePlane:
    """Answers GrantAgentAccess from a script, counting calls; no server."""

    def __init__(self, *, lifetime: float) -> None:
        self.calls = 0
        self.lifetime = lifetime
        self.release = asyncio.Event()

    def as_control_plane(self) -> ControlPlane:
        return cast(ControlPlane, self)

    def rpc(self, name: str) -> Any:
        assert name == "GrantAgentAccess"

        async def call(request: pb.GrantAgentAccessRequest, **_: Any) -> Any:
            self.calls += 1
            await self.release.wait()
            reply = pb.GrantAgentAccessResponse(base_url="http://127.0.0.1:1/", host="h:1")
            reply.expire_time.FromNanoseconds(int((time.time() + self.lifetime) * 1e9))
            return reply

        return call


async def test_concurrent_first_requests_share_one_grant_call() -> None:
    plane = FakePlane(lifetime=60)
    cache = GrantCache(ttl=60)
    key = cache.key("a1", (("x-api-key", ALICE),))
    waiters = [
        asyncio.create_task(cache.get(key, metadata=(), plane=plane.as_control_plane()))
        for _ in range(20)
    ]
    await asyncio.sleep(0)
    plane.release.set()
    grants = await asyncio.gather(*waiters)
    assert plane.calls == 1
    assert {g.base_url for g in grants} == {"http://127.0.0.1:1"}
    await cache.get(key, metadata=(), plane=plane.as_control_plane())
    assert plane.calls == 1


async def test_grants_are_per_credential_and_end_with_the_control_planes_expiry() -> None:
    plane = FakePlane(lifetime=-1)
    plane.release.set()
    cache = GrantCache(ttl=60)
    alice = cache.key("a1", (("x-api-key", ALICE),))
    bob = cache.key("a1", (("x-api-key", BOB),))
    assert alice != bob
    assert ALICE.encode() not in alice[1]

    await cache.get(alice, metadata=(), plane=plane.as_control_plane())
    await cache.get(alice, metadata=(), plane=plane.as_control_plane())
    assert plane.calls == 2, "an expired grant is asked for again"

    plane.lifetime = 60
    await cache.get(bob, metadata=(), plane=plane.as_control_plane())
    await cache.get(bob, metadata=(), plane=plane.as_control_plane())
    assert plane.calls == 3
    cache.drop(bob)
    await cache.get(bob, metadata=(), plane=plane.as_control_plane())
    assert plane.calls == 4


async def test_the_cache_holds_at_most_its_limit() -> None:
    plane = FakePlane(lifetime=60)
    plane.release.set()
    cache = GrantCache(ttl=60, max_grants=3)
    keys = [cache.key(f"a{i}", ()) for i in range(5)]
    for key in keys:
        await cache.get(key, metadata=(), plane=plane.as_control_plane())
    for key in keys[-3:]:
        await cache.get(key, metadata=(), plane=plane.as_control_plane())
    assert plane.calls == 5
    await cache.get(keys[0], metadata=(), plane=plane.as_control_plane())
    assert plane.calls == 6


def test_an_empty_grant_means_proxyhttp() -> None:
    assert not Grant(base_url="", host="", expires=0.0).direct
    assert Grant(base_url="http://127.0.0.1:1", host="localhost:1", expires=0.0).direct


# --- agents that misbehave, and clients that leave -------------------------------------------

# A raw agent: answers /status, breaks HTTP framing on /bad/*, and streams /stream until
# its reader leaves; /streams says how many of those streams are still open.
RAW_AGENT = """
import argparse, asyncio

open_streams = 0

BAD = {
    "/bad/framing": b"HTTP/1.1 200 OK\\r\\nContent-Length: 5\\r\\n"
    b"Transfer-Encoding: chunked\\r\\n\\r\\n5\\r\\nhello\\r\\n0\\r\\n\\r\\n",
    "/bad/fold": b"HTTP/1.1 200 OK\\r\\nX-A: 1\\r\\n folded\\r\\nContent-Length: 0\\r\\n\\r\\n",
    "/bad/cut": b"HTTP/1.1 200 OK\\r\\nContent-Length: 100\\r\\n\\r\\nshort",
}

def answer(body):
    return b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n%s" % (len(body), body)

async def serve(reader, writer):
    global open_streams
    try:
        while True:
            head = await reader.readuntil(b"\\r\\n\\r\\n")
            path = head.split(b" ")[1].decode()
            if path in BAD:
                writer.write(BAD[path])
                await writer.drain()
                writer.close()
                return
            if path == "/stream":
                open_streams += 1
                try:
                    writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Type: text/event-stream\\r\\n"
                                 b"Transfer-Encoding: chunked\\r\\n\\r\\n")
                    while True:
                        writer.write(b"9\\r\\ndata: x\\n\\n\\r\\n")
                        await writer.drain()
                        await asyncio.sleep(0.05)
                finally:
                    open_streams -= 1
            body = b'{"status": "stable"}' if path == "/status" else b"%d" % open_streams
            writer.write(answer(body))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()

async def main(port):
    server = await asyncio.start_server(serve, "127.0.0.1", port)
    async with server:
        await server.serve_forever()

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
asyncio.run(main(parser.parse_args().port))
"""


@pytest.fixture
def raw_agent_paths(tmp_path: Path) -> Iterator[dict[str, ProxyProcess]]:
    script = tmp_path / "raw_agent.py"
    script.write_text(RAW_AGENT)
    command = f"{sys.executable} {script} --port {{port}}"
    with (
        running_proxy(tmp_path / "grpc", env={"AGENTAPI_PROCESS_COMMAND": command}) as through_grpc,
        running_proxy(
            tmp_path / "direct", env=direct_env(AGENTAPI_PROCESS_COMMAND=command)
        ) as direct_proxy,
    ):
        yield {"grpc": through_grpc, "direct": direct_proxy}


async def test_a_malformed_agent_response_is_503_as_through_grpc(
    raw_agent_paths: dict[str, ProxyProcess],
) -> None:
    seen: dict[str, list[tuple[int, str]]] = {}
    async with asyncio.timeout(DEADLINE):
        for name, proxy in raw_agent_paths.items():
            async with aiohttp.ClientSession(proxy.base_url, timeout=NO_TIMEOUT) as http:
                await create(http, "raw")
                answers = []
                for bad in ("framing", "cut"):
                    async with http.get(f"/agents/raw/proxy/bad/{bad}") as response:
                        error = (await response.json())["error"]
                        answers.append((response.status, error.get("reason", "")))
                async with http.get("/agents/raw/proxy/status") as response:
                    answers.append((response.status, json.loads(await response.text())["status"]))
                seen[name] = answers
        # Stricter than ProxyHTTP's client, which accepts obs-fold: a folded line is one a
        # later hop may read differently, so the direct path refuses it.
        async with (
            aiohttp.ClientSession(raw_agent_paths["direct"].base_url, timeout=NO_TIMEOUT) as http,
            http.get("/agents/raw/proxy/bad/fold") as response,
        ):
            assert response.status == 503
            assert (await response.json())["error"]["reason"] == "AgentResponseInvalid"
    assert seen["direct"] == seen["grpc"]
    assert seen["direct"] == [(503, "AgentResponseInvalid")] * 2 + [(200, "stable")]
    assert "ProxyHTTP" not in await rpc_counts(raw_agent_paths["direct"])


async def test_a_client_that_leaves_a_stream_ends_it_at_the_agent(
    raw_agent_paths: dict[str, ProxyProcess],
) -> None:
    proxy = raw_agent_paths["direct"]
    async with (
        aiohttp.ClientSession(proxy.base_url, timeout=NO_TIMEOUT) as http,
        asyncio.timeout(DEADLINE),
    ):
        await create(http, "raw")

        async def open_streams() -> int:
            async with http.get("/agents/raw/proxy/streams") as response:
                return int(await response.text())

        async with aiohttp.ClientSession(proxy.base_url, timeout=NO_TIMEOUT) as leaving:
            async with leaving.get("/agents/raw/proxy/stream") as stream:
                assert await stream.content.readuntil(b"\n\n") == b"data: x\n\n"
                assert await open_streams() == 1
        # The gateway must close its connection to the agent (polled: another process).
        for _ in range(int(DEADLINE / 0.05)):
            if not await open_streams():
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the agent's stream stayed open after its client left")


def request_with(headers: list[tuple[str, str]], *, path: str = "/status") -> AgentRequest:
    return AgentRequest(agent_id="a1", method="GET", path=path, query="", headers=headers)


def test_remembered_checks_still_refuse_every_bad_request() -> None:
    passed = PassedRequests(size=2)
    good = [("X-A", "1")]
    for _ in range(2):
        passed.check(request_with(good))
    bad_requests = [
        request_with([("X-A", "1\r\nX-B: 2")]),
        request_with([*good, ("Content-Length", "1"), ("Content-Length", "2")]),
        request_with(good, path="/a/%2e%2e/b"),
    ]
    for bad in bad_requests * 2:
        with pytest.raises(InvalidArgument):
            passed.check(bad)
    # Past its size the memory starts over, and checks still hold.
    for index in range(5):
        passed.check(request_with([("X-N", str(index))]))
    with pytest.raises(InvalidArgument):
        passed.check(bad_requests[0])


def test_remembered_response_headers_follow_the_header_rules() -> None:
    mapped = ClientHeaderMap(size=2)
    sent = [("Connection", "X-Hop"), ("X-Hop", "1"), ("Keep-Alive", "5"), ("X-End", "2")]
    for _ in range(2):
        headers = mapped.of(sent)
        assert sorted(headers.items()) == [("X-Accel-Buffering", "no"), ("X-End", "2")]
    assert mapped.of([("X-Accel-Buffering", "yes")])["X-Accel-Buffering"] == "yes"
