"""What operators read: Prometheus metrics and the control plane's own log lines."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import grpc
from prometheus_client.parser import text_string_to_metric_families

from agentapi_proxy.v1 import agent_service_pb2 as pb
from tests.harness import eventually, running_proxy, stub
from tests.test_process_agents import create_ready, expect_code


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_count_agents_calls_errors_streams_and_bytes(tmp_path: Path) -> None:
    env = {"AGENTAPI_SERVER_METRICS_LISTEN": "127.0.0.1:0"}
    with running_proxy(tmp_path, env=env) as proxy:
        await eventually(lambda: proxy.metrics_port != 0)
        channel, agents = stub(proxy.grpc_target)
        async with channel, aiohttp.ClientSession() as http:
            await create_ready(agents, "m1")
            await expect_code(
                agents.GetAgent(pb.GetAgentRequest(agent_id="missing")), grpc.StatusCode.NOT_FOUND
            )
            follower = agents.StreamLogs(pb.StreamLogsRequest(agent_id="m1", follow=True))
            await follower.read()
            async with http.post(
                f"{proxy.base_url}/agents/m1/proxy/message", json={"content": "hi", "type": "user"}
            ) as response:
                assert response.status == 200

            for url in (
                f"http://127.0.0.1:{proxy.metrics_port}/metrics",
                f"{proxy.base_url}/metrics",
            ):
                async with http.get(url) as response:
                    assert response.status == 200
                    found = samples(await response.text())
                assert value(found, "agentapi_agents", state="ready", mode="process") == 1
                assert (
                    value(found, "agentapi_rpc_errors_total", method="GetAgent", code="NOT_FOUND")
                    == 1
                )
                assert (
                    value(
                        found,
                        "agentapi_rpc_duration_seconds_count",
                        method="CreateAgent",
                        code="OK",
                    )
                    == 1
                )
                assert value(found, "agentapi_open_streams", method="StreamLogs") == 1
                assert value(found, "agentapi_proxied_bytes_total", direction="to_agent") > 0
                assert value(found, "agentapi_proxied_bytes_total", direction="from_agent") > 0
            follower.cancel()


async def test_json_logs_carry_the_agent_id(tmp_path: Path) -> None:
    with running_proxy(
        tmp_path, env={"AGENTAPI_LOG_FORMAT": "json"}, command="control-plane"
    ) as proxy:
        channel, agents = stub(proxy.grpc_target)
        async with channel:
            await create_ready(agents, "logged")
            await agents.DeleteAgent(pb.DeleteAgentRequest(agent_id="logged"))
        await eventually(lambda: "deleted" in proxy.log_text())
        entries = [json.loads(line) for line in proxy.lines]
        about = [e for e in entries if "logged" in e["message"]]
        assert about, proxy.log_text()
        assert all(e.get("agent_id") == "logged" for e in about)
        assert {"time", "level", "logger", "message"} <= set(about[0])
