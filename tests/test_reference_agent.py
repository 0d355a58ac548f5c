"""The reference agent, run as a real process on a free port and used over HTTP.

Each test starts ``python -m agentapi_proxy.reference_agent --port 0`` (the port
is read back from its start-up log line) and kills it in teardown.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agentapi_proxy.reference_agent import BUSY_DETAIL

# Hang guard for every wait; never an expectation about speed.
DEADLINE = 30.0
STARTUP_LINE = re.compile(r"listening on http://127\.0\.0\.1:(\d+) ")


@dataclass
class RunningAgent:
    process: asyncio.subprocess.Process
    workdir: Path
    lines: list[str] = field(default_factory=list)
    output_ended: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait_for_line(self, pattern: str) -> re.Match[str]:
        """The first log line matching ``pattern``; fails if the output ends without one."""
        compiled = re.compile(pattern)
        async with asyncio.timeout(DEADLINE):
            while True:
                self.changed.clear()
                for line in self.lines:
                    if match := compiled.search(line):
                        return match
                if self.output_ended:
                    log = "\n".join(self.lines)
                    raise AssertionError(f"no log line matches {pattern!r}; log:\n{log}")
                await self.changed.wait()


class Launcher:
    """Starts agents for one test and kills whatever is still running at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self._tmp_path = tmp_path
        self._agents: list[RunningAgent] = []
        self._readers: list[asyncio.Task[None]] = []

    async def start(
        self, *args: str, env: Mapping[str, str] | None = None, wait_ready: bool = True
    ) -> RunningAgent:
        workdir = self._tmp_path / f"agent{len(self._agents)}"
        workdir.mkdir()
        full_env = {k: v for k, v in os.environ.items() if k != "AGENTAPI_ALLOWED_HOSTS"}
        full_env.update({"AGENT_ID": "a1", "SESSION_ID": "s1"})
        full_env.update(env or {})
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agentapi_proxy.reference_agent",
            "--port",
            "0",
            *args,
            cwd=workdir,
            env=full_env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        agent = RunningAgent(process=process, workdir=workdir)
        self._agents.append(agent)
        self._readers.append(asyncio.create_task(self._collect(agent)))
        if wait_ready:
            match = await agent.wait_for_line(STARTUP_LINE.pattern)
            agent.port = int(match.group(1))
        return agent

    @staticmethod
    async def _collect(agent: RunningAgent) -> None:
        assert agent.process.stdout is not None
        async for raw in agent.process.stdout:
            agent.lines.append(raw.decode(errors="replace").rstrip("\n"))
            agent.changed.set()
        agent.output_ended = True
        agent.changed.set()

    async def stop_all(self) -> None:
        for agent in self._agents:
            if agent.process.returncode is None:
                agent.process.kill()
            await agent.process.wait()
        await asyncio.gather(*self._readers)


@pytest.fixture
async def launcher(tmp_path: Path) -> AsyncIterator[Launcher]:
    launcher = Launcher(tmp_path)
    try:
        yield launcher
    finally:
        await launcher.stop_all()


@pytest.fixture
async def agent(launcher: Launcher) -> RunningAgent:
    return await launcher.start()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=DEADLINE, sock_read=DEADLINE)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        yield session


async def get_json(
    http: aiohttp.ClientSession, url: str, *, headers: Mapping[str, str] | None = None
) -> tuple[int, Any]:
    async with http.get(url, headers=headers) as response:
        return response.status, await response.json(content_type=None)


async def post_message(
    http: aiohttp.ClientSession, agent: RunningAgent, content: str, kind: str = "user"
) -> tuple[int, Any]:
    body = {"content": content, "type": kind}
    async with http.post(f"{agent.url}/message", json=body) as response:
        return response.status, await response.json(content_type=None)


async def wait_until_stable(http: aiohttp.ClientSession, agent: RunningAgent) -> None:
    async with asyncio.timeout(DEADLINE):
        while True:
            _, status = await get_json(http, f"{agent.url}/status")
            if status["status"] == "stable":
                return
            await asyncio.sleep(0.02)


def assert_problem(status: int, body: Any, expected_status: int) -> None:
    assert status == expected_status, body
    assert set(body) >= {"title", "status", "detail", "errors"}, body
    assert body["status"] == expected_status
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    assert isinstance(body["errors"], list)


class SseReader:
    """Reads an SSE response block by block, as the bytes arrive."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self._buffer = b""

    async def next_block(self) -> str | None:
        """The next event or comment block, or None at a clean end of stream."""
        async with asyncio.timeout(DEADLINE):
            while b"\n\n" not in self._buffer:
                chunk = await self._response.content.readany()
                if not chunk:
                    assert not self._buffer, f"stream ended inside a block: {self._buffer!r}"
                    return None
                self._buffer += chunk
        block, _, self._buffer = self._buffer.partition(b"\n\n")
        return block.decode()

    async def next_event(self) -> tuple[str, dict[str, Any]]:
        """The next event (comments skipped) as its name and decoded data."""
        while True:
            block = await self.next_block()
            assert block is not None, "stream ended while an event was expected"
            if block.startswith(":"):
                continue
            fields = dict(line.split(": ", 1) for line in block.split("\n"))
            return fields["event"], json.loads(fields["data"])


def parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    assert parsed.tzinfo is not None, value
    return parsed


# --- status, probes and the conversation -------------------------------------------------


async def test_status_reports_a_stable_agent(
    agent: RunningAgent, http: aiohttp.ClientSession
) -> None:
    status, body = await get_json(http, f"{agent.url}/status")

    assert status == 200
    assert body == {"agent_type": "custom", "status": "stable", "transport": "pty"}


async def test_startup_line_names_agent_and_session(agent: RunningAgent) -> None:
    match = await agent.wait_for_line(STARTUP_LINE.pattern)

    assert "agent_id=a1" in match.string
    assert "session_id=s1" in match.string


async def test_health_and_ready_answer_ok(agent: RunningAgent, http: aiohttp.ClientSession) -> None:
    assert await get_json(http, f"{agent.url}/health") == (200, {"ok": True})
    assert await get_json(http, f"{agent.url}/ready") == (200, {"ok": True})


async def test_posted_message_is_stored_and_echoed(
    agent: RunningAgent, http: aiohttp.ClientSession
) -> None:
    assert await post_message(http, agent, "  hello agent  ") == (200, {"ok": True})
    await wait_until_stable(http, agent)

    status, body = await get_json(http, f"{agent.url}/messages")
    assert status == 200
    messages = body["messages"]
    assert [(m["id"], m["role"], m["content"]) for m in messages] == [
        (0, "user", "hello agent"),
        (1, "agent", "echo: hello agent"),
    ]
    assert parse_time(messages[0]["time"]) <= parse_time(messages[1]["time"])
    await agent.wait_for_line(r"received message 0: 'hello agent'")
    await agent.wait_for_line(r"answered with message 1: 'echo: hello agent'")


async def test_message_while_running_is_rejected_as_busy(
    launcher: Launcher, http: aiohttp.ClientSession
) -> None:
    # Slow answers keep the agent running for the whole test.
    agent = await launcher.start("--step-delay", "10")
    assert await post_message(http, agent, "first") == (200, {"ok": True})

    status, body = await post_message(http, agent, "second")

    assert_problem(status, body, 409)
    assert body["detail"] == BUSY_DETAIL
    _, listing = await get_json(http, f"{agent.url}/messages")
    assert [m["content"] for m in listing["messages"] if m["role"] == "user"] == ["first"]
    assert (await get_json(http, f"{agent.url}/status"))[1]["status"] == "running"


async def test_raw_input_is_accepted_but_not_stored(
    agent: RunningAgent, http: aiohttp.ClientSession
) -> None:
    assert await post_message(http, agent, "\x1b[A", kind="raw") == (200, {"ok": True})

    assert await get_json(http, f"{agent.url}/messages") == (200, {"messages": []})
    assert (await get_json(http, f"{agent.url}/status"))[1]["status"] == "stable"
    await agent.wait_for_line(r"received raw input")


@pytest.mark.parametrize(
    ("body", "expected_status"),
    [
        (b"{not json", 400),
        (b"", 400),
        (b"[1, 2]", 422),
        (b'{"type": "user"}', 422),
        (b'{"content": "hi"}', 422),
        (b'{"content": 7, "type": "user"}', 422),
        (b'{"content": "hi", "type": "shout"}', 422),
        (b'{"content": "   ", "type": "user"}', 400),
    ],
)
async def test_bad_message_gives_problem_document(
    agent: RunningAgent, http: aiohttp.ClientSession, body: bytes, expected_status: int
) -> None:
    headers = {"Content-Type": "application/json"}
    async with http.post(f"{agent.url}/message", data=body, headers=headers) as response:
        assert response.content_type == "application/problem+json"
        problem = await response.json(content_type=None)

    assert_problem(response.status, problem, expected_status)
    if expected_status == 422:
        assert problem["errors"], problem
        assert all(item["location"].startswith("body") for item in problem["errors"])
    assert await get_json(http, f"{agent.url}/messages") == (200, {"messages": []})


async def test_unknown_route_gives_problem_document(
    agent: RunningAgent, http: aiohttp.ClientSession
) -> None:
    status, body = await get_json(http, f"{agent.url}/no-such-route")

    assert_problem(status, body, 404)


# --- uploads -----------------------------------------------------------------------------


async def test_upload_stores_file_under_uploads(
    agent: RunningAgent, http: aiohttp.ClientSession
) -> None:
    # Sent unquoted, the way curl sends it, so the agent sees the slashes.
    form = aiohttp.FormData(quote_fields=False)
    form.add_field("file", b"print('hi')\n", filename="../../escape.py")

    async with http.post(f"{agent.url}/upload", data=form) as response:
        status, body = response.status, await response.json()

    assert status == 200
    assert body["ok"] is True
    stored = Path(body["filePath"])
    assert stored.name == "escape.py"
    assert stored.is_relative_to(agent.workdir.resolve() / "uploads")
    assert await asyncio.to_thread(stored.read_bytes) == b"print('hi')\n"


async def test_upload_without_file_or_too_large_is_rejected(
    agent: RunningAgent, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{agent.url}/upload", data=b"plain") as response:
        assert_problem(response.status, await response.json(content_type=None), 400)

    form = aiohttp.FormData()
    form.add_field("attachment", b"misnamed", filename="x.txt")
    async with http.post(f"{agent.url}/upload", data=form) as response:
        assert_problem(response.status, await response.json(content_type=None), 422)

    form = aiohttp.FormData()
    form.add_field("file", io.BytesIO(b"x" * (10 * 1024 * 1024 + 1)), filename="big.bin")
    async with http.post(f"{agent.url}/upload", data=form) as response:
        assert_problem(response.status, await response.json(content_type=None), 413)
    assert not list((agent.workdir / "uploads").glob("*/big.bin"))


# --- host check --------------------------------------------------------------------------


async def test_foreign_host_is_rejected(agent: RunningAgent, http: aiohttp.ClientSession) -> None:
    evil = {"Host": "evil.example"}
    status, body = await get_json(http, f"{agent.url}/status", headers=evil)
    assert_problem(status, body, 400)
    assert "Invalid host header" in body["detail"]

    async with http.post(
        f"{agent.url}/message", json={"content": "x", "type": "user"}, headers=evil
    ) as response:
        assert_problem(response.status, await response.json(content_type=None), 400)
    assert await get_json(http, f"{agent.url}/messages") == (200, {"messages": []})


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:1234", "LOCALHOST", "127.0.0.1", "127.0.0.1:80", "[::1]:9"]
)
async def test_local_hosts_are_accepted_with_or_without_port(
    agent: RunningAgent, http: aiohttp.ClientSession, host: str
) -> None:
    status, body = await get_json(http, f"{agent.url}/status", headers={"Host": host})

    assert status == 200, body


async def test_probes_skip_the_host_check(agent: RunningAgent, http: aiohttp.ClientSession) -> None:
    pod_ip = {"Host": "10.1.2.3:3284"}

    assert await get_json(http, f"{agent.url}/health", headers=pod_ip) == (200, {"ok": True})
    assert await get_json(http, f"{agent.url}/ready", headers=pod_ip) == (200, {"ok": True})


async def test_allowed_hosts_come_from_env_then_flag(
    launcher: Launcher, http: aiohttp.ClientSession
) -> None:
    env = {"AGENTAPI_ALLOWED_HOSTS": "agents.internal other.internal"}
    from_env = await launcher.start(env=env)
    from_flag = await launcher.start("--allowed-hosts", "flag.internal", env=env)
    wildcard = await launcher.start("--allowed-hosts", "*")

    async def status_for(agent: RunningAgent, host: str) -> int:
        return (await get_json(http, f"{agent.url}/status", headers={"Host": host}))[0]

    assert await status_for(from_env, "agents.internal:3284") == 200
    assert await status_for(from_env, "other.internal") == 200
    assert await status_for(from_env, "localhost") == 400
    assert await status_for(from_flag, "flag.internal") == 200
    assert await status_for(from_flag, "agents.internal") == 400
    assert await status_for(wildcard, "evil.example") == 200


@pytest.mark.parametrize("hosts", ["http://agents.internal", "agents.internal:80", ","])
async def test_bad_allowed_hosts_stop_the_start(launcher: Launcher, hosts: str) -> None:
    agent = await launcher.start("--allowed-hosts", hosts, wait_ready=False)

    async with asyncio.timeout(DEADLINE):
        assert await agent.process.wait() == 2
    await agent.wait_for_line(r"ERROR allowed hosts")


# --- SSE ---------------------------------------------------------------------------------


async def test_events_rebuild_state_then_stream_changes(
    agent: RunningAgent, http: aiohttp.ClientSession
) -> None:
    await post_message(http, agent, "first")
    await wait_until_stable(http, agent)

    async with http.get(
        f"{agent.url}/events", headers={"Accept-Encoding": "gzip, deflate"}
    ) as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        assert response.headers["X-Accel-Buffering"] == "no"
        assert "Content-Length" not in response.headers
        assert "Content-Encoding" not in response.headers
        events = SseReader(response)

        # Rebuild: every message, then the status.
        rebuild = [await events.next_event() for _ in range(3)]
        assert [(name, data.get("id"), data.get("message")) for name, data in rebuild] == [
            ("message_update", 0, "first"),
            ("message_update", 1, "echo: first"),
            ("status_change", None, None),
        ]
        assert rebuild[2][1] == {"status": "stable", "agent_type": "custom"}

        # A new message arrives while the stream stays open.
        await post_message(http, agent, "second")
        name, data = await events.next_event()
        assert name == "message_update"
        assert (data["id"], data["role"], data["message"]) == (2, "user", "second")
        parse_time(data["time"])
        assert await events.next_event() == (
            "status_change",
            {"status": "running", "agent_type": "custom"},
        )
        growth: list[str] = []
        while True:
            name, data = await events.next_event()
            if name == "status_change":
                assert data == {"status": "stable", "agent_type": "custom"}
                break
            assert name == "message_update"
            assert (data["id"], data["role"]) == (3, "agent")
            parse_time(data["time"])
            growth.append(data["message"])
        assert len(growth) >= 2, growth
        assert all(a != b and b.startswith(a) for a, b in itertools.pairwise(growth))
        assert growth[-1] == "echo: second"

        # Still open: the next message comes through the same stream.
        await post_message(http, agent, "third")
        name, data = await events.next_event()
        assert (name, data["id"], data["message"]) == ("message_update", 4, "third")

    _, listing = await get_json(http, f"{agent.url}/messages")
    assert listing["messages"][3]["content"] == "echo: second"


async def test_quiet_stream_gets_keepalive_comments(
    launcher: Launcher, http: aiohttp.ClientSession
) -> None:
    agent = await launcher.start("--sse-keepalive", "0.1")

    async with http.get(f"{agent.url}/events") as response:
        events = SseReader(response)
        assert (await events.next_event())[0] == "status_change"

        block = await events.next_block()

    assert block is not None and block.startswith(":"), block


async def read_answer(events: SseReader) -> list[tuple[str, dict[str, Any]]]:
    """Events up to and including the next status_change to stable."""
    seen: list[tuple[str, dict[str, Any]]] = []
    while True:
        name, data = await events.next_event()
        seen.append((name, data))
        if (name, data.get("status")) == ("status_change", "stable"):
            return seen


async def test_every_subscriber_gets_every_event(
    agent: RunningAgent, http: aiohttp.ClientSession
) -> None:
    async with (
        http.get(f"{agent.url}/events") as first,
        http.get(f"{agent.url}/events") as second,
    ):
        readers = [SseReader(first), SseReader(second)]
        for reader in readers:
            assert (await reader.next_event())[0] == "status_change"

        await post_message(http, agent, "to both")
        answers = [await read_answer(reader) for reader in readers]

    assert answers[0] == answers[1]
    assert answers[0][-2][1]["message"] == "echo: to both"


async def test_slow_subscriber_is_dropped_without_stalling_others(
    launcher: Launcher, http: aiohttp.ClientSession
) -> None:
    agent = await launcher.start("--sse-queue-size", "4", "--step-delay", "0")
    loop = asyncio.get_running_loop()

    # A subscriber that never reads, with a tiny receive window so the agent's
    # writes to it back up quickly.
    slow = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.setblocking(False)
    try:
        await loop.sock_connect(slow, ("127.0.0.1", agent.port))
        request = b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
        await loop.sock_sendall(slow, request)

        async with http.get(f"{agent.url}/events") as response:
            fast = SseReader(response)
            assert (await fast.next_event())[0] == "status_change"

            # Large answers until the agent gives up on the slow one (bounded).
            big = "x" * 256 * 1024
            dropped = False
            for _ in range(40):
                assert await post_message(http, agent, big) == (200, {"ok": True})
                answer = await read_answer(fast)
                assert answer[-2][1]["message"] == f"echo: {big}"
                if any("dropped a slow SSE subscriber" in line for line in agent.lines):
                    dropped = True
                    break
            assert dropped, "the slow subscriber was never dropped"

            # The fast stream is still open and current.
            assert await post_message(http, agent, "after") == (200, {"ok": True})
            answer = await read_answer(fast)
            assert answer[-2][1]["message"] == "echo: after"

        # The slow connection was closed by the agent: draining it reaches the end.
        received = 0
        async with asyncio.timeout(DEADLINE):
            while True:
                try:
                    chunk = await loop.sock_recv(slow, 1 << 20)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                received += len(chunk)
                assert received < 200 * 1024 * 1024, "slow stream never ended"
    finally:
        slow.close()


async def test_sigterm_ends_streams_and_exits_zero(
    launcher: Launcher, http: aiohttp.ClientSession
) -> None:
    # A slow answer is still being written when the signal arrives.
    agent = await launcher.start("--step-delay", "10")

    async with http.get(f"{agent.url}/events") as response:
        events = SseReader(response)
        assert (await events.next_event())[0] == "status_change"
        await post_message(http, agent, "never finished")
        assert (await events.next_event())[1]["message"] == "never finished"

        agent.process.send_signal(signal.SIGTERM)

        # A clean end of the chunked stream, not a cut connection.
        while (block := await events.next_block()) is not None:
            assert not block.startswith('event: status_change\ndata: {"status":"stable"'), (
                "the answer was not supposed to finish"
            )

    async with asyncio.timeout(DEADLINE):
        assert await agent.process.wait() == 0
    await agent.wait_for_line(r"received SIGTERM, shutting down")
    await agent.wait_for_line(r"reference agent stopped")
