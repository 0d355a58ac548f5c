"""The control plane process: the gRPC server, its driver and its health service."""

from __future__ import annotations

import asyncio
import logging

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client.registry import Collector

from agentapi_proxy import metrics
from agentapi_proxy.auth import Authenticator, authenticator_from_settings
from agentapi_proxy.drivers.base import Driver
from agentapi_proxy.service import AgentService
from agentapi_proxy.settings import Settings, SettingsError
from agentapi_proxy.stateboard import StateBoard
from agentapi_proxy.traffic import TrafficRelay
from agentapi_proxy.v1 import agent_service_pb2 as pb
from agentapi_proxy.v1 import agent_service_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AgentService"].full_name
SERVER_OPTIONS = [
    # Without this a second control plane could bind the same port and share its traffic.
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]


def make_driver(settings: Settings, board: StateBoard) -> Driver:
    """The driver the settings ask for.

    Raises SettingsError when switching modes would orphan agents.
    """
    if settings.provision_mode.enabled:
        leftovers = sorted(p.parent.name for p in settings.state_path.glob("agents/*/record.json"))
        if leftovers:
            raise SettingsError(
                "provision mode is enabled, but local agents of legacy mode still run: "
                + ", ".join(leftovers)
                + ". Delete them first (start with AGENTAPI_PROVISION_MODE_ENABLED=false and "
                "call DeleteAgent for each), then enable provision mode again"
            )
        from agentapi_proxy.drivers.statefulset import StatefulSetDriver, load_kube_configuration

        configuration, in_cluster = load_kube_configuration(settings.provision_mode.kubeconfig)
        return StatefulSetDriver(
            settings, board=board, configuration=configuration, in_cluster=in_cluster
        )
    from agentapi_proxy.drivers.process import ProcessDriver

    return ProcessDriver(settings.process, state_dir=settings.state_path, board=board)


class ControlPlane:
    """Owns the gRPC server and everything behind it; start() then stop(), once each."""

    def __init__(self, settings: Settings, *, authenticator: Authenticator | None = None) -> None:
        self.settings = settings
        self.board = StateBoard()
        self.driver = make_driver(settings, self.board)
        self.relay = TrafficRelay(self.driver)
        self.service = AgentService(
            self.driver,
            self.relay,
            authenticator=authenticator
            or authenticator_from_settings(settings.auth, listen=[settings.server.grpc_listen]),
            limits=settings.server,
        )
        self.health = HealthServicer()
        self.server = grpc.aio.server(
            options=[
                *SERVER_OPTIONS,
                ("grpc.max_receive_message_length", settings.server.max_message_bytes),
            ]
        )
        self.port = 0
        self._agent_counts: Collector | None = None
        self._metrics_runner: web.AppRunner | None = None

    async def start(self) -> int:
        """Recover existing agents, then listen. Returns the bound port.

        Raises SettingsError when agents of the other mode would be orphaned.
        """
        if not self.settings.provision_mode.enabled:
            from agentapi_proxy.drivers.statefulset import statefulset_agents_left

            left = await asyncio.to_thread(statefulset_agents_left, self.settings)
            if left:
                namespace = self.settings.provision_mode.namespace
                raise SettingsError(
                    "legacy mode is configured, but provision-mode agents still exist in "
                    f"namespace {namespace}: {', '.join(left)}. Delete them first (start "
                    "with AGENTAPI_PROVISION_MODE_ENABLED=true and call DeleteAgent for each), "
                    "then switch modes"
                )
        await self.driver.start()
        await self.relay.start()
        pb_grpc.add_AgentServiceServicer_to_server(self.service, self.server)  # type: ignore[no-untyped-call]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        address = self.settings.server.grpc_listen
        try:
            self.port = self.server.add_insecure_port(address)
        except RuntimeError as exc:
            raise SettingsError(
                f"cannot listen on server.grpc_listen = {address!r}: {exc}"
            ) from exc
        await self.server.start()
        self._agent_counts = metrics.register_agent_states(self.board.all)
        if self.settings.server.metrics_listen:
            self._metrics_runner = await metrics.serve_metrics(self.settings.server.metrics_listen)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        logger.info("control plane listening on %s:%s (gRPC)", address.rsplit(":", 1)[0], self.port)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking calls, end open streams, wait up to ``grace`` seconds, then cancel.

        Agents keep running; a restarted control plane adopts them.
        """
        grace = self.settings.server.shutdown_grace_seconds if grace is None else grace
        await self.health.enter_graceful_shutdown()
        self.service.begin_shutdown()
        self.board.close()
        await self.driver.close()
        await self.server.stop(grace)
        await self.relay.close()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        if self._agent_counts is not None:
            metrics.unregister(self._agent_counts)
        logger.info("control plane stopped")
