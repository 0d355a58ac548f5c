"""The streaming proxy: one HTTP exchange with an agent over one ProxyHTTP call.

The request goes out as a head (method, raw path, raw query, end-to-end
headers) and then body chunks of at most 64 KiB as they are read from the
client; the response comes back as a head and body chunks, each written
to the client as it arrives, so SSE flows event by event and no body is
ever held whole in memory. gRPC's message size limit never applies to a
body, only to one chunk.

Every gRPC message is a batch of its own at both ends, so small exchanges
take shortcuts. A request without a body, or with a declared body of at most
one chunk, is read first and sent as one frame of the gateway's TunnelHTTP
stream (:mod:`agentapi_gateway.tunnel`), which carries many exchanges in
each message. Only when the control plane has no tunnel to offer does such a
request go as one ProxyHTTP message that also half-closes the call (a
unary-stream invocation of the same method: the client's cardinality is not
part of gRPC's wire format). A small complete response comes back as one
message or frame (``end_of_body``) and goes to the client in one write.

Before the agent's head arrives a failure is answered with its mapped
status (404 unknown agent, 503 agent or control plane unreachable). After
it, the status line is gone: the connection is closed without finishing
the body, so the client sees a truncated response rather than a clean end.

The path after ``/agents/{agent_id}/proxy`` is forwarded exactly as the
client sent it, still percent-encoded. Dot-segments are refused here and
again by the control plane, which owns the final check.

With ``gateway.traffic_path = "direct"`` the exchange goes to the agent
without the control plane in between (:mod:`agentapi_gateway.direct`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, TypeAlias
from urllib.parse import unquote

import grpc
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict

from agentapi_gateway.control_plane import ControlPlane, next_message
from agentapi_gateway.direct import DIRECT_PATH_KEY
from agentapi_gateway.errors import (
    ErrorStatus,
    error_response,
    status_from_project_error,
    status_from_rpc_error,
)
from agentapi_gateway.exchange import CHUNK_BYTES, AgentRequest, break_off
from agentapi_gateway.handlers import STREAM_HEADERS, ControlPlaneLookup, Handler
from agentapi_gateway.headers import (
    agent_request_headers,
    client_response_headers,
    credential_metadata,
)
from agentapi_gateway.routes import HttpBinding
from agentapi_gateway.tunnel import TunnelExchange, TunnelFailed, error_status
from agentapi_proxy.errors import AgentApiError, InvalidArgument
from agentapi_proxy.v1 import agent_service_pb2 as pb

logger = logging.getLogger(__name__)

__all__ = ["CHUNK_BYTES", "agent_path", "agent_request", "proxy_handler"]

ProxyCall: TypeAlias = (
    "grpc.aio.StreamStreamCall[pb.ProxyHTTPRequest, pb.ProxyHTTPResponse]"
    " | grpc.aio.UnaryStreamCall[pb.ProxyHTTPRequest, pb.ProxyHTTPResponse]"
)


def proxy_handler(binding: HttpBinding, *, control_plane: ControlPlaneLookup) -> Handler:
    """A handler that carries any request under ``binding``'s path to the agent.

    Raises ValueError (at start-up) when the binding's template has no
    trailing ``**`` or no ``agent_id`` variable.
    """
    tail_index = binding.path.tail_index
    if tail_index is None:
        raise ValueError(f"{binding.path.template}: a proxy route must end in '**'")
    if not any(v.field_path == "agent_id" for v in binding.path.variables):
        raise ValueError(f"{binding.path.template}: a proxy route needs an {{agent_id}} variable")
    whole_request = _WholeRequestCalls(
        f"/{binding.method.containing_service.full_name}/{binding.method.name}"
    )

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            outgoing = agent_request(request, binding, tail_index=tail_index)
            metadata = credential_metadata(request.headers.items())
            body = await body_in_hand(request)
        except AgentApiError as exc:
            return error_response(status_from_project_error(exc))

        plane = control_plane(request)
        direct = request.config_dict.get(DIRECT_PATH_KEY)
        if direct is not None:
            response = await direct.forward(
                request, outgoing, body=body, metadata=metadata, plane=plane
            )
            if response is not None:
                return response

        head = outgoing.head()
        if body is not None:
            tunnel = await plane.tunnels.get(metadata)
            if tunnel is not None:
                exchange = tunnel.start(head, body=body, credentials=metadata)
                try:
                    return await _relay_exchange(request, exchange, agent_id=head.agent_id)
                finally:
                    exchange.close()
            message = pb.ProxyHTTPRequest(head=head, body=body, end_of_body=True)
            call: ProxyCall = whole_request.on(plane)(
                message, metadata=metadata, wait_for_ready=False
            )
            with plane.streaming(call):
                return await _relay_response(request, call, agent_id=head.agent_id)

        call = plane.rpc(binding.rpc_name)(metadata=metadata, wait_for_ready=False)
        with plane.streaming(call):
            sender = asyncio.create_task(_send_request(call, head, request))
            try:
                return await _relay_response(request, call, agent_id=head.agent_id)
            finally:
                sender.cancel()
                await asyncio.wait([sender])
                if not sender.cancelled() and (failure := sender.exception()) is not None:
                    logger.warning(
                        "agent %s: sending the request failed: %r", head.agent_id, failure
                    )

    return handle


class _WholeRequestCalls:
    """The proxy method invoked as unary-stream: head, body and half-close in one batch."""

    def __init__(self, method: str) -> None:
        self._method = method
        self._channel: grpc.aio.Channel | None = None
        self._callable: Any = None

    def on(self, plane: ControlPlane) -> Any:
        """The multi-callable on ``plane``'s channel (made once per channel)."""
        if self._channel is not plane.channel:
            self._callable = plane.channel.unary_stream(
                self._method,
                request_serializer=pb.ProxyHTTPRequest.SerializeToString,
                response_deserializer=pb.ProxyHTTPResponse.FromString,
                # As the generated stubs do: core resolves the method once, not per call.
                # grpc-stubs 1.53 does not know the argument yet.
                _registered_method=True,  # type: ignore[call-arg]
            )
            self._channel = plane.channel
        return self._callable


def agent_request(request: web.Request, binding: HttpBinding, *, tail_index: int) -> AgentRequest:
    """What the agent is to receive for ``request``; raises InvalidArgument."""
    agent_id = binding.path.field_values(dict(request.match_info)).get("agent_id", "")
    return AgentRequest(
        agent_id=agent_id,
        method=request.method,
        path=agent_path(request.raw_path, tail_index=tail_index),
        query=request.rel_url.raw_query_string,
        headers=agent_request_headers(
            request.headers.items(), client_address=request.remote, scheme=request.scheme
        ),
    )


def agent_path(raw_target: str, *, tail_index: int) -> str:
    """The still-encoded path the agent sees: "/" plus the segments after ``tail_index``.

    ``raw_target`` is the request target as sent (origin-form, query allowed).
    Raises InvalidArgument for another form, a dot-segment in any encoding, an
    empty first segment ("//host" reads as a network path) or a backslash.
    """
    if not raw_target.startswith("/"):
        raise InvalidArgument("the request target must be a path starting with '/'")
    raw_path = raw_target.split("?", 1)[0].split("#", 1)[0]
    segments = raw_path[1:].split("/")[tail_index:]
    for segment in segments:
        decoded = unquote(unquote(segment)) if "%" in segment else segment
        if decoded in {".", ".."}:
            raise InvalidArgument(f"the proxied path {raw_path[:200]!r} has a dot-segment")
        if "\\" in segment:
            raise InvalidArgument(f"the proxied path {raw_path[:200]!r} has a backslash")
    if len(segments) > 1 and segments[0] == "":
        raise InvalidArgument(f"the proxied path {raw_path[:200]!r} starts with '//'")
    return "/" + "/".join(segments)


async def body_in_hand(request: web.Request) -> bytes | None:
    """The whole request body when there is none or it declares at most CHUNK_BYTES.

    None when the body must stream (chunked, or larger). Raises
    InvalidArgument when the client breaks off while sending it.
    """
    if not request.body_exists:
        return b""
    length = request.content_length
    if length is None or length > CHUNK_BYTES:
        return None
    try:
        return await request.read()
    except (OSError, HttpProcessingError) as exc:
        raise InvalidArgument(f"the request body broke off: {exc}") from exc


async def _send_request(call: ProxyCall, head: pb.HTTPRequestHead, request: web.Request) -> None:
    """Write the head, the body in chunks as the client sends it, then end the request side."""
    assert isinstance(call, grpc.aio.StreamStreamCall)
    try:
        await call.write(pb.ProxyHTTPRequest(head=head))
        async for chunk in request.content.iter_chunked(CHUNK_BYTES):
            await call.write(pb.ProxyHTTPRequest(body=chunk))
        await call.done_writing()
    except (grpc.RpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
        # The call ended (the agent answered early, or it failed): the
        # response side reports the outcome.
        return
    except (OSError, HttpProcessingError) as exc:
        logger.info("agent %s: client broke off its request body: %s", head.agent_id, exc)
        call.cancel()


def _client_headers(head: pb.HTTPResponseHead) -> CIMultiDict[str]:
    headers = client_response_headers((h.name, h.value) for h in head.headers)
    headers.setdefault("X-Accel-Buffering", STREAM_HEADERS["X-Accel-Buffering"])
    return headers


async def _answer_whole(
    request: web.Request, status: int, headers: CIMultiDict[str], body: bytes, *, agent_id: str
) -> web.Response:
    """The whole response at once: status line, headers and body in one write."""
    whole = web.Response(status=status, headers=headers, body=body)
    try:
        await whole.prepare(request)
        await whole.write_eof()
    except ConnectionError:
        logger.debug("agent %s: client left before the response", agent_id)
    return whole


async def _relay_response(
    request: web.Request, call: ProxyCall, *, agent_id: str
) -> web.StreamResponse:
    try:
        first = await next_message(call)
    except grpc.aio.AioRpcError as exc:
        return error_response(status_from_rpc_error(exc))
    if first is None or not first.HasField("head"):
        return error_response(
            ErrorStatus(grpc.StatusCode.INTERNAL, "the control plane sent no response head")
        )
    head = first.head
    if not 100 <= head.status <= 599:
        return error_response(
            ErrorStatus(
                grpc.StatusCode.UNAVAILABLE,
                f"agent {agent_id!r} answered an invalid status {head.status}",
                reason="AgentResponseInvalid",
            )
        )

    headers = _client_headers(head)
    if first.end_of_body:
        whole = await _answer_whole(request, head.status, headers, first.body, agent_id=agent_id)
        await _finish(call, agent_id=agent_id)
        return whole

    response = web.StreamResponse(status=head.status, headers=headers)
    try:
        await response.prepare(request)
        if first.body:
            await response.write(first.body)
        while (message := await next_message(call)) is not None:
            if message.HasField("head"):
                logger.warning("agent %s: control plane sent a second response head", agent_id)
                break_off(request)
                return response
            if message.body:
                await response.write(message.body)
            if message.end_of_body:
                break
        await response.write_eof()
        await _finish(call, agent_id=agent_id)
    except grpc.aio.AioRpcError as exc:
        logger.info(
            "agent %s: response broken off after its head: %s %s",
            agent_id,
            exc.code().name,
            exc.details(),
        )
        break_off(request)
    except ConnectionError:
        logger.debug("agent %s: client left during the response", agent_id)
    return response


async def _relay_exchange(
    request: web.Request, exchange: TunnelExchange, *, agent_id: str
) -> web.StreamResponse:
    """Answer the client from a tunnel exchange, as :func:`_relay_response` does from a call."""
    try:
        first = await exchange.next()
    except TunnelFailed as exc:
        return error_response(exc.status)
    if first.HasField("error"):
        return error_response(error_status(first.error))
    head = first.head
    if not first.HasField("head") or not 100 <= head.status <= 599:
        return error_response(
            ErrorStatus(
                grpc.StatusCode.UNAVAILABLE,
                f"agent {agent_id!r} answered an invalid status {head.status}",
                reason="AgentResponseInvalid",
            )
            if first.HasField("head")
            else ErrorStatus(grpc.StatusCode.INTERNAL, "the control plane sent no response head")
        )

    headers = _client_headers(head)
    if first.end_of_body:
        return await _answer_whole(request, head.status, headers, first.body, agent_id=agent_id)

    response = web.StreamResponse(status=head.status, headers=headers)
    try:
        await response.prepare(request)
        frame = first
        while True:
            if frame.body:
                await response.write(frame.body)
                exchange.written(len(frame.body))
            if frame.end_of_body:
                break
            frame = await exchange.next()
            if frame.HasField("error") or frame.HasField("head"):
                logger.info(
                    "agent %s: response broken off after its head: %s",
                    agent_id,
                    frame.error.message or "a second response head",
                )
                break_off(request)
                return response
        await response.write_eof()
    except TunnelFailed as exc:
        logger.info("agent %s: response broken off after its head: %s", agent_id, exc)
        break_off(request)
    except ConnectionError:
        logger.debug("agent %s: client left during the response", agent_id)
    return response


async def _finish(call: ProxyCall, *, agent_id: str) -> None:
    """Wait for the call's status after the last body byte, so it ends instead of being cancelled.

    The response is complete by then; a failing status is only logged.
    """
    code = await call.code()
    if code is not grpc.StatusCode.OK:
        logger.info("agent %s: the call ended with %s after the whole body", agent_id, code.name)
