"""Create to ready: CreateAgent until the agent answers, against starting it by hand."""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from google.protobuf.duration_pb2 import Duration

from agentapi_proxy.v1 import agent_service_pb2 as pb
from agentapi_proxy.v1 import agent_service_pb2_grpc as pb_grpc
from bench.servers import free_port, start_bare_agent, stop_group
from bench.stats import percentile, ratio, summarize_ms

logger = logging.getLogger(__name__)

POLL_INTERVAL = 0.005
READY_TIMEOUT = 60.0


async def poll_status(http: aiohttp.ClientSession, port: int) -> float:
    """Poll GET /status on 127.0.0.1:``port`` until it answers 200; returns that moment.

    Raises TimeoutError after READY_TIMEOUT.
    """
    url = f"http://127.0.0.1:{port}/status"
    async with asyncio.timeout(READY_TIMEOUT):
        while True:
            try:
                async with http.get(url, headers={"Host": f"localhost:{port}"}) as response:
                    if response.status == 200:
                        return time.perf_counter()
            except (aiohttp.ClientError, OSError):
                pass
            await asyncio.sleep(POLL_INTERVAL)


async def _through_control_plane(
    agents: pb_grpc.AgentServiceStub, http: aiohttp.ClientSession, *, agent_id: str
) -> dict[str, float]:
    started = time.perf_counter()
    created = await agents.CreateAgent(
        pb.CreateAgentRequest(session_id="bench-ready", agent_id=agent_id)
    )
    answered = time.perf_counter()
    port = int(created.agent.address.rsplit(":", 1)[1])

    async def wait_ready() -> float:
        await agents.WaitAgent(
            pb.WaitAgentRequest(
                agent_id=agent_id,
                state=pb.AGENT_STATE_READY,
                timeout=Duration(seconds=int(READY_TIMEOUT)),
            )
        )
        return time.perf_counter()

    status_at, ready_at = await asyncio.gather(poll_status(http, port), wait_ready())
    stopping = time.perf_counter()
    await agents.DeleteAgent(pb.DeleteAgentRequest(agent_id=agent_id))
    return {
        "create_call": answered - started,
        "status": status_at - started,
        "wait_ready": ready_at - started,
        "stop": time.perf_counter() - stopping,
    }


async def _by_hand(http: aiohttp.ClientSession, *, cwd: Path) -> dict[str, float]:
    port = free_port()
    started = time.perf_counter()
    proc = start_bare_agent(port, cwd=cwd)
    try:
        status_at = await poll_status(http, port)
    finally:
        stop_seconds = await stop_group(proc)
    return {"status": status_at - started, "stop": stop_seconds}


async def create_to_ready(agents: pb_grpc.AgentServiceStub, *, repetitions: int) -> dict[str, Any]:
    """Median and p90 of create-to-ready through the control plane and by hand.

    The two alternate (which goes first swaps each repetition). Through the
    control plane, "status" is when GET /status first answers (polled every
    5 ms by us, as by hand) and "wait_ready" when WaitAgent returns READY
    (the control plane's own probe); "stop" is DeleteAgent against SIGTERM
    until exit by hand.
    """
    samples: dict[str, list[float]] = {
        "cp_create_call": [],
        "cp_status": [],
        "cp_wait_ready": [],
        "cp_stop": [],
        "bare_status": [],
        "bare_stop": [],
    }
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=2)
    ) as http:
        # The first call on a channel also connects it: not part of any figure.
        await agents.ListAgents(pb.ListAgentsRequest(session_id="bench-ready"))
        with tempfile.TemporaryDirectory(prefix="agentapi-bench-bare-") as cwd:
            for index in range(repetitions):
                for turn in (0, 1) if index % 2 == 0 else (1, 0):
                    if turn == 0:
                        through = await _through_control_plane(
                            agents, http, agent_id=f"ready-{index}"
                        )
                        for key, value in through.items():
                            samples[f"cp_{key}"].append(value)
                    else:
                        bare = await _by_hand(http, cwd=Path(cwd))
                        for key, value in bare.items():
                            samples[f"bare_{key}"].append(value)

    def p(name: str, q: float) -> float:
        return percentile(samples[name], q)

    return {
        "repetitions": repetitions,
        "figures": {name: summarize_ms(values) for name, values in samples.items()},
        "ratios": {
            "status_vs_bare": {
                "median": ratio(p("cp_status", 50), p("bare_status", 50)),
                "p90": ratio(p("cp_status", 90), p("bare_status", 90)),
            },
            "wait_ready_vs_bare": {
                "median": ratio(p("cp_wait_ready", 50), p("bare_status", 50)),
                "p90": ratio(p("cp_wait_ready", 90), p("bare_status", 90)),
            },
            "stop_vs_bare": {
                "median": ratio(p("cp_stop", 50), p("bare_stop", 50)),
                "p90": ratio(p("cp_stop", 90), p("bare_stop", 90)),
            },
        },
    }
