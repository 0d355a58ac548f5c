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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Final, NamedTuple, Protocol

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
from agentapi_proxy.upstream import AgentResponseInvalid, AgentUnreachable, UpstreamPool
from agentapi_proxy.v1 import agent_service_pb2 as pb

logger = logging.getLogger(__name__)

CHUNK_BYTES: Final = 64 * 1024
# How long an agent's endpoint is reused without asking the driver again (which, in
# provision mode, reads three objects from the API server).
ENDPOINT_TTL_SECONDS: Final = 2.0
MAX_ENDPOINTS: Final = 10_000
# Distinct request heads and response header lists remembered as already checked or
# filtered, and the largest one remembered (in characters).
MAX_REMEMBERED: Final = 1024
MAX_REMEMBERED_CHARS: Final = 4096

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
    """The headers the agent gets: Host (first, as HTTP clients send it), the caller's
    end-to-end ones, then the endpoint's."""
    return _with_endpoint(_forwarded((h.name, h.value) for h in head.headers), endpoint)


def _with_endpoint(
    forwarded: Iterable[tuple[str, str]], endpoint: Endpoint
) -> list[tuple[str, str]]:
    """:func:`agent_headers` from the caller's headers already filtered by :func:`_forwarded`."""
    return [("Host", endpoint.host), *forwarded, *endpoint.headers.items()]


def _forwarded(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The caller's headers that reach the agent: end-to-end ones, never credentials."""
    return [
        (name, value)
        for name, value in end_to_end_headers(headers)
        if name.lower() not in NOT_FORWARDED
    ]


class _CheckedHead(NamedTuple):
    declared: int | None
    forwarded: tuple[tuple[str, str], ...]


class _Remembered:
    """What the header rules made of heads seen before, so repeats skip them.

    The rules are pure functions of the head, and most exchanges repeat one
    another exactly (same path, same headers; an agent's ``Date`` changes once
    a second), so nearly every exchange is one lookup each way. Bounded:
    emptied when full, and large heads are not remembered.
    """

    def __init__(self) -> None:
        self._requests: dict[tuple[object, ...], _CheckedHead] = {}
        self._responses: dict[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]] = {}

    def request(self, head: pb.HTTPRequestHead) -> _CheckedHead:
        """:func:`check_head` (raises InvalidArgument) and the caller's forwarded headers."""
        headers = tuple([(h.name, h.value) for h in head.headers])
        key = (head.agent_id, head.method, head.path, head.query, headers)
        checked = self._requests.get(key)
        if checked is None:
            checked = _CheckedHead(check_head(head), tuple(_forwarded(headers)))
            if _small(headers, len(head.path) + len(head.query)):
                if len(self._requests) >= MAX_REMEMBERED:
                    self._requests.clear()
                self._requests[key] = checked
        return checked

    def response(self, headers: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
        """The end-to-end headers of an agent's response."""
        key = tuple(headers)
        kept = self._responses.get(key)
        if kept is None:
            kept = tuple(end_to_end_headers(key))
            if _small(key):
                if len(self._responses) >= MAX_REMEMBERED:
                    self._responses.clear()
                self._responses[key] = kept
        return kept


def _small(headers: tuple[tuple[str, str], ...], extra: int = 0) -> bool:
    """Whether ``headers`` are small enough to remember (bounds the memory a peer can fill)."""
    return extra + sum(len(name) + len(value) for name, value in headers) <= MAX_REMEMBERED_CHARS


class _AgentResponse(Protocol):
    """An agent's response as either HTTP client hands it over (see UpstreamResponse)."""

    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> Iterable[tuple[str, str]]: ...
    @property
    def content_length(self) -> int | None: ...
    @property
    def complete(self) -> bool: ...
    @property
    def buffered(self) -> int: ...
    async def read_all(self) -> bytes: ...
    async def read_chunk(self, limit: int) -> bytes: ...
    def close(self) -> None: ...


class _SessionResponse:
    """An aiohttp response behind the lean client's interface (:class:`_AgentResponse`)."""

    __slots__ = ("_response", "content_length", "headers", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers = response.headers.items()
        self.content_length = response.content_length

    @property
    def complete(self) -> bool:
        return self._response.content.is_eof()

    @property
    def buffered(self) -> int:
        # Meant before the first read, when all that arrived is still buffered.
        return self._response.content.total_bytes

    async def read_all(self) -> bytes:
        return await self._response.content.read()

    async def read_chunk(self, limit: int) -> bytes:
        return await self._response.content.read(limit)

    def close(self) -> None:
        # Releasing closes the connection unless the response was read to its end.
        self._response.release()


class TrafficRelay:
    """Relays exchanges (ProxyHTTP calls, tunnel exchanges) to agents over one HTTP client.

    Every call is authorized anew; the agent's endpoint is remembered for
    ENDPOINT_TTL_SECONDS and forgotten as soon as the agent does not answer
    there, so a deleted or moved agent costs at most one failed request.
    """

    def __init__(self, driver: Driver) -> None:
        self._driver = driver
        self._session: aiohttp.ClientSession | None = None
        self._pool: UpstreamPool | None = None
        self._endpoints: dict[str, tuple[Endpoint, float]] = {}
        self._remembered = _Remembered()

    async def start(self) -> None:
        self._pool = UpstreamPool()
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
        if self._pool is not None:
            await self._pool.close()
        if self._session is not None:
            await self._session.close()

    async def relay(
        self,
        requests: AsyncIterator[pb.ProxyHTTPRequest],
        *,
        authorize: Callable[[str], Awaitable[None]],
        caller: str,
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
            caller=caller,
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
        caller: str,
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
        the caller may not reach that agent. Connections to agents are never
        shared between different ``caller`` values (see UpstreamPool.origin).
        """
        declared, forwarded = self._remembered.request(head)
        await authorize(head.agent_id)
        endpoint = await self._endpoint(head.agent_id)

        headers = _with_endpoint(forwarded, endpoint)
        has_body = head.method.upper() not in BODYLESS_METHODS or any(
            name.lower() == "content-length" for name, _ in headers
        )
        data: bytes | AsyncIterator[bytes] | None = None
        # A misuse of the stream found while the body is being sent; the HTTP client
        # would report it as a failed request to the agent.
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

        target = head.path + "?" + head.query if head.query else head.path
        try:
            response = await self._send(
                endpoint, head.method, target, headers=headers, body=data, caller=caller
            )
            try:
                response_head = pb.HTTPResponseHead(
                    status=response.status,
                    headers=[
                        pb.HTTPHeader(name=name, value=value)
                        for name, value in self._remembered.response(response.headers)
                    ],
                )
                length = response.content_length
                if (response.complete and response.buffered <= CHUNK_BYTES) or (
                    length is not None and length <= CHUNK_BYTES
                ):
                    # Bounded: the whole body is at most CHUNK_BYTES.
                    whole = await response.read_all()
                    _FROM_AGENT.inc(len(whole))
                    yield ResponsePart(response_head, whole, True)
                    return
                yield ResponsePart(response_head, b"", False)
                while chunk := await response.read_chunk(CHUNK_BYTES):
                    _FROM_AGENT.inc(len(chunk))
                    yield ResponsePart(None, chunk, False)
            finally:
                # A response not read to its end (cancelled, left, failed) closes its
                # connection: it never goes back to the pool mid-response.
                response.close()
        except InvalidArgument as exc:
            # The lean client reports a request body that broke off this way.
            if misuse:
                raise misuse[0] from exc
            raise
        except (aiohttp.ClientError, TimeoutError, AgentUnreachable, AgentResponseInvalid) as exc:
            if misuse:
                raise misuse[0] from exc
            self._endpoints.pop(head.agent_id, None)
            raise _agent_failure(head.agent_id, exc) from exc

    async def _send(
        self,
        endpoint: Endpoint,
        method: str,
        target: str,
        *,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None,
        caller: str,
    ) -> _AgentResponse:
        """Send the request; returns the response once its head has arrived.

        Plain ``http://`` agents are reached over the lean keep-alive client
        (:mod:`agentapi_proxy.upstream`); any other endpoint (TLS, the API
        server's pod proxy) over aiohttp. A body in hand gets a Content-Length
        (added to ``headers``) unless it has one. Raises what those clients
        raise: aiohttp.ClientError, TimeoutError, AgentUnreachable,
        AgentResponseInvalid, InvalidArgument (a streamed body broke off).
        """
        assert self._pool is not None and self._session is not None, "start() first"
        origin = (
            self._pool.origin(endpoint.base_url, partition=caller) if endpoint.ssl is None else None
        )
        if origin is not None:
            if isinstance(body, bytes) and not any(
                name.lower() == "content-length" for name, _ in headers
            ):
                headers.append(("Content-Length", str(len(body))))
            return await self._pool.request(origin, method, target, headers=headers, body=body)
        # Shared by all callers: these connections end at a TLS server (the Kubernetes API
        # server's pod proxy), which frames each agent response itself, so an agent's
        # late bytes never reach them.
        response = await self._session.request(
            method,
            URL(endpoint.base_url.rstrip("/") + target, encoded=True),
            headers=headers,
            data=body,
            allow_redirects=False,
            ssl=endpoint.ssl if endpoint.ssl is not None else True,
        )
        return _SessionResponse(response)

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
    if isinstance(
        exc, aiohttp.ClientResponseError | aiohttp.ClientPayloadError | AgentResponseInvalid
    ):
        return Unavailable(
            f"agent {agent_id!r} sent a malformed or broken HTTP response",
            reason="AgentResponseInvalid",
        )
    cause: BaseException
    if isinstance(exc, AgentUnreachable):
        # Its own message names the agent's address; only what went wrong is passed on.
        cause = exc.__cause__ or ConnectionResetError()
    else:
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
