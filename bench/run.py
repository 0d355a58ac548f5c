"""The benchmark: ``python -m bench.run [--quick | --large] [--profile] [--out FILE]``.

Starts its own ``agentapi-proxy`` processes (on 127.0.0.1, ephemeral ports,
temporary state directories), measures each section against its baseline in
the same run, prints a table and writes the figures as JSON. Everything it
started is stopped at the end, also when a section fails. Exits 1 when a
section failed (its entry in the JSON then holds an "error").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from google.protobuf.duration_pb2 import Duration

from agentapi_proxy.drivers.statefulset import RESYNC_SECONDS
from agentapi_proxy.v1 import agent_service_pb2 as pb
from agentapi_proxy.v1 import agent_service_pb2_grpc as pb_grpc
from bench import logstream, profiling, report, scale, scale_provision, startup, traffic
from bench.procfs import processes_by_group
from bench.servers import REPO, chp_available, configurable_http_proxy
from tests.harness import ProxyProcess, free_port_range, running_proxy, stub

logger = logging.getLogger("bench")

DEFAULT_OUT = REPO / "bench" / "results" / "latest.json"
LOG_WRITER = Path(__file__).resolve().parent / "log_writer.py"
# Tiny agents of the scale section: they never listen, so they stay STARTING.
TINY_AGENT_COMMAND = "sh -c 'exec sleep 900' tiny-agent {port}"


@dataclass(frozen=True)
class Plan:
    """How much each section does; see :data:`PLANS`."""

    name: str
    clients: int
    http_rounds: int
    http_seconds: float
    http_warmup: float
    sse_messages: int
    ready_repetitions: int
    burst_lines: int
    burst_repetitions: int
    latency_rate: float
    latency_seconds: float
    follower_counts: tuple[int, ...]
    follower_seconds: float
    follower_rate: float
    scale_counts: tuple[int, ...]
    list_calls: int
    # Scale in provision mode (agents as StatefulSets in the Kubernetes test double).
    provision_counts: tuple[int, ...]
    provision_idle_seconds: float
    # API requests that follow an operation: those until none came for this long.
    provision_quiet_seconds: float
    profile_seconds: int
    # Hang guard for the whole run.
    deadline_seconds: float


PLANS = {
    "default": Plan(
        name="default",
        clients=32,
        http_rounds=2,
        http_seconds=4.0,
        http_warmup=1.0,
        sse_messages=60,
        ready_repetitions=8,
        burst_lines=200_000,
        burst_repetitions=3,
        latency_rate=200.0,
        latency_seconds=5.0,
        follower_counts=(1, 100, 1000),
        follower_seconds=4.0,
        follower_rate=2.0,
        scale_counts=(10, 100),
        list_calls=20,
        # The double's fake controllers do work that grows with agents squared: 100
        # agents already time its API out (see bench/README.md).
        provision_counts=(10, 100),
        provision_idle_seconds=3.0,
        provision_quiet_seconds=1.0,
        profile_seconds=6,
        deadline_seconds=900.0,
    ),
    "quick": Plan(
        name="quick",
        clients=8,
        http_rounds=1,
        http_seconds=1.0,
        http_warmup=0.3,
        sse_messages=6,
        ready_repetitions=2,
        burst_lines=20_000,
        burst_repetitions=1,
        latency_rate=100.0,
        latency_seconds=1.5,
        follower_counts=(1, 20, 100),
        follower_seconds=1.5,
        follower_rate=4.0,
        scale_counts=(5, 20),
        list_calls=5,
        provision_counts=(5, 10),
        provision_idle_seconds=1.0,
        provision_quiet_seconds=0.5,
        profile_seconds=2,
        deadline_seconds=100.0,
    ),
}


def large(plan: Plan) -> Plan:
    """``plan`` with the scale section going up to 1,000 agents."""
    return replace(
        plan,
        name=plan.name + "+large",
        scale_counts=(*plan.scale_counts, 1000),
        deadline_seconds=plan.deadline_seconds + 900,
    )


@contextlib.contextmanager
def proxy_process(
    state_dir: Path, *, command: str = "serve", env: dict[str, str] | None = None
) -> Iterator[ProxyProcess]:
    state_dir.mkdir(parents=True)
    with running_proxy(state_dir, command=command, env=env) as proxy:
        yield proxy


@contextlib.asynccontextmanager
async def control_plane_stub(proxy: ProxyProcess) -> AsyncIterator[pb_grpc.AgentServiceStub]:
    channel, agents = stub(proxy.grpc_target)
    try:
        yield agents
    finally:
        await channel.close(None)


async def create_ready(
    agents: pb_grpc.AgentServiceStub,
    agent_id: str,
    *,
    session_id: str,
    env: dict[str, str] | None = None,
) -> pb.Agent:
    """Create an agent and wait until it is READY; returns it."""
    await agents.CreateAgent(
        pb.CreateAgentRequest(session_id=session_id, agent_id=agent_id, env=env or {})
    )
    waited = await agents.WaitAgent(
        pb.WaitAgentRequest(
            agent_id=agent_id, state=pb.AGENT_STATE_READY, timeout=Duration(seconds=60)
        )
    )
    agent: pb.Agent = waited.agent
    return agent


def group_of(proxy: ProxyProcess, agent_id: str) -> int:
    """The process group id of a running agent (its shim's PID, from its record)."""
    for record in proxy.agent_records():
        spec = record.get("spec")
        if isinstance(spec, dict) and spec.get("agent_id") == agent_id:
            pid = record.get("pid")
            if isinstance(pid, int):
                return pid
    raise RuntimeError(f"no record of agent {agent_id}")


def proxy_pid(proxy: ProxyProcess) -> int:
    assert proxy.proc is not None
    return proxy.proc.pid


async def check_answers(url: str) -> None:
    """GET ``url`` must answer 200 (e.g. the agent's host check passes through a proxy)."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
        http.get(url) as response,
    ):
        if response.status != 200:
            raise RuntimeError(f"GET {url} answered {response.status}: {await response.text()}")


class Runner:
    """Runs the sections of one plan in order, each against its own servers."""

    def __init__(self, plan: Plan, *, workdir: Path, profile_dir: Path | None) -> None:
        self.plan = plan
        self.workdir = workdir
        self.profile_dir = profile_dir
        self.result: dict[str, Any] = {}
        self.failed = False

    async def section(self, name: str, run: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        started = time.perf_counter()
        print(f"... {name}", file=sys.stderr, flush=True)
        try:
            figures = await run()
        except asyncio.CancelledError:
            self.result[name] = {"error": "cancelled: the run passed its deadline or was stopped"}
            raise
        except Exception as exc:
            self.failed = True
            logger.error("section %s failed: %s", name, exc)
            figures = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
        figures["section_seconds"] = round(time.perf_counter() - started, 1)
        self.result[name] = figures

    async def profile(
        self, name: str, pid: int, workload: Callable[[], Awaitable[object]]
    ) -> dict[str, Any] | None:
        if self.profile_dir is None:
            return None
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        return await profiling.profile_while(
            pid,
            seconds=self.plan.profile_seconds,
            output=self.profile_dir / f"{name}.txt",
            workload=workload,
        )

    async def run(self) -> None:
        with proxy_process(self.workdir / "serve") as proxy:
            async with control_plane_stub(proxy) as agents:
                await self.section(
                    "create_to_ready",
                    lambda: startup.create_to_ready(
                        agents, repetitions=self.plan.ready_repetitions
                    ),
                )
                await self.section("traffic", lambda: self.traffic(proxy, agents))
        writer = f"{shlex.quote(sys.executable)} {shlex.quote(str(LOG_WRITER))} --port {{port}}"
        with proxy_process(
            self.workdir / "logs",
            command="control-plane",
            env={"AGENTAPI_PROCESS_COMMAND": writer},
        ) as proxy:
            async with control_plane_stub(proxy) as agents:
                await self.section("logs", lambda: self.logs(proxy, agents))
        with proxy_process(
            self.workdir / "scale",
            command="control-plane",
            env={
                "AGENTAPI_PROCESS_COMMAND": TINY_AGENT_COMMAND,
                "AGENTAPI_PROCESS_PORT_RANGE": free_port_range(max(self.plan.scale_counts) + 50),
            },
        ) as proxy:
            async with control_plane_stub(proxy) as agents:
                await self.section("scale", lambda: self.scale(proxy, agents))
        await self.section("scale_provision", self.scale_provision)

    async def traffic(
        self, proxy: ProxyProcess, agents: pb_grpc.AgentServiceStub
    ) -> dict[str, Any]:
        agent = await create_ready(agents, "traffic", session_id="bench-traffic")
        port = int(agent.address.rsplit(":", 1)[1])
        pgid = group_of(proxy, "traffic")
        bases = {
            "direct": f"http://127.0.0.1:{port}",
            "gateway": f"{proxy.base_url}/agents/traffic/proxy",
        }
        roles: dict[str, Callable[[], list[int]]] = {
            "agent": lambda: processes_by_group().get(pgid, []),
            "agentapi_proxy": lambda: [proxy_pid(proxy)],
        }
        path_roles = {"direct": ["agent"], "gateway": ["agentapi_proxy", "agent"]}
        notes = []
        async with contextlib.AsyncExitStack() as stack:
            # A second gateway on the direct path: it asks the same control plane for a
            # grant, then connects to the agent itself.
            direct_gateway = stack.enter_context(
                proxy_process(
                    self.workdir / "direct-gateway",
                    command="gateway",
                    env={
                        "AGENTAPI_GATEWAY_TRAFFIC_PATH": "direct",
                        "AGENTAPI_GATEWAY_CONTROL_PLANE": proxy.grpc_target,
                    },
                )
            )
            bases["gateway_direct"] = f"{direct_gateway.base_url}/agents/traffic/proxy"
            roles["gateway_direct"] = lambda: [proxy_pid(direct_gateway)]
            path_roles["gateway_direct"] = ["gateway_direct", "agent"]
            if chp_available():
                chp = await stack.enter_async_context(configurable_http_proxy(port))
                bases["chp"] = f"http://127.0.0.1:{chp.port}"
                roles["chp"] = lambda: [chp.pid]
                path_roles["chp"] = ["chp", "agent"]
                notes.append(
                    "configurable-http-proxy forwards the client's Host (127.0.0.1:PORT) "
                    "unchanged; the agent's host check allows 127.0.0.1, so no "
                    "--change-origin is needed"
                )
            else:
                notes.append("configurable-http-proxy is not installed (npm ci): no chp path")
            for base in bases.values():
                await check_answers(base + "/status")
            http = await traffic.http_load(
                {path: base + "/status" for path, base in bases.items()},
                clients=self.plan.clients,
                rounds=self.plan.http_rounds,
                seconds=self.plan.http_seconds,
                warmup=self.plan.http_warmup,
                roles=roles,
                path_roles=path_roles,
            )
            sse = await traffic.sse_latency(
                {path: base + "/events" for path, base in bases.items()},
                message_url=bases["direct"] + "/message",
                messages=self.plan.sse_messages,
            )
            figures: dict[str, Any] = {"http": http, "sse": sse, "notes": notes}
            profile = await self.profile(
                "gateway_traffic",
                proxy_pid(proxy),
                lambda: _gateway_load(bases["gateway"] + "/status", clients=self.plan.clients),
            )
            if profile is not None:
                figures["profile"] = profile
        await agents.DeleteAgent(pb.DeleteAgentRequest(agent_id="traffic"))
        return figures

    async def logs(self, proxy: ProxyProcess, agents: pb_grpc.AgentServiceStub) -> dict[str, Any]:
        plan = self.plan

        def log_path(agent_id: str) -> Path:
            return proxy.state_dir / "agents" / agent_id / "current.log"

        figures: dict[str, Any] = {}
        await create_ready(
            agents, "burst", session_id="bench-logs", env={"BENCH_LOG_BURST": str(plan.burst_lines)}
        )
        figures["throughput"] = await logstream.log_throughput(
            agents, agent_id="burst", log_path=log_path("burst"), repetitions=plan.burst_repetitions
        )
        profile = await self.profile(
            "stream_logs_catch_up",
            proxy_pid(proxy),
            lambda: logstream.read_stream_logs(agents, "burst"),
        )
        if profile is not None:
            figures["throughput"]["profile"] = profile
        await agents.DeleteAgent(pb.DeleteAgentRequest(agent_id="burst"))

        await create_ready(
            agents,
            "ticker",
            session_id="bench-logs",
            env={"BENCH_LOG_RATE": str(plan.latency_rate)},
        )
        figures["latency"] = await logstream.log_latency(
            agents,
            agent_id="ticker",
            log_path=log_path("ticker"),
            seconds=plan.latency_seconds,
            rate=plan.latency_rate,
        )
        await agents.DeleteAgent(pb.DeleteAgentRequest(agent_id="ticker"))

        await create_ready(
            agents,
            "fanout",
            session_id="bench-logs",
            env={"BENCH_LOG_RATE": str(plan.follower_rate)},
        )
        figures["followers"] = await logstream.follower_memory(
            agents,
            agent_id="fanout",
            control_plane_pid=proxy_pid(proxy),
            counts=plan.follower_counts,
            seconds=plan.follower_seconds,
            rate=plan.follower_rate,
            profile=None
            if self.profile_dir is None
            else lambda: self.profile(
                "stream_logs_followers", proxy_pid(proxy), lambda: asyncio.sleep(0.2)
            ),
        )
        await agents.DeleteAgent(pb.DeleteAgentRequest(agent_id="fanout"))
        return figures

    async def scale(self, proxy: ProxyProcess, agents: pb_grpc.AgentServiceStub) -> dict[str, Any]:
        def agent_pids() -> list[int]:
            groups = processes_by_group()
            pgids = [r["pid"] for r in proxy.agent_records() if isinstance(r.get("pid"), int)]
            return [pid for pgid in pgids for pid in groups.get(pgid, [])]  # type: ignore[call-overload]

        figures = await scale.scale(
            agents,
            control_plane_pid=proxy_pid(proxy),
            agent_pids=agent_pids,
            counts=self.plan.scale_counts,
            list_calls=self.plan.list_calls,
        )
        figures["notes"] = [
            "tiny agents run `sleep` and never listen: they stay STARTING, and the control "
            "plane keeps probing each one's ready path, most often in its first seconds "
            "(that is the idle CPU)"
        ]
        return figures

    async def scale_provision(self) -> dict[str, Any]:
        """Its own double and control plane, both stopped by PID at the end (also on failure):
        the control plane first, so that its watches end before the double does."""
        async with scale_provision.kube_server(
            self.workdir / "kube", namespace=scale_provision.NAMESPACE
        ) as kube:
            with proxy_process(
                self.workdir / "scale-provision",
                command="control-plane",
                env=kube.provision_env(image=scale_provision.IMAGE),
            ) as proxy:
                async with control_plane_stub(proxy) as agents:
                    figures = await scale_provision.provision_scale(
                        agents,
                        kube=kube,
                        control_plane_pid=proxy_pid(proxy),
                        counts=self.plan.provision_counts,
                        list_calls=self.plan.list_calls,
                        idle_seconds=self.plan.provision_idle_seconds,
                        quiet_seconds=self.plan.provision_quiet_seconds,
                    )
                problems = [
                    line
                    for line in proxy.log_text().splitlines()
                    if " ERROR " in line or "Traceback" in line
                ]
        figures["notes"] = [
            "agents are StatefulSets in the Kubernetes test double (tests/kube_double), which "
            "runs in a process of its own; its pods turn ready a few hundred ms after creation",
            "API calls: 'during' = requests the double received while the gRPC call ran, "
            "'after' = those that followed until no request came for "
            f"{self.plan.provision_quiet_seconds:g} s (the watches reacting)",
            f"the driver re-lists everything every {RESYNC_SECONDS:g} s; an idle window "
            "shorter than that sees no re-list",
        ]
        if problems:
            figures["notes"].append(f"control plane logged {len(problems)} errors: {problems[:3]}")
        if figures.get("kube_double_internal_errors"):
            figures["notes"].append("the double reported internal errors (bugs of its own)")
        return figures


async def _gateway_load(url: str, *, clients: int) -> None:
    async with aiohttp.ClientSession(timeout=traffic.REQUEST_TIMEOUT) as session:
        await traffic.closed_loop(session, url, clients=clients, seconds=1.0)


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


async def main_async(plan: Plan, *, out: Path, profile: bool) -> int:
    started = time.perf_counter()
    meta: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "plan": asdict(plan),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "aiohttp": aiohttp.__version__,
        "cpus": os.cpu_count(),
        "load_average_before": _load_average(),
    }
    with tempfile.TemporaryDirectory(prefix="agentapi-bench-") as tmp:
        runner = Runner(
            plan, workdir=Path(tmp), profile_dir=out.parent / "profiles" if profile else None
        )
        try:
            async with asyncio.timeout(plan.deadline_seconds):
                await runner.run()
        except TimeoutError:
            runner.failed = True
            runner.result["error"] = f"the run passed its deadline of {plan.deadline_seconds}s"
    meta["load_average_after"] = _load_average()
    meta["seconds"] = round(time.perf_counter() - started, 1)
    result = {"meta": meta, **runner.result}
    _write_json(out, result)
    print(report.render(result))
    print(f"\nwritten to {out}")
    return 1 if runner.failed else 0


def _write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def _counts(text: str) -> tuple[int, ...]:
    """Parse "10,100,1000" into (10, 100, 1000); the counts must be positive and increasing."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from exc
    if not counts or counts[0] < 1 or list(counts) != sorted(set(counts)):
        raise argparse.ArgumentTypeError(f"counts must be positive and increasing: {text!r}")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Measure agentapi-proxy against direct access, side by side in one run.",
    )
    parser.add_argument("--quick", action="store_true", help="small counts, well under a minute")
    parser.add_argument("--large", action="store_true", help="also 1,000 tiny agents (scale)")
    parser.add_argument(
        "--profile", action="store_true", help="also sample the servers with py-spy"
    )
    parser.add_argument("--clients", type=int, help="concurrent HTTP clients (default 32)")
    parser.add_argument(
        "--provision-counts",
        type=_counts,
        help="agent counts of the provision-mode scale section, e.g. 10,100,1000",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON file ({DEFAULT_OUT})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    plan = PLANS["quick" if args.quick else "default"]
    if args.large:
        plan = large(plan)
    if args.clients:
        plan = replace(plan, clients=args.clients)
    if args.provision_counts:
        plan = replace(plan, provision_counts=args.provision_counts)
    return asyncio.run(main_async(plan, out=args.out.resolve(), profile=args.profile))


if __name__ == "__main__":
    raise SystemExit(main())
