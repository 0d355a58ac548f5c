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
from bench.procfs import CpuMeter, rss_bytes
from bench.stats import ratio, summarize_ms

MIB = 1024 * 1024
SESSION = "bench-scale"
CREATE_CONCURRENCY = 8
DELETE_CONCURRENCY = 16
# Idle window over which the control plane's CPU use is read.
IDLE_SECONDS = 2.0


async def _bounded(calls: Iterable[Callable[[], Awaitable[object]]], *, concurrency: int) -> None:
    """Run the calls, at most ``concurrency`` at once; raises the first error after all end."""
    gate = asyncio.Semaphore(concurrency)

    async def one(call: Callable[[], Awaitable[object]]) -> None:
        async with gate:
            await call()

    results = await asyncio.gather(*(one(call) for call in calls), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def _delete(agents: pb_grpc.AgentServiceStub, agent_id: str) -> None:
    try:
        await agents.DeleteAgent(pb.DeleteAgentRequest(agent_id=agent_id))
    except grpc.aio.AioRpcError as exc:
        # Its create failed: nothing to delete.
        if exc.code() is not grpc.StatusCode.NOT_FOUND:
            raise


async def _list_latencies(
    agents: pb_grpc.AgentServiceStub, *, calls: int, expect: int
) -> list[float]:
    latencies = []
    for _ in range(calls):
        started = time.perf_counter()
        response = await agents.ListAgents(pb.ListAgentsRequest(session_id=SESSION))
        latencies.append(time.perf_counter() - started)
        if len(response.agents) != expect:
            raise RuntimeError(f"ListAgents returned {len(response.agents)} agents, not {expect}")
    return latencies


async def scale(
    agents: pb_grpc.AgentServiceStub,
    *,
    control_plane_pid: int,
    agent_pids: Callable[[], list[int]],
    counts: tuple[int, ...],
    list_calls: int,
) -> dict[str, Any]:
    """RSS, idle CPU and ListAgents latency at 0 agents and at each of ``counts`` (increasing).

    ``agent_pids()`` lists the processes of all agents (shims and what they run).
    Every agent created here is deleted before returning, also on failure.
    """
    meter = CpuMeter({"control_plane": lambda: [control_plane_pid]})

    async def measure(count: int) -> dict[str, Any]:
        meter.start()
        await asyncio.sleep(IDLE_SECONDS)
        cpu = meter.stop()["control_plane"]
        rss = rss_bytes(control_plane_pid)
        pids = agent_pids()
        agents_rss = sum(rss_bytes(pid) for pid in pids)
        return {
            "agents": count,
            "rss_mib": round(rss / MIB, 1),
            "idle_cpu_percent": round(100 * cpu / IDLE_SECONDS, 1),
            "agent_processes": len(pids),
            "agent_processes_rss_mib_per_agent": round(agents_rss / MIB / count, 1)
            if count
            else None,
            "list": summarize_ms(await _list_latencies(agents, calls=list_calls, expect=count)),
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
            started = time.perf_counter()
            await _bounded(
                [
                    functools.partial(
                        agents.CreateAgent,
                        pb.CreateAgentRequest(session_id=SESSION, agent_id=agent_id),
                    )
                    for agent_id in ids
                ],
                concurrency=CREATE_CONCURRENCY,
            )
            create_seconds = time.perf_counter() - started
            point = await measure(count)
            point["creates_per_s"] = round(len(ids) / create_seconds, 1)
            points.append(point)
    finally:
        await _bounded(
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
        },
    }
