"""The project's own errors.

Drivers and the core raise these (chained with ``from`` when they wrap a
library exception); the gRPC servicer maps them to status codes in one place
(:mod:`agentapi_proxy.status`). No module below the servicer imports grpc.
"""

from __future__ import annotations


class AgentApiError(Exception):
    """Base of every error a caller may see.

    ``retryable`` tells whether the same call can succeed later without the
    caller changing anything (API server unreachable: yes; RBAC denied: no).
    """

    retryable = False

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


class InvalidArgument(AgentApiError):
    """The request itself is wrong; retrying it unchanged cannot help."""


class NotFound(AgentApiError):
    """The agent (or what the request names) does not exist for this caller."""


class AlreadyExists(AgentApiError):
    """An agent with this id exists with a different spec."""


class PermissionDenied(AgentApiError):
    """The caller, or the control plane itself (e.g. RBAC), may not do this."""


class Unauthenticated(AgentApiError):
    """No valid credentials."""


class FailedPrecondition(AgentApiError):
    """The system is not in a state that allows the call (e.g. agent failed)."""


class ResourceExhausted(AgentApiError):
    """A limit is reached: port range full, body too large."""


class DeadlineExceeded(AgentApiError):
    """A wait ran out of time."""

    retryable = True


class Unavailable(AgentApiError):
    """A dependency is temporarily unreachable; retry after ``retry_after`` seconds."""

    retryable = True

    def __init__(self, message: str, *, reason: str = "", retry_after: float = 1.0) -> None:
        super().__init__(message, reason=reason)
        self.retry_after = retry_after


class Internal(AgentApiError):
    """A bug or an unexpected failure; the message never carries a traceback."""
