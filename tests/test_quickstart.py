"""The README quick start, end to end: real serve, real gateway, real agents, HTTP only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.harness import ProxyProcess, group_members, port_is_free, running_proxy, sse_events


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ProxyProcess]:
    with running_proxy(tmp_path) as proxy:
        yield proxy


@pytest.fixture
async def http(served: ProxyProcess) -> AsyncIterator[aiohttp.ClientSession]:
    # No total timeout: SSE and log streams stay open (K08).
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession(served.base_url, timeout=timeout) as session:
        yield session


async def test_quick_start(served: ProxyProcess, http: aiohttp.ClientSession) -> None:
    # Create, as in the design document, with and without a body.
    async with http.post("/sessions/my-session/agents") as response:
        assert response.status == 200, await response.text()
        generated = (await response.json())["agent"]["agent_id"]
    async with http.post("/sessions/my-session/agents", json={"agent_id": "demo"}) as response:
        assert response.status == 200
        assert (await response.json())["agent"]["session_id"] == "my-session"
    async with http.post("/agents/demo:wait", json={"timeout": "60s"}) as response:
        agent = (await response.json())["agent"]
        assert agent["state"] == "AGENT_STATE_READY"
    port = int(agent["address"].rsplit(":", 1)[1])
    pgid = next(r["pid"] for r in served.agent_records() if r["spec"]["agent_id"] == "demo")  # type: ignore[index]

    async with http.get("/sessions/my-session/agents") as response:
        ids = sorted(a["agent_id"] for a in (await response.json())["agents"])
        assert ids == sorted(["demo", generated])

    # Watch SSE events while sending a message: they arrive one by one, stream stays open.
    async with http.get("/agents/demo/proxy/events") as events:
        assert events.status == 200
        assert events.headers["Content-Type"].startswith("text/event-stream")
        assert "Content-Length" not in events.headers
        stream = sse_events(events)
        first = await anext(stream)
        assert first[0] == "status_change"

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
        # The stream stays open after the answer: the agent's next events will come here.
        assert not events.content.at_eof()

    async with http.get("/agents/demo/proxy/messages") as response:
        messages = (await response.json())["messages"]
        assert [m["role"] for m in messages] == ["user", "agent"]

    # Follow the logs as text; deleting the agent ends the stream with a visible reason.
    async with http.get(
        "/agents/demo/logs", params={"follow": "true"}, headers={"Accept": "text/plain"}
    ) as logs:
        assert logs.status == 200
        seen = b""
        while b"answered with message 1" not in seen:
            seen += await asyncio.wait_for(logs.content.readany(), 30)
        async with http.delete("/agents/demo") as response:
            assert response.status == 200
            assert (await response.json())["agent"]["state"] == "AGENT_STATE_DELETED"
        rest = await asyncio.wait_for(logs.content.read(), 30)
        assert b"deleted" in rest.splitlines()[-1]

    assert group_members(pgid) == []
    assert port_is_free(port)
    async with http.get("/agents/demo") as response:
        assert response.status == 404
        assert (await response.json())["error"]["status"] == "NOT_FOUND"
    async with http.delete(f"/agents/{generated}") as response:
        assert response.status == 200
