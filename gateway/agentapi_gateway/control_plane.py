"""The gateway's one gRPC channel to the control plane.

Calls never set ``wait_for_ready``: while the control plane is unreachable
they fail at once with UNAVAILABLE (HTTP 503 with ``Retry-After``) instead of
hanging, and the channel keeps reconnecting by itself. The reconnect backoff
is capped at a few seconds (gRPC's default cap is two minutes), so the
gateway serves again soon after a restarted control plane listens again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any, Final, TypeVar, cast

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentapi_gateway.tunnel import Tunnels
from agentapi_proxy.v1 import agent_service_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

_CHANNEL_OPTIONS: Final = (
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 3000),
)
# The whole server's health (grpc_health's HealthServicer answers it by default).
HEALTH_SERVICE: Final = ""
HEALTH_TIMEOUT_SECONDS: Final = 2.0
# What read() returns at the end of a stream (grpc-stubs does not declare it).
_END_OF_STREAM: Final[object] = grpc.aio.EOF  # type: ignore[attr-defined]

M = TypeVar("M", bound=Message)


async def next_message(
    call: grpc.aio.UnaryStreamCall[Any, M] | grpc.aio.StreamStreamCall[Any, M],
) -> M | None:
    """The next response message of a streaming call, or None at its end.

    Raises grpc.aio.AioRpcError when the call failed.
    """
    reply = await call.read()
    return None if reply is _END_OF_STREAM else cast(M, reply)


class ControlPlane:
    """A channel and stub to the control plane, plus the streams open on them.

    Create it inside the running event loop (grpc.aio channels bind to it);
    close it with :meth:`close`. Not thread-safe.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self.stub = pb_grpc.AgentServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self._open_streams: set[grpc.aio.Call] = set()
        # Agent traffic whose request is whole at hand (agentapi_gateway.tunnel).
        self.tunnels = Tunnels(self.channel)

    def rpc(self, name: str) -> Any:
        """The stub's multi-callable for the RPC called ``name``."""
        return getattr(self.stub, name)

    @contextlib.contextmanager
    def streaming(self, call: grpc.aio.Call) -> Iterator[grpc.aio.Call]:
        """Track a streaming call so :meth:`cancel_streams` can end it; cancels it on exit.

        Cancelling a call that already finished does nothing, so leaving the
        block by any path (return, error, client gone) never leaks a stream.
        """
        self._open_streams.add(call)
        try:
            yield call
        finally:
            self._open_streams.discard(call)
            call.cancel()

    def cancel_streams(self) -> int:
        """Cancel every open streaming call and tunnel exchange (at shutdown); returns how many.

        Agent traffic goes through ProxyHTTP from then on.
        """
        calls = list(self._open_streams)
        for call in calls:
            call.cancel()
        return len(calls) + self.tunnels.break_off()

    async def health(self) -> str:
        """The control plane's health status name, e.g. "SERVING"; raises grpc.RpcError."""
        response = await self._health.Check(
            health_pb2.HealthCheckRequest(service=HEALTH_SERVICE),
            timeout=HEALTH_TIMEOUT_SECONDS,
            wait_for_ready=False,
        )
        return cast(str, health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    async def close(self) -> None:
        """Close the tunnel and the channel; calls still open end with CANCELLED."""
        await self.tunnels.close()
        await self.channel.close(None)
