"""Runs the real ``agentapi-proxy`` command for tests and cleans up after it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from agentapi_proxy.v1 import agent_service_pb2_grpc as pb_grpc

_LISTEN_LINE = {
    "grpc": re.compile(r"control plane listening on ([\d.]+):(\d+)"),
    "http": re.compile(r"gateway listening on http://([\d.]+):(\d+)"),
    "metrics": re.compile(r"metrics on http://([\d.]+):(\d+)/metrics"),
}


def free_port_range(size: int = 200) -> str:
    """A port range that nothing listened on a moment ago (agents get ports from it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        base = sock.getsockname()[1]
    base = 20000 + (base * 7919) % 30000
    return f"{base}-{base + size - 1}"


def port_is_free(port: int) -> bool:
    """Whether a server (with SO_REUSEADDR, as they all use) could listen on the port now."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def group_members(pgid: int) -> list[int]:
    """PIDs whose process group is ``pgid`` (zombies excluded)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, Any]]:
    """(event name, decoded data) for each SSE event of ``response``, as it arrives."""
    event = ""
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: "):
            yield event, json.loads(line[len("data: ") :])


async def eventually(check: Callable[[], bool], *, seconds: float = 10.0) -> None:
    """Wait until ``check()`` holds; a hang guard, not a timing assertion."""
    for _ in range(int(seconds / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    assert check(), "condition not reached in time"


class ProxyProcess:
    """One ``agentapi-proxy serve`` process with its own state directory."""

    def __init__(
        self, state_dir: Path, *, env: Mapping[str, str] | None = None, command: str = "serve"
    ) -> None:
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self.command = command
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AGENTAPI_")},
            "AGENTAPI_STATE_DIR": str(state_dir),
            "AGENTAPI_SERVER_GRPC_LISTEN": "127.0.0.1:0",
            "AGENTAPI_GATEWAY_LISTEN": "127.0.0.1:0",
            "AGENTAPI_PROCESS_PORT_RANGE": free_port_range(),
            "AGENTAPI_SERVER_SHUTDOWN_GRACE_SECONDS": "3",
            "AGENTAPI_PROCESS_STOP_GRACE_SECONDS": "3",
            **(env or {}),
        }
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self.grpc_port = 0
        self.http_port = 0
        self.metrics_port = 0
        self._seen = threading.Condition()

    def start(self, *, timeout: float = 30.0) -> ProxyProcess:
        command = self.command
        self.lines = []
        self.grpc_port = self.http_port = 0
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agentapi_proxy", command],
            env=self.env,
            cwd=self.state_dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        want_grpc = command in {"serve", "control-plane"}
        want_http = command in {"serve", "gateway"}
        deadline = time.monotonic() + timeout
        with self._seen:
            while (want_grpc and not self.grpc_port) or (want_http and not self.http_port):
                if self.proc.poll() is not None:
                    raise RuntimeError("agentapi-proxy exited:\n" + "".join(self.lines))
                if time.monotonic() > deadline:
                    raise RuntimeError("agentapi-proxy did not start:\n" + "".join(self.lines))
                self._seen.wait(0.1)
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        with proc.stderr:
            for line in proc.stderr:
                with self._seen:
                    self.lines.append(line)
                    for kind, pattern in _LISTEN_LINE.items():
                        match = pattern.search(line)
                        if match:
                            setattr(self, f"{kind}_port", int(match[2]))
                    self._seen.notify_all()

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log_text(self) -> str:
        return "".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, *, timeout: float = 30.0) -> int:
        """Signal the process and wait for it; returns its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def agent_records(self) -> list[dict[str, object]]:
        records = []
        for path in sorted((self.state_dir / "agents").glob("*/record.json")):
            with contextlib.suppress(OSError, ValueError):
                records.append(json.loads(path.read_text()))
        return records

    def kill_leftovers(self) -> None:
        """Kill every agent process group still recorded (test cleanup)."""
        for record in self.agent_records():
            pid = record.get("pid")
            if isinstance(pid, int) and group_members(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)


@contextlib.contextmanager
def running_proxy(
    state_dir: Path, *, env: Mapping[str, str] | None = None, command: str = "serve"
) -> Iterator[ProxyProcess]:
    proxy = ProxyProcess(state_dir, env=env, command=command)
    try:
        yield proxy.start()
    finally:
        if proxy.proc is not None and proxy.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proxy.stop(timeout=15)
        proxy.kill_leftovers()


def stub(target: str) -> tuple[grpc.aio.Channel, pb_grpc.AgentServiceStub]:
    channel = grpc.aio.insecure_channel(target)
    return channel, pb_grpc.AgentServiceStub(channel)  # type: ignore[no-untyped-call]
