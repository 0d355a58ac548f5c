"""The gateway's aiohttp application: REST routes from the proto, the agent proxy, health.

The gateway holds no state of its own. Its one gRPC channel to the control
plane is opened when the application starts and closed when it is cleaned
up; at shutdown, open streams are cancelled first so their clients see the
connection end instead of holding the shutdown for its whole timeout.

Serve it with ``handler_cancellation=True`` (as :func:`run_gateway` does):
a client that leaves then cancels its gRPC call at once. Without it, a
stream whose client left is noticed only when its next chunk is written.
No timeout of the gateway's ends a stream: SSE may stay open for hours.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Final

import grpc
from aiohttp import web
from google.protobuf.descriptor import ServiceDescriptor

from agentapi_gateway.connections import ConnectionLimits, GatewaySite, connection_limit
from agentapi_gateway.control_plane import ControlPlane
from agentapi_gateway.direct import install_direct_path
from agentapi_gateway.errors import (
    ErrorStatus,
    error_response,
    status_from_http_exception,
    status_from_project_error,
)
from agentapi_gateway.handlers import Handler, server_stream_handler, unary_handler
from agentapi_gateway.openapi import add_openapi_route
from agentapi_gateway.proxy import proxy_handler
from agentapi_gateway.routes import HttpBinding, service_bindings
from agentapi_proxy.errors import AgentApiError, FailedPrecondition
from agentapi_proxy.metrics import handle_metrics
from agentapi_proxy.settings import GatewaySettings
from agentapi_proxy.v1 import agent_service_pb2 as pb

logger = logging.getLogger(__name__)

AGENT_SERVICE: Final = pb.DESCRIPTOR.services_by_name["AgentService"]
SETTINGS_KEY: Final = web.AppKey("settings", GatewaySettings)
CONTROL_PLANE_KEY: Final = web.AppKey("control_plane", ControlPlane)


def create_app(
    settings: GatewaySettings, *, service: ServiceDescriptor = AGENT_SERVICE
) -> web.Application:
    """The gateway application for ``settings`` (no I/O until it is started).

    Routes come from ``service``'s ``google.api.http`` options; raises
    ValueError when one of them cannot be served.
    """
    app = web.Application(middlewares=[error_middleware])
    app[SETTINGS_KEY] = settings
    app.cleanup_ctx.append(_control_plane_context)
    app.on_shutdown.append(_cancel_streams)
    install_direct_path(app, settings)

    bindings = service_bindings(service)
    add_rpc_routes(app.router, bindings, max_body_bytes=settings.max_json_body_bytes)
    add_openapi_route(app, service=service, bindings=bindings)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    # Prometheus text format: the gateway's figures, and under `serve` (one process,
    # one registry) the control plane's too.
    app.router.add_get("/metrics", handle_metrics)
    return app


async def run_gateway(
    settings: GatewaySettings,
    *,
    host: str | None = None,
    port: int | None = None,
    shutdown_timeout: float = 5.0,
) -> web.AppRunner:
    """Start serving the gateway and return its runner; stop it with ``await runner.cleanup()``.

    ``host`` and ``port`` default to ``settings.listen``; port 0 picks a free
    port (read it from ``runner.addresses``). ``shutdown_timeout`` bounds how
    long cleanup waits for requests still running. Raises FailedPrecondition
    when the address cannot be bound.
    """
    listen_host, _, listen_port = settings.listen.rpartition(":")
    host = host if host is not None else listen_host.strip("[]")
    port = port if port is not None else int(listen_port)

    runner = web.AppRunner(
        create_app(settings), handler_cancellation=True, shutdown_timeout=shutdown_timeout
    )
    await runner.setup()
    try:
        limits = ConnectionLimits(
            total=connection_limit(settings.max_connections),
            per_client=settings.max_connections_per_client,
        )
        await GatewaySite(
            runner, host, port, head_seconds=settings.header_timeout_seconds, limits=limits
        ).start()
    except OSError as exc:
        await runner.cleanup()
        raise FailedPrecondition(
            f"the gateway cannot listen on {host}:{port}: {exc.strerror or exc}",
            reason="ListenFailed",
        ) from exc
    for address in runner.addresses:
        logger.info("gateway listening on http://%s:%s", *address[:2])
    return runner


def add_rpc_routes(
    router: web.UrlDispatcher, bindings: Sequence[HttpBinding], *, max_body_bytes: int
) -> None:
    """Register one handler per binding; bindings that share a path share one resource."""
    resources: dict[str, web.Resource] = {}
    for binding in bindings:
        path = binding.path.aiohttp_path
        if path not in resources:
            resources[path] = router.add_resource(path)
        resources[path].add_route(
            binding.http_method, _handler(binding, max_body_bytes=max_body_bytes)
        )


def _handler(binding: HttpBinding, *, max_body_bytes: int) -> Handler:
    if binding.is_unary:
        return unary_handler(binding, control_plane=_control_plane, max_body_bytes=max_body_bytes)
    if binding.is_server_streaming:
        return server_stream_handler(
            binding, control_plane=_control_plane, max_body_bytes=max_body_bytes
        )
    if binding.is_bidi_streaming:
        return proxy_handler(binding, control_plane=_control_plane)
    raise ValueError(f"{binding.method.full_name}: client-streaming RPCs have no REST form")


def _control_plane(request: web.Request) -> ControlPlane:
    return request.config_dict[CONTROL_PLANE_KEY]


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the gateway answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 when the control plane's gRPC health check answers SERVING, else 503."""
    plane = _control_plane(request)
    try:
        status = await plane.health()
    except grpc.aio.AioRpcError as exc:
        return error_response(
            ErrorStatus(
                grpc.StatusCode.UNAVAILABLE,
                f"the control plane at {plane.address} is not reachable: {exc.details()}",
            )
        )
    if status != "SERVING":
        return error_response(
            ErrorStatus(
                grpc.StatusCode.UNAVAILABLE,
                f"the control plane at {plane.address} reports {status}",
            )
        )
    return web.json_response({"status": status, "control_plane": plane.address})


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every failure as a JSON error body; never a traceback."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        status = status_from_http_exception(exc, method=request.method, path=request.path)
        response = error_response(status, http_status=exc.status)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except asyncio.CancelledError:
        raise
    except AgentApiError as exc:
        return error_response(status_from_project_error(exc))
    except grpc.aio.UsageError:
        # Only raised once the channel is closed, i.e. while the gateway shuts down.
        return error_response(
            ErrorStatus(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down")
        )
    except Exception:
        if request.writer.output_size:
            # A response already started; aiohttp closes the connection.
            raise
        logger.exception("unexpected error serving %s %s", request.method, request.path)
        return error_response(
            ErrorStatus(grpc.StatusCode.INTERNAL, "internal error in the gateway (see its log)")
        )


async def _control_plane_context(app: web.Application) -> AsyncIterator[None]:
    address = app[SETTINGS_KEY].control_plane
    plane = ControlPlane(address)
    app[CONTROL_PLANE_KEY] = plane
    logger.debug("gateway channel to the control plane at %s opened", address)
    try:
        yield
    finally:
        await plane.close()


async def _cancel_streams(app: web.Application) -> None:
    plane = app.get(CONTROL_PLANE_KEY)
    if plane is not None:
        count = plane.cancel_streams()
        if count:
            logger.info("gateway shutdown: cancelled %d open streams", count)
