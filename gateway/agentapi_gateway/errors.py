"""The one place where failures become HTTP statuses and error bodies.

Every failure the gateway reports, whether a gRPC status from the control
plane, one of the project's own errors raised in the gateway, or a routing
miss, is first turned into an :class:`ErrorStatus` (a gRPC code plus a
message) and then rendered by :func:`error_response` or, once a stream has
begun, by :meth:`ErrorStatus.stream_record`.

Choices beyond the obvious rows of :data:`HTTP_STATUS`:

* FAILED_PRECONDITION is 409 Conflict: the request conflicts with the
  agent's current state (it failed, its volume is still being deleted).
  412 is reserved for conditional request headers, which this API has none of.
* CANCELLED is 499, the canonical mapping of ``google/rpc/code.proto``.
* RESOURCE_EXHAUSTED is 429, or 413 when the message or reason says that
  something is too large (a body, a gRPC message).
* UNAVAILABLE carries ``Retry-After``: the control plane's ``retry-after``
  trailing metadata when it sent one, else one second.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import grpc
from aiohttp import web

from agentapi_proxy import errors

HTTP_STATUS: Final[Mapping[grpc.StatusCode, int]] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

# Matches how grpc reports oversized messages ("larger than max") and our own wording.
_TOO_LARGE = re.compile(r"too large|larger than", re.IGNORECASE)
# Trailing metadata key the control plane sets on UNAVAILABLE (agentapi_proxy.status).
RETRY_AFTER_METADATA: Final = "retry-after"
DEFAULT_RETRY_AFTER_SECONDS: Final = 1.0

_PROJECT_CODES: Final[Mapping[type[errors.AgentApiError], grpc.StatusCode]] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Internal: grpc.StatusCode.INTERNAL,
}

# What a routing miss or another aiohttp HTTP error is called in an error body.
_CODES_OF_HTTP_ERRORS: Final[Mapping[int, grpc.StatusCode]] = {
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def http_status(code: grpc.StatusCode, *, detail: str = "") -> int:
    """The HTTP status for a gRPC code; ``detail`` (message and reason) refines 429 to 413."""
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and _TOO_LARGE.search(detail):
        return 413
    return HTTP_STATUS.get(code, 500)


@dataclass(frozen=True)
class ErrorStatus:
    """A failure as the gateway reports it: a gRPC code and a message a person can act on."""

    code: grpc.StatusCode
    message: str
    # Short machine-readable cause when the source gave one, e.g. "BodyTooLarge".
    reason: str = ""
    retry_after: float | None = None

    @property
    def http_status(self) -> int:
        return http_status(self.code, detail=f"{self.reason} {self.message}")

    def headers(self) -> dict[str, str]:
        """Headers that belong with the error response (``Retry-After``)."""
        if self.code is not grpc.StatusCode.UNAVAILABLE:
            return {}
        seconds = self.retry_after if self.retry_after is not None else DEFAULT_RETRY_AFTER_SECONDS
        return {"Retry-After": str(max(1, math.ceil(seconds)))}

    def body(self) -> dict[str, Any]:
        """The JSON error body of a plain (non-streaming) response."""
        return {"error": self._fields(self.http_status)}

    def stream_record(self) -> dict[str, Any]:
        """The final NDJSON line of a stream that failed after it began (gRPC code number)."""
        return {"error": self._fields(self.code.value[0])}

    def _fields(self, number: int) -> dict[str, Any]:
        fields: dict[str, Any] = {"code": number, "status": self.code.name, "message": self.message}
        if self.reason:
            fields["reason"] = self.reason
        return fields


def status_from_rpc_error(error: grpc.aio.AioRpcError) -> ErrorStatus:
    """The status of a failed call; only its code and message are used, never a traceback."""
    code = error.code()
    message = error.details() or f"the control plane answered {code.name}"
    retry_after: float | None = None
    # grpc.aio.Metadata at run time; either way iteration yields (key, value) pairs.
    pairs: Iterable[tuple[str, str | bytes]] = error.trailing_metadata() or ()  # type: ignore[assignment]
    for key, value in pairs:
        if key == RETRY_AFTER_METADATA and isinstance(value, str):
            try:
                retry_after = float(value)
            except ValueError:
                retry_after = None
    return ErrorStatus(code, message, retry_after=retry_after)


def status_from_project_error(error: errors.AgentApiError) -> ErrorStatus:
    """The status of one of the project's own errors raised inside the gateway."""
    code = grpc.StatusCode.INTERNAL
    for cls in type(error).__mro__:
        if cls in _PROJECT_CODES:
            code = _PROJECT_CODES[cls]
            break
    retry_after = error.retry_after if isinstance(error, errors.Unavailable) else None
    return ErrorStatus(code, error.message, reason=error.reason, retry_after=retry_after)


def status_from_http_exception(error: web.HTTPException, *, method: str, path: str) -> ErrorStatus:
    """The status of an aiohttp HTTP error such as a routing miss (404) or a wrong method (405)."""
    code = _CODES_OF_HTTP_ERRORS.get(error.status)
    if code is None:
        code = grpc.StatusCode.INVALID_ARGUMENT if error.status < 500 else grpc.StatusCode.INTERNAL
    if error.status == 404:
        message = f"no route matches {method} {path}"
    elif error.status == 405:
        message = f"{method} is not allowed on {path}; allowed: {error.headers.get('Allow', '')}"
    else:
        message = error.text or error.reason
    return ErrorStatus(code, message)


def error_response(status: ErrorStatus, *, http_status: int | None = None) -> web.Response:
    """A JSON error response; ``http_status`` overrides the mapped one (routing errors)."""
    number = http_status if http_status is not None else status.http_status
    body = status.body()
    body["error"]["code"] = number
    return web.json_response(body, status=number, headers=status.headers())
