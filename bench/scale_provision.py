"""Scale in provision mode: a control plane against the Kubernetes test double.

The double (:mod:`bench.kube_server`, its own process) stands in for the API
server and a cluster whose pods turn ready after a few hundred milliseconds. The
section reads the control plane's memory and ListAgents latency with N agents,
and counts the Kubernetes API requests each gRPC operation causes, from the
double's request log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from google.protobuf.duration_pb2 import Duration

from agentapi_proxy.v1 import agent_service_pb2 as pb
from agentapi_proxy.v1 import agent_service_pb2_grpc as pb_grpc
from bench.procfs import CpuMeter, rss_bytes
from bench.scale import MIB, create_agents, list_all, list_latencies
from bench.servers import REPO
from bench.stats import ratio, summarize_ms

logger = logging.getLogger(__name__)

SESSION = "bench-scale-provision"
PROBE_SESSION = "bench-scale-probe"
NAMESPACE = "agentapi-bench"
# The double never pulls it: its fake kubelet "runs" any image.
IMAGE = "registry.example.test/agentapi-agent:bench"
# Hang guards of the double's process: start, one command, stop.
KUBE_START_SECONDS = 60.0
KUBE_COMMAND_SECONDS = 30.0
KUBE_STOP_SECONDS = 45.0
# Hang guard of a wait for "quiet" (no new API request for a while: the watches caught up).
QUIET_LIMIT_SECONDS = 30.0
# Hang guard for all agents of a step to turn READY: a base plus per agent.
READY_BASE_SECONDS = 60.0
READY_PER_AGENT_SECONDS = 0.2
READY_POLL_SECONDS = 1.0
OPERATIONS = ("CreateAgent", "GetAgent", "ListAgents", "DeleteAgent")


@dataclass
class Calls:
    """API requests the double received, by "verb resource" (e.g. "list pods")."""

    total: int
    by_call: dict[str, int]

    @classmethod
    def of(cls, reply: dict[str, Any]) -> Calls:
        return cls(total=int(reply["total"]), by_call=dict(reply["by_call"]))

    def minus(self, earlier: Calls) -> Calls:
        """The requests received after ``earlier`` was read (the log only grows until cleared)."""
        by_call = {
            call: count - earlier.by_call.get(call, 0)
            for call, count in self.by_call.items()
            if count > earlier.by_call.get(call, 0)
        }
        return Calls(total=self.total - earlier.total, by_call=by_call)


class KubeServer:
    """The client side of ``python -m bench.kube_server``: one command at a time."""

    def __init__(self, proc: asyncio.subprocess.Process, hello: dict[str, Any]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.kubeconfig = str(hello["kubeconfig"])
        self.namespace = str(hello["namespace"])
        self._lock = asyncio.Lock()

    async def command(self, line: str) -> dict[str, Any]:
        """Send one command and read its answer; RuntimeError when the process ended."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        async with self._lock, asyncio.timeout(KUBE_COMMAND_SECONDS):
            self.proc.stdin.write(line.encode() + b"\n")
            await self.proc.stdin.drain()
            answer = await self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"the Kubernetes double exited (code {self.proc.returncode})")
        reply: dict[str, Any] = json.loads(answer)
        return reply

    async def requests(self) -> Calls:
        return Calls.of(await self.command("requests"))

    async def clear(self) -> None:
        await self.command("clear")

    async def internal_errors(self) -> list[str]:
        return list((await self.command("internal_errors"))["internal_errors"])

    def provision_env(self, *, image: str) -> dict[str, str]:
        """The control plane's environment for provision mode against this double."""
        return {
            "AGENTAPI_PROVISION_MODE_ENABLED": "true",
            "AGENTAPI_PROVISION_MODE_KUBECONFIG": self.kubeconfig,
            "AGENTAPI_PROVISION_MODE_NAMESPACE": self.namespace,
            "AGENTAPI_PROVISION_MODE_IMAGE": image,
        }

    async def wait_quiet(self, *, seconds: float) -> Calls:
        """Wait until no request arrived for ``seconds`` (at most QUIET_LIMIT_SECONDS, then
        go on); returns the requests so far."""
        last = await self.requests()
        quiet_since = time.monotonic()
        deadline = quiet_since + QUIET_LIMIT_SECONDS
        while time.monotonic() - quiet_since < seconds and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            now = await self.requests()
            if now.total != last.total:
                last, quiet_since = now, time.monotonic()
        return last


@contextlib.asynccontextmanager
async def kube_server(directory: Path, *, namespace: str) -> AsyncIterator[KubeServer]:
    """Start the double's process; stop it at the end (``stop``, then SIGKILL by PID after
    KUBE_STOP_SECONDS), also on failure."""
    with _log_file(directory / "kube-server.log") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.kube_server",
            str(directory),
            "--namespace",
            namespace,
            cwd=REPO,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(KUBE_START_SECONDS):
                hello = await proc.stdout.readline()
            if not hello:
                raise RuntimeError(
                    f"the Kubernetes double did not start: see {directory / 'kube-server.log'}"
                )
            yield KubeServer(proc, json.loads(hello))
        finally:
            await _stop(proc)


def _log_file(path: Path) -> BinaryIO:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("wb")


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None and proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.write(b"stop\n")
            proc.stdin.close()
    try:
        async with asyncio.timeout(KUBE_STOP_SECONDS):
            await proc.wait()
    except TimeoutError:
        logger.warning("the Kubernetes double (pid %s) did not stop: killing it", proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def _states(agents: pb_grpc.AgentServiceStub) -> dict[int, int]:
    """How many agents of SESSION are in each state."""
    counts: dict[int, int] = {}
    token = ""
    while True:
        page = await agents.ListAgents(pb.ListAgentsRequest(session_id=SESSION, page_token=token))
        for agent in page.agents:
            counts[agent.state] = counts.get(agent.state, 0) + 1
        token = page.next_page_token
        if not token:
            return counts


async def _wait_all_ready(agents: pb_grpc.AgentServiceStub, *, count: int) -> int:
    """Poll until all ``count`` agents are READY (bounded); returns how many are not."""
    deadline = time.monotonic() + READY_BASE_SECONDS + READY_PER_AGENT_SECONDS * count
    while True:
        states = await _states(agents)
        not_ready = count - states.get(pb.AGENT_STATE_READY, 0)
        if not_ready == 0 or time.monotonic() > deadline:
            return not_ready
        await asyncio.sleep(READY_POLL_SECONDS)


async def _counted(
    kube: KubeServer, call: Callable[[], Awaitable[object]], *, quiet_seconds: float
) -> dict[str, Any]:
    """The API requests ``call`` makes while it runs, and those that follow until quiet.

    Call it when the double is quiet; it is quiet again when this returns.
    """
    await kube.clear()
    await call()
    during = await kube.requests()
    total = await kube.wait_quiet(seconds=quiet_seconds)
    after = total.minus(during)
    return {
        "during": during.total,
        "after": after.total,
        "total": total.total,
        "by_call": total.by_call,
    }


async def provision_scale(
    agents: pb_grpc.AgentServiceStub,
    *,
    kube: KubeServer,
    control_plane_pid: int,
    counts: tuple[int, ...],
    list_calls: int,
    idle_seconds: float,
    quiet_seconds: float,
) -> dict[str, Any]:
    """Memory, idle CPU, ListAgents latency and API requests per operation with no agents
    and with each of ``counts`` (increasing) agents.

    The API requests that follow an operation are those until no request came for
    ``quiet_seconds``. The agents are left in the double: the caller stops the control plane and the
    double afterwards, which is all the clean-up they need.
    """
    meter = CpuMeter(
        {"control_plane": lambda: [control_plane_pid], "kube_double": lambda: [kube.pid]}
    )

    async def counted(call: Callable[[], Awaitable[object]]) -> dict[str, Any]:
        return await _counted(kube, call, quiet_seconds=quiet_seconds)

    async def measure(count: int) -> dict[str, Any]:
        await kube.wait_quiet(seconds=quiet_seconds)
        await kube.clear()
        meter.start()
        await asyncio.sleep(idle_seconds)
        cpu = meter.stop()
        idle = await kube.requests()
        rss = rss_bytes(control_plane_pid)

        listing = await counted(lambda: list_all(agents, session_id=SESSION))
        latencies, pages = await list_latencies(
            agents, session_id=SESSION, calls=list_calls, expect=count
        )

        probe = f"probe-{count}"
        create = await counted(
            lambda: agents.CreateAgent(
                pb.CreateAgentRequest(session_id=PROBE_SESSION, agent_id=probe)
            ),
        )
        await agents.WaitAgent(
            pb.WaitAgentRequest(
                agent_id=probe, state=pb.AGENT_STATE_READY, timeout=Duration(seconds=60)
            )
        )
        get = await counted(lambda: agents.GetAgent(pb.GetAgentRequest(agent_id=probe)))
        delete = await counted(lambda: agents.DeleteAgent(pb.DeleteAgentRequest(agent_id=probe)))
        return {
            "agents": count,
            "rss_mib": round(rss / MIB, 1),
            "kib_per_agent": None,
            "idle_cpu_percent": round(100 * cpu["control_plane"] / idle_seconds, 1),
            # The double's fake controllers: it shares the machine's cores with the rest.
            "kube_double_idle_cpu_percent": round(100 * cpu["kube_double"] / idle_seconds, 1),
            "idle_api_calls": {
                "seconds": idle_seconds,
                "total": idle.total,
                "per_s": round(idle.total / idle_seconds, 2),
                "by_call": idle.by_call,
            },
            "list": summarize_ms(latencies),
            "list_pages": pages,
            "kube_double_rss_mib": round(rss_bytes(kube.pid) / MIB, 1),
            "api_calls": {
                "CreateAgent": create,
                "GetAgent": get,
                "ListAgents": listing,
                "DeleteAgent": delete,
            },
        }

    # The first call on a channel also connects it: not part of any figure.
    await list_all(agents, session_id=SESSION)
    points = [await measure(0)]
    created = 0
    for count in counts:
        ids = [f"p-{index:05d}" for index in range(created, count)]
        created = count
        await kube.wait_quiet(seconds=quiet_seconds)
        await kube.clear()
        create_seconds = await create_agents(agents, ids, session_id=SESSION)
        during_creates = await kube.requests()
        not_ready = await _wait_all_ready(agents, count=count)
        point = await measure(count)
        point["creates_per_s"] = round(len(ids) / create_seconds, 1)
        point["bulk_create"] = {
            "agents": len(ids),
            "seconds": round(create_seconds, 2),
            "api_calls": during_creates.total,
            "api_calls_per_agent": round(during_creates.total / len(ids), 1),
            "by_call": during_creates.by_call,
        }
        point["not_ready"] = not_ready
        if count:
            point["kib_per_agent"] = round(
                (point["rss_mib"] - points[0]["rss_mib"]) * 1024 / count, 1
            )
        points.append(point)

    internal_errors = await kube.internal_errors()
    none, fewest, most = points[0], points[1], points[-1]
    return {
        "counts": list(counts),
        "idle_seconds": idle_seconds,
        "quiet_seconds": quiet_seconds,
        "points": points,
        "kube_double_internal_errors": internal_errors,
        "ratios": {
            "rss_most_vs_fewest": ratio(most["rss_mib"], fewest["rss_mib"]),
            "rss_most_vs_none": ratio(most["rss_mib"], none["rss_mib"]),
            "list_p50_most_vs_fewest": ratio(most["list"]["p50_ms"], fewest["list"]["p50_ms"]),
            "list_api_calls_most_vs_fewest": ratio(
                most["api_calls"]["ListAgents"]["total"],
                fewest["api_calls"]["ListAgents"]["total"],
            ),
            "create_api_calls_most_vs_fewest": ratio(
                most["api_calls"]["CreateAgent"]["total"],
                fewest["api_calls"]["CreateAgent"]["total"],
            ),
        },
    }
