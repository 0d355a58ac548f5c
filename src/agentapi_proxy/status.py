"""The one place where the project's errors become gRPC statuses."""

from __future__ import annotations

import grpc

from agentapi_proxy import errors

CODES: dict[type[errors.AgentApiError], grpc.StatusCode] = {
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

RETRY_AFTER_KEY = "retry-after"


def code_for(error: errors.AgentApiError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in CODES:
            return CODES[cls]
    return grpc.StatusCode.INTERNAL


async def abort(
    context: grpc.aio.ServicerContext[object, object], error: errors.AgentApiError
) -> None:
    """End the call with the status for ``error``; never returns."""
    if isinstance(error, errors.Unavailable):
        context.set_trailing_metadata(((RETRY_AFTER_KEY, f"{error.retry_after:g}"),))
    await context.abort(code_for(error), error.message)
