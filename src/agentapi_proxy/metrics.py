"""Prometheus metrics of the control plane.

They live in the process-wide default registry, so ``agentapi-proxy serve``
shows control plane and gateway figures together on the gateway's
``/metrics``; a control plane on its own serves them on
``server.metrics_listen``.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections.abc import Callable, Iterator

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from agentapi_proxy.model import AgentInfo

logger = logging.getLogger(__name__)

RPC_LATENCY = Histogram(
    "agentapi_rpc_duration_seconds",
    "Time to answer a unary RPC, or the lifetime of a streaming one.",
    ["method", "code"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
)
RPC_ERRORS = Counter(
    "agentapi_rpc_errors_total", "RPCs that ended with a status other than OK.", ["method", "code"]
)
OPEN_STREAMS = Gauge(
    "agentapi_open_streams", "Streaming RPCs open now (logs, watches, traffic).", ["method"]
)
PROXIED_BYTES = Counter(
    "agentapi_proxied_bytes_total",
    "Body bytes carried between callers and agents.",
    ["direction"],
)


class AgentStateCollector(Collector):
    """Agents by state and mode, read from the state board at scrape time."""

    def __init__(self, snapshot: Callable[[], list[AgentInfo]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "agentapi_agents", "Agents known to this control plane.", labels=["state", "mode"]
        )
        counts = Tally((info.state.value, info.mode.value) for info in self._snapshot())
        for (state, mode), count in sorted(counts.items()):
            family.add_metric([state, mode], count)
        yield family


def register_agent_states(snapshot: Callable[[], list[AgentInfo]]) -> Collector:
    """Publish agent counts; returns the collector so it can be unregistered."""
    collector = AgentStateCollector(snapshot)
    REGISTRY.register(collector)
    return collector


def unregister(collector: Collector) -> None:
    REGISTRY.unregister(collector)


async def handle_metrics(request: web.Request) -> web.Response:
    """GET /metrics in the Prometheus text format."""
    body = generate_latest(REGISTRY)
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def serve_metrics(address: str) -> web.AppRunner:
    """Serve /metrics on ``address`` (host:port) until the runner is cleaned up."""
    app = web.Application()
    app.router.add_get("/metrics", handle_metrics)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    host, port = address.rsplit(":", 1)
    await web.TCPSite(runner, host.strip("[]"), int(port)).start()
    for bound in runner.addresses:
        logger.info("metrics on http://%s:%s/metrics", *bound[:2])
    return runner
