"""Scale: the control plane's memory and ListAgents latency with many tiny agents.

A tiny agent is ``sleep``: it never listens, so it stays STARTING (the control
plane keeps probing its ready path); that is enough for listing and memory.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc

from agentapi_proxy.v1 import agent_service_pb2 as pb
from agentapi_proxy.v1 import agent_service_pb2_grpc as pb_grpc
from bench.memory import total_memory
from bench.procfs import CpuMeter, rss_bytes
from bench.stats import ratio, summarize_ms

MIB = 1024 * 1024
SESSION = "bench-scale"
CREATE_CONCURRENCY = 8
DELETE_CONCURRENCY = 16
# Idle window over which the control plane's CPU use is read.
IDLE_SECONDS = 2.0
# Hang guards of a listing: pages of one listing, time for the timed listings of a point.
MAX_PAGES = 1000
LIST_BUDGET_SECONDS = 20.0


async def bounded(calls: Iterable[Callable[[], Awaitable[object]]], *, concurrency: int) -> None:
    """Run the calls, at most ``concurrency`` at once; raises the first error after all end."""
    gate = asyncio.Semaphore(concurrency)

    async def one(call: Callable[[], Awaitable[object]]) -> None:
        async with gate:
            await call()

    results = await asyncio.gather(*(one(call) for call in calls), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def create_agents(
    agents: pb_grpc.AgentServiceStub, agent_ids: Iterable[str], *, session_id: str = SESSION
) -> float:
    """Create the agents, CREATE_CONCURRENCY at a time; returns the seconds taken."""
    started = time.perf_counter()
    await bounded(
        [
            functools.partial(
                agents.CreateAgent, pb.CreateAgentRequest(session_id=session_id, agent_id=agent_id)
            )
            for agent_id in agent_ids
        ],
        concurrency=CREATE_CONCURRENCY,
    )
    return time.perf_counter() - started


async def _delete(agents: pb_grpc.AgentServiceStub, agent_id: str) -> None:
    try:
        await agents.DeleteAgent(pb.DeleteAgentRequest(agent_id=agent_id))
    except grpc.aio.AioRpcError as exc:
        # Its create failed: nothing to delete.
        if exc.code() is not grpc.StatusCode.NOT_FOUND:
            raise


async def list_all(agents: pb_grpc.AgentServiceStub, *, session_id: str) -> tuple[int, int]:
    """Every agent of ``session_id``, following ``next_page_token``: (agents, pages)."""
    count = pages = 0
    token = ""
    while True:
        response = await agents.ListAgents(
            pb.ListAgentsRequest(session_id=session_id, page_token=token)
        )
        count += len(response.agents)
        pages += 1
        token = response.next_page_token
        if not token:
            return count, pages
        if pages >= MAX_PAGES:
            raise RuntimeError(f"ListAgents gave more than {MAX_PAGES} pages")


async def list_latencies(
    agents: pb_grpc.AgentServiceStub,
    *,
    session_id: str,
    calls: int,
    expect: int,
    budget_seconds: float = LIST_BUDGET_SECONDS,
) -> tuple[list[float], int]:
    """Time up to ``calls`` complete listings (every page), fewer (at least 3) when they
    take longer than ``budget_seconds`` together; returns the durations and the pages of
    one listing. Raises RuntimeError when a listing does not hold ``expect`` agents."""
    latencies: list[float] = []
    pages = 0
    deadline = time.perf_counter() + budget_seconds
    while len(latencies) < calls and (len(latencies) < 3 or time.perf_counter() < deadline):
        started = time.perf_counter()
        found, pages = await list_all(agents, session_id=session_id)
        latencies.append(time.perf_counter() - started)
        if found != expect:
            raise RuntimeError(f"ListAgents returned {found} agents, not {expect}")
    return latencies, pages


async def scale(
    agents: pb_grpc.AgentServiceStub,
    *,
    control_plane_pid: int,
    agent_pids: Callable[[], list[int]],
    counts: tuple[int, ...],
    list_calls: int,
) -> dict[str, Any]:
    """RSS, idle CPU and ListAgents latency at 0 agents and at each of ``counts`` (increasing),
    with the memory of the agents' processes per agent (RSS, PSS and private, see
    :mod:`bench.memory`).

    ``agent_pids()`` lists the processes of all agents (each agent's process group:
    its shim and what the shim runs).
    Every agent created here is deleted before returning, also on failure.
    """
    meter = CpuMeter({"control_plane": lambda: [control_plane_pid]})

    async def measure(count: int) -> dict[str, Any]:
        meter.start()
        await asyncio.sleep(IDLE_SECONDS)
        cpu = meter.stop()["control_plane"]
        rss = rss_bytes(control_plane_pid)
        latencies, pages = await list_latencies(
            agents, session_id=SESSION, calls=list_calls, expect=count
        )
        pids = agent_pids()
        memory = total_memory(pids)

        def per_agent(size: int) -> float | None:
            return round(size / MIB / count, 2) if count else None

        return {
            "agents": count,
            "rss_mib": round(rss / MIB, 1),
            "idle_cpu_percent": round(100 * cpu / IDLE_SECONDS, 1),
            "agent_processes": len(pids),
            # RSS counts pages shared between processes (libpython) in each one.
            "agent_processes_rss_mib_per_agent": per_agent(memory.rss),
            # PSS splits them among the processes sharing them; private: not shared at all.
            "agent_processes_pss_mib_per_agent": per_agent(memory.pss),
            "agent_processes_private_mib_per_agent": per_agent(memory.private),
            "list": summarize_ms(latencies),
            "list_pages": pages,
        }

    created: list[str] = []
    points: list[dict[str, Any]] = []
    # The first call on a channel also connects it: not part of any figure.
    await agents.ListAgents(pb.ListAgentsRequest(session_id=SESSION))
    try:
        points.append(await measure(0))
        for count in counts:
            ids = [f"tiny-{index}" for index in range(len(created), count)]
            created += ids
            create_seconds = await create_agents(agents, ids)
            point = await measure(count)
            point["creates_per_s"] = round(len(ids) / create_seconds, 1)
            points.append(point)
    finally:
        await bounded(
            [functools.partial(_delete, agents, agent_id) for agent_id in created],
            concurrency=DELETE_CONCURRENCY,
        )
    none, fewest, most = points[0], points[1], points[-1]
    return {
        "counts": list(counts),
        "points": points,
        "ratios": {
            # "most": the largest agent count, "fewest": the smallest, "none": no agents.
            "rss_most_vs_none": ratio(most["rss_mib"], none["rss_mib"]),
            "list_p50_most_vs_none": ratio(most["list"]["p50_ms"], none["list"]["p50_ms"]),
            "list_p50_most_vs_fewest": ratio(most["list"]["p50_ms"], fewest["list"]["p50_ms"]),
            "agent_pss_vs_rss_most": ratio(
                most["agent_processes_pss_mib_per_agent"],
                most["agent_processes_rss_mib_per_agent"],
            ),
        },
    }
