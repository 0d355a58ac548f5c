"""Processes the benchmark starts besides ``agentapi-proxy``: configurable-http-proxy
and bare reference agents. All listen on 127.0.0.1 and are stopped by PID."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHP_BIN = REPO / "node_modules" / ".bin" / "configurable-http-proxy"


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def agent_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment the process driver gives an agent: ours without ``AGENTAPI_*``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTAPI_")}
    env.update(extra or {})
    return env


async def wait_for_port(port: int, *, proc: subprocess.Popen[bytes]) -> None:
    """Wait until 127.0.0.1:``port`` accepts connections (bound it with asyncio.timeout).

    Raises RuntimeError when ``proc`` exits first.
    """
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.02)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return


async def stop_group(proc: subprocess.Popen[bytes], *, grace: float = 5.0) -> float:
    """SIGTERM the process group that ``proc`` leads, SIGKILL after ``grace`` seconds.

    Returns the seconds from SIGTERM until the leader exited.
    """
    started = time.perf_counter()
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        # Polling: a Popen offers no awaitable exit; 5 ms keeps the stop time exact enough.
        while proc.poll() is None:
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - started
    with contextlib.suppress(ProcessLookupError):
        # Anything of the group still alive (or a leader past its grace).
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return elapsed


def chp_available() -> bool:
    return CHP_BIN.exists()


@dataclass(frozen=True)
class Listening:
    """A server process the benchmark started."""

    pid: int
    port: int


@contextlib.asynccontextmanager
async def configurable_http_proxy(target_port: int) -> AsyncIterator[Listening]:
    """configurable-http-proxy in front of 127.0.0.1:``target_port``, stopped on exit.

    It forwards the client's Host header unchanged (no ``--change-origin``):
    clients address it as 127.0.0.1, which agentapi's host check allows.
    """
    port = free_port()
    proc = _start_chp(port, target_port=target_port)
    try:
        async with asyncio.timeout(20):
            await wait_for_port(port, proc=proc)
        yield Listening(pid=proc.pid, port=port)
    finally:
        await stop_group(proc)


def _start_chp(port: int, *, target_port: int) -> subprocess.Popen[bytes]:
    api_port = free_port()
    return subprocess.Popen(
        [
            str(CHP_BIN),
            "--ip=127.0.0.1",
            f"--port={port}",
            "--api-ip=127.0.0.1",
            f"--api-port={api_port}",
            f"--default-target=http://127.0.0.1:{target_port}",
            "--log-level=warn",
        ],
        # A token of our own keeps its API closed and silences the warning about a missing one.
        env={**os.environ, "CONFIGPROXY_AUTH_TOKEN": os.urandom(16).hex()},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def start_bare_agent(port: int, *, cwd: Path) -> subprocess.Popen[bytes]:
    """The reference agent started by hand, as the process driver's default command would."""
    return subprocess.Popen(
        [sys.executable, "-m", "agentapi_proxy.reference_agent", "--port", str(port)],
        cwd=cwd,
        env=agent_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
