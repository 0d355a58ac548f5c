"""What both traffic paths share: the request as the agent will see it, and its limits.

:mod:`agentapi_gateway.proxy` builds an :class:`AgentRequest` from the
client's request once; the gRPC path sends it as a ProxyHTTP head, the
direct path (:mod:`agentapi_gateway.direct`) sends it to the agent itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from aiohttp import web

from agentapi_proxy.v1 import agent_service_pb2 as pb

# Largest body chunk in either direction, and the largest body sent in one piece.
CHUNK_BYTES: Final = 64 * 1024
# Methods whose requests carry a body only when they say so (Content-Length).
BODYLESS_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE"})


@dataclass(frozen=True, slots=True)
class AgentRequest:
    """One request as the agent is to see it: still-encoded path, end-to-end headers."""

    agent_id: str
    method: str
    # Starts with "/"; without the query.
    path: str
    # Raw query string without "?".
    query: str
    # Already filtered for the agent (see headers.agent_request_headers); no Host.
    headers: list[tuple[str, str]]

    @property
    def has_body(self) -> bool:
        """Whether a body goes to the agent: by method, or by a declared Content-Length."""
        return self.method.upper() not in BODYLESS_METHODS or any(
            name.lower() == "content-length" for name, _ in self.headers
        )

    def head(self) -> pb.HTTPRequestHead:
        """The request as a ProxyHTTP head."""
        return pb.HTTPRequestHead(
            agent_id=self.agent_id,
            method=self.method,
            path=self.path,
            query=self.query,
            headers=[pb.HTTPHeader(name=name, value=value) for name, value in self.headers],
        )


def break_off(request: web.Request) -> None:
    """Close the client connection mid-body: the only way left to say "this failed"."""
    if request.transport is not None:
        request.transport.close()
