"""Handlers of the transcoded routes: unary RPCs and server-streaming RPCs.

A unary RPC answers one JSON document. A server-streaming RPC answers
``application/x-ndjson``, one ``{"result": ...}`` line per message, written
as each message arrives. Until the first message (or the control plane's
response headers) arrives, a failure still gets its real HTTP status; after
that the status line is gone, so a failure ends the stream with one
``{"error": {"code": <gRPC code>, "status": ..., "message": ...}}`` line.
A stream that ends without such a line ended normally.

A stream whose messages carry a ``bytes data`` field (StreamLogs) can also
be read as plain text, with ``Accept: text/plain`` or ``?format=text``: the
data as it comes, and a failure after the start as a last line
``error: <STATUS>: <message>``; a normal end that has a reason (the
message's ``end`` field) as a last line ``end: <reason>: <message>``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import grpc
from aiohttp import web
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from agentapi_gateway.control_plane import ControlPlane, next_message
from agentapi_gateway.errors import (
    ErrorStatus,
    error_response,
    status_from_project_error,
    status_from_rpc_error,
)
from agentapi_gateway.headers import credential_metadata
from agentapi_gateway.routes import HttpBinding
from agentapi_gateway.transcode import build_request, message_to_json
from agentapi_proxy.errors import AgentApiError, InvalidArgument, ResourceExhausted

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ControlPlaneLookup = Callable[[web.Request], ControlPlane]

NDJSON: Final = "application/x-ndjson"
TEXT: Final = "text/plain; charset=utf-8"
FORMAT_PARAMETER: Final = "format"
# Proxies in front of the gateway (nginx) must not buffer a stream either.
STREAM_HEADERS: Final = {"X-Accel-Buffering": "no", "Cache-Control": "no-cache"}


def unary_handler(
    binding: HttpBinding, *, control_plane: ControlPlaneLookup, max_body_bytes: int
) -> Handler:
    """A handler that calls ``binding``'s unary RPC and answers its response as JSON."""

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            message = await request_message(request, binding, max_body_bytes=max_body_bytes)
            metadata = credential_metadata(request.headers.items())
        except AgentApiError as exc:
            return error_response(status_from_project_error(exc))

        rpc = control_plane(request).rpc(binding.rpc_name)
        try:
            reply: Message = await rpc(message, metadata=metadata, wait_for_ready=False)
        except grpc.aio.AioRpcError as exc:
            return error_response(status_from_rpc_error(exc))
        return web.json_response(message_to_json(reply))

    return handle


def server_stream_handler(
    binding: HttpBinding, *, control_plane: ControlPlaneLookup, max_body_bytes: int
) -> Handler:
    """A handler that streams ``binding``'s server-streaming RPC as NDJSON (or text)."""
    text_capable = _has_bytes_data(binding.method.output_type) and (
        binding.method.input_type.fields_by_name.get(FORMAT_PARAMETER) is None
    )
    reserved = (FORMAT_PARAMETER,) if text_capable else ()

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            as_text = text_capable and _wants_text(request)
            message = await request_message(
                request, binding, max_body_bytes=max_body_bytes, reserved_query=reserved
            )
            metadata = credential_metadata(request.headers.items())
        except AgentApiError as exc:
            return error_response(status_from_project_error(exc))

        plane = control_plane(request)
        call = plane.rpc(binding.rpc_name)(message, metadata=metadata, wait_for_ready=False)
        with plane.streaming(call):
            try:
                # A call that ended before it began failed (or was empty): read it now,
                # while the HTTP status can still say so.
                opened = [await next_message(call)] if await _ended_at_start(call) else []
            except grpc.aio.AioRpcError as exc:
                return error_response(status_from_rpc_error(exc))

            writer = _TextWriter() if as_text else _JsonLinesWriter()
            response = web.StreamResponse(
                headers={"Content-Type": TEXT if as_text else NDJSON, **STREAM_HEADERS}
            )
            await response.prepare(request)
            try:
                reply = opened[0] if opened else await next_message(call)
                while reply is not None:
                    await response.write(writer.message(reply))
                    reply = await next_message(call)
            except grpc.aio.AioRpcError as exc:
                logger.info(
                    "%s stream for %s ended with %s after it began",
                    binding.rpc_name,
                    request.path,
                    exc.code().name,
                )
                await _write_quietly(response, writer.error(status_from_rpc_error(exc)))
            except ConnectionError:
                logger.debug("client left the %s stream for %s", binding.rpc_name, request.path)
                return response
            await _write_quietly(response, writer.close())
            await response.write_eof()
            return response

    return handle


async def request_message(
    request: web.Request,
    binding: HttpBinding,
    *,
    max_body_bytes: int,
    reserved_query: tuple[str, ...] = (),
) -> Message:
    """The RPC's request message for an HTTP request; raises InvalidArgument/ResourceExhausted."""
    body: Any = None
    if binding.body:
        body = await read_json_body(request, max_bytes=max_body_bytes)
        if body is None and binding.body == "*":
            # An empty POST means "all defaults": the design's create call has no body.
            body = {}
    message_class = GetMessageClass(binding.method.input_type)
    return build_request(
        message_class,
        path_values=binding.path.field_values(dict(request.match_info)),
        query=request.query.items(),
        body=body,
        body_field=binding.body,
        reserved_query=reserved_query,
    )


async def read_json_body(request: web.Request, *, max_bytes: int) -> Any:
    """The parsed JSON body, or None when the body is empty.

    Reads at most ``max_bytes`` + 1 bytes. Raises ResourceExhausted (HTTP
    413) for a bigger body and InvalidArgument for one that is not JSON.
    """
    too_large = ResourceExhausted(
        f"the request body is too large: at most {max_bytes} bytes of JSON are accepted",
        reason="BodyTooLarge",
    )
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large

    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        return None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidArgument(f"the request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise InvalidArgument("the request body nests JSON arrays or objects too deeply") from exc


async def _ended_at_start(call: grpc.aio.UnaryStreamCall[Message, Message]) -> bool:
    """Wait for the control plane's response headers; True if the call ended with them.

    Headers come with the first message, or earlier when the servicer sends
    them on accepting the call; a call that fails at once ends with them.
    """
    await call.initial_metadata()
    return call.done()


def _wants_text(request: web.Request) -> bool:
    requested = request.query.get(FORMAT_PARAMETER)
    if requested is not None:
        if requested not in {"text", "ndjson", "json"}:
            raise InvalidArgument(f"format={requested!r}: use text or ndjson")
        return requested == "text"
    accepted = [
        part.split(";")[0].strip().lower() for part in request.headers.get("Accept", "").split(",")
    ]
    return "text/plain" in accepted and not {NDJSON, "application/json"} & set(accepted)


def _has_bytes_data(descriptor: Descriptor) -> bool:
    field = descriptor.fields_by_name.get("data")
    return field is not None and field.type == field.TYPE_BYTES and not field.is_repeated


async def _write_quietly(response: web.StreamResponse, data: bytes) -> None:
    if not data:
        return
    try:
        await response.write(data)
    except ConnectionError:
        logger.debug("client left before the end of the stream")


class _JsonLinesWriter:
    def message(self, message: Message) -> bytes:
        return _line({"result": message_to_json(message)})

    def error(self, status: ErrorStatus) -> bytes:
        return _line(status.stream_record())

    def close(self) -> bytes:
        return b""


class _TextWriter:
    """Log data as it comes; keeps track of whether the last byte ended a line."""

    def __init__(self) -> None:
        self._at_line_start = True
        self._end = ""

    def message(self, message: Message) -> bytes:
        data: bytes = getattr(message, "data", b"")
        if data:
            self._at_line_start = data.endswith(b"\n")
        end = getattr(message, "end", None)
        if end is not None and message.HasField("end") and end.reason:
            self._end = f"end: {end.reason}: {end.message}" if end.message else f"end: {end.reason}"
        return data

    def error(self, status: ErrorStatus) -> bytes:
        self._end = ""
        return self._last_line(f"error: {status.code.name}: {status.message}")

    def close(self) -> bytes:
        return self._last_line(self._end) if self._end else b""

    def _last_line(self, text: str) -> bytes:
        prefix = b"" if self._at_line_start else b"\n"
        self._at_line_start = True
        return prefix + text.encode("utf-8", errors="replace") + b"\n"


def _line(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"
