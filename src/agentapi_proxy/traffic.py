"""Carries one HTTP exchange from a ProxyHTTP stream, or a tunnel, to an agent's server.

Bodies flow in both directions chunk by chunk, so SSE events reach the
caller as the agent sends them and no body is held whole in memory.

Each gRPC message costs a batch of its own on both ends (a ``sendmsg`` and a
wake-up of the event loop), which is most of what a small exchange costs.
So an exchange is carried in as few messages as it allows: a request whose
body the caller had in hand arrives as one message (``end_of_body`` set), and
a response whose body is small and complete leaves as one message with its
head. Everything else streams as before.

A TunnelHTTP exchange (:mod:`agentapi_proxy.tunnel`) is relayed by the same
:meth:`TrafficRelay.exchange`, so both paths apply the same rules.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final, NamedTuple

import aiohttp
from yarl import URL

from agentapi_proxy import metrics
from agentapi_proxy.drivers.base import Driver
from agentapi_proxy.errors import AgentApiError, InvalidArgument, Unavailable
from agentapi_proxy.http_rules import (
    NOT_FORWARDED,
    check_headers,
    check_method,
    check_path,
    check_query,
    end_to_end_headers,
)
from agentapi_proxy.ids import validate_agent_id
from agentapi_proxy.model import Endpoint
from agentapi_proxy.v1 import agent_service_pb2 as pb

logger = logging.getLogger(__name__)

CHUNK_BYTES: Final = 64 * 1024
# How long an agent's endpoint is reused without asking the driver again (which, in
# provision mode, reads three objects from the API server).
ENDPOINT_TTL_SECONDS: Final = 2.0
MAX_ENDPOINTS: Final = 10_000

BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE"})

_TO_AGENT = metrics.PROXIED_BYTES.labels("to_agent")
_FROM_AGENT = metrics.PROXIED_BYTES.labels("from_agent")


class ResponsePart(NamedTuple):
    """One step of an agent's response, as :meth:`TrafficRelay.exchange` yields it."""

    # The status and end-to-end headers; set on the first part only.
    head: pb.HTTPResponseHead | None
    body: bytes
    # The body is complete with this part. A body may also end without it, when
    # the parts end.
    end_of_body: bool


def check_head(head: pb.HTTPRequestHead) -> int | None:
    """Raise InvalidArgument for a head that is not a clean HTTP request; returns its
    declared Content-Length."""
    validate_agent_id(head.agent_id)
    check_method(head.method)
    check_path(head.path)
    check_query(head.query)
    return check_headers([(h.name, h.value) for h in head.headers])


def agent_headers(head: pb.HTTPRequestHead, endpoint: Endpoint) -> list[tuple[str, str]]:
    """The headers the agent gets: the caller's end-to-end ones, then the endpoint's."""
    headers = [
        (name, value)
        for name, value in end_to_end_headers((h.name, h.value) for h in head.headers)
        if name.lower() not in NOT_FORWARDED
    ]
    headers.append(("Host", endpoint.host))
    headers.extend(endpoint.headers.items())
    return headers


class TrafficRelay:
    """Relays exchanges (ProxyHTTP calls, tunnel exchanges) to agents over one HTTP client.

    Every call is authorized anew; the agent's endpoint is remembered for
    ENDPOINT_TTL_SECONDS and forgotten as soon as the agent does not answer
    there, so a deleted or moved agent costs at most one failed request.
    """

    def __init__(self, driver: Driver) -> None:
        self._driver = driver
        self._session: aiohttp.ClientSession | None = None
        self._endpoints: dict[str, tuple[Endpoint, float]] = {}

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            # The agent's Content-Encoding is passed through untouched.
            auto_decompress=False,
            # Streams (SSE) stay open as long as both sides want them.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            # Keep-alive connections are reused, so a request to an agent costs no
            # connect; no limit on how many run at once.
            connector=aiohttp.TCPConnector(
                limit=0, limit_per_host=0, ttl_dns_cache=None, force_close=False
            ),
            # A proxy keeps no cookies: one agent's cookie must never reach another caller.
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def relay(
        self,
        requests: AsyncIterator[pb.ProxyHTTPRequest],
        *,
        authorize: Callable[[str], Awaitable[None]],
    ) -> AsyncIterator[pb.ProxyHTTPResponse]:
        """Relays one ProxyHTTP call: :meth:`exchange` with the call's messages.

        Raises InvalidArgument when the first message has no head, and what
        :meth:`exchange` raises.
        """
        first = await anext(requests, None)
        if first is None or not first.HasField("head"):
            raise InvalidArgument("the first ProxyHTTP message must carry the request head")
        async for part in self.exchange(
            first.head,
            body=first.body,
            end_of_body=first.end_of_body,
            rest=requests,
            authorize=authorize,
        ):
            yield pb.ProxyHTTPResponse(head=part.head, body=part.body, end_of_body=part.end_of_body)

    async def exchange(
        self,
        head: pb.HTTPRequestHead,
        *,
        body: bytes,
        end_of_body: bool,
        rest: AsyncIterator[pb.ProxyHTTPRequest] | None = None,
        authorize: Callable[[str], Awaitable[None]],
    ) -> AsyncIterator[ResponsePart]:
        """Yields the agent's response: its head, then its body, in as few parts as it can.

        ``body`` is the start of the request body, all of it when
        ``end_of_body`` is set; otherwise the rest follows in the messages of
        ``rest``. A response whose body is small (up to CHUNK_BYTES) and
        complete is one part with ``end_of_body`` set; any other body follows
        its head in chunks as the agent sends them, and the last part is the
        last chunk. Whoever iterates sets the pace: the agent's response is
        read only as fast as parts are taken. Raises the project's errors.
        ``authorize(agent_id)`` runs before anything is sent and raises when
        the caller may not reach that agent.
        """
        assert self._session is not None, "start() first"
        declared = check_head(head)
        await authorize(head.agent_id)
        endpoint = await self._endpoint(head.agent_id)

        headers = agent_headers(head, endpoint)
        has_body = head.method.upper() not in BODYLESS_METHODS or any(
            name.lower() == "content-length" for name, _ in headers
        )
        data: bytes | AsyncIterator[bytes] | None = None
        # A misuse of the stream found while the body is being sent; aiohttp would
        # report it as a failed connection to the agent.
        misuse: list[AgentApiError] = []
        if has_body and (end_of_body or rest is None):
            if declared is not None and declared != len(body):
                raise InvalidArgument(
                    f"the body has {len(body)} bytes, Content-Length says {declared}"
                )
            _TO_AGENT.inc(len(body))
            data = body
        elif has_body:
            assert rest is not None
            data = _body(body, rest, declared=declared, misuse=misuse)

        target = endpoint.base_url.rstrip("/") + head.path
        if head.query:
            target += "?" + head.query
        try:
            async with self._session.request(
                head.method,
                URL(target, encoded=True),
                headers=headers,
                data=data,
                allow_redirects=False,
                ssl=endpoint.ssl if endpoint.ssl is not None else True,
            ) as response:
                response_head = pb.HTTPResponseHead(
                    status=response.status,
                    headers=[
                        pb.HTTPHeader(name=name, value=value)
                        for name, value in end_to_end_headers(response.headers.items())
                    ],
                )
                content = response.content
                length = response.content_length
                complete = content.is_eof() and content.total_bytes <= CHUNK_BYTES
                if complete or (length is not None and length <= CHUNK_BYTES):
                    # Bounded: the whole body is at most CHUNK_BYTES.
                    whole = await content.read()
                    _FROM_AGENT.inc(len(whole))
                    yield ResponsePart(response_head, whole, True)
                    return
                yield ResponsePart(response_head, b"", False)
                async for chunk in content.iter_chunked(CHUNK_BYTES):
                    _FROM_AGENT.inc(len(chunk))
                    yield ResponsePart(None, chunk, False)
        except (aiohttp.ClientError, TimeoutError) as exc:
            if misuse:
                raise misuse[0] from exc
            self._endpoints.pop(head.agent_id, None)
            raise _agent_failure(head.agent_id, exc) from exc

    async def _endpoint(self, agent_id: str) -> Endpoint:
        """The driver's endpoint for the agent, reused for ENDPOINT_TTL_SECONDS."""
        now = time.monotonic()
        cached = self._endpoints.get(agent_id)
        if cached is not None and cached[1] > now:
            return cached[0]
        endpoint = await self._driver.endpoint(agent_id)
        if len(self._endpoints) >= MAX_ENDPOINTS:
            self._endpoints = {k: v for k, v in self._endpoints.items() if v[1] > now}
            if len(self._endpoints) >= MAX_ENDPOINTS:
                self._endpoints.clear()
        self._endpoints[agent_id] = (endpoint, now + ENDPOINT_TTL_SECONDS)
        return endpoint


def _agent_failure(agent_id: str, exc: BaseException) -> Unavailable:
    """The caller's view of an agent that failed to answer well (no internals in it)."""
    if isinstance(exc, aiohttp.ClientResponseError | aiohttp.ClientPayloadError):
        return Unavailable(
            f"agent {agent_id!r} sent a malformed or broken HTTP response",
            reason="AgentResponseInvalid",
        )
    cause = getattr(exc, "os_error", None) or exc
    detail = getattr(cause, "strerror", None) or type(cause).__name__
    return Unavailable(
        f"agent {agent_id!r} did not answer ({detail}); it may still be starting "
        "(see GetAgent) or have stopped",
        reason="AgentUnreachable",
    )


async def _body(
    first: bytes,
    requests: AsyncIterator[pb.ProxyHTTPRequest],
    *,
    declared: int | None,
    misuse: list[AgentApiError],
) -> AsyncIterator[bytes]:
    """The request body: ``first``, then each message's chunk up to ``end_of_body`` or the end.

    A body that does not match its declared Content-Length, or a second head,
    is recorded in ``misuse`` and stops the request: the agent would otherwise
    wait for bytes that never come, or read the next request from the rest.
    """

    def refuse(message: str) -> InvalidArgument:
        error = InvalidArgument(message)
        misuse.append(error)
        return error

    sent = 0
    if first:
        sent += len(first)
        _TO_AGENT.inc(len(first))
        yield first
    async for message in requests:
        if message.HasField("head"):
            raise refuse("only body messages may follow the request head")
        sent += len(message.body)
        if declared is not None and sent > declared:
            raise refuse(f"the body is longer than its Content-Length {declared}")
        if message.body:
            _TO_AGENT.inc(len(message.body))
            yield message.body
        if message.end_of_body:
            break
    if declared is not None and sent != declared:
        raise refuse(f"the body ended after {sent} bytes; Content-Length says {declared}")
