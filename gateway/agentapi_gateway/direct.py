"""The direct path: the gateway carries agent traffic itself once the control plane allows it.

With ``gateway.traffic_path = "direct"`` the gateway asks the control plane
(GrantAgentAccess) where an agent is, once per credential and agent, keeps
the answer until it runs out (``gateway.direct_grant_ttl_seconds`` at most),
and sends the exchange to the agent over its own pool of keep-alive
connections (:mod:`agentapi_proxy.upstream`, a strict HTTP/1.1 client made
for this one hop). Small exchanges then cost one HTTP hop instead of an HTTP
hop, a gRPC stream and a second HTTP hop.

The control plane stays the authority. A grant is the answer to the check
ProxyHTTP makes (another user's agent is NOT_FOUND), so a deleted agent or a
revoked key stops being reachable when the grant runs out; an agent that
stops answering loses its grant at once, and the fresh answer decides what
the client sees (404 for a deleted agent). Concurrent first requests share
one GrantAgentAccess call.

The rules are those of ProxyHTTP: the headers that reach the agent are the
same (end-to-end only, no credentials, ``Host`` set to the host the agent
accepts), the path checks are the control plane's (mirrored here, since the
gateway may not import the control plane; tests/test_direct_path.py holds the
two equal), and bodies stream in chunks of at most CHUNK_BYTES both ways. An
agent the gateway could reach only with the control plane's own credentials
(the Kubernetes API server's pod proxy) gets an empty grant: its traffic keeps
going through ProxyHTTP, and so does one whose address is not ``http://``.

A malformed or broken agent response is answered 503 (AgentResponseInvalid)
like ProxyHTTP answers it, before anything reached the client; after the
head, the client connection is broken off.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import grpc
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict

from agentapi_gateway.control_plane import ControlPlane
from agentapi_gateway.errors import (
    error_response,
    status_from_project_error,
    status_from_rpc_error,
)
from agentapi_gateway.exchange import CHUNK_BYTES, AgentRequest, break_off
from agentapi_gateway.handlers import STREAM_HEADERS
from agentapi_gateway.headers import client_response_headers
from agentapi_proxy import metrics
from agentapi_proxy.errors import AgentApiError, Unavailable
from agentapi_proxy.http_rules import check_headers, check_method, check_path, check_query
from agentapi_proxy.settings import GatewaySettings
from agentapi_proxy.upstream import (
    AgentResponseInvalid,
    AgentUnreachable,
    UpstreamPool,
    UpstreamResponse,
)
from agentapi_proxy.v1 import agent_service_pb2 as pb

logger = logging.getLogger(__name__)

# Grants held at most; beyond it the oldest goes first (each is a few hundred bytes).
MAX_GRANTS: Final = 10_000
GRANT_CALL_TIMEOUT_SECONDS: Final = 30.0
# Distinct request heads and agent header lists remembered as already checked or mapped.
MAX_REMEMBERED: Final = 1024
MAX_REMEMBERED_HEADER_CHARS: Final = 4096

_TO_AGENT = metrics.PROXIED_BYTES.labels("to_agent")
_FROM_AGENT = metrics.PROXIED_BYTES.labels("from_agent")


def install_direct_path(app: web.Application, settings: GatewaySettings) -> None:
    """Serve the proxy routes of ``app`` on the direct path when ``settings`` ask for it.

    Call it before the application starts. The HTTP client is opened when the
    application starts and closed when it is cleaned up; at shutdown, open
    streams are broken off like those of ProxyHTTP.
    """
    if settings.traffic_path != "direct":
        return
    ttl = settings.direct_grant_ttl_seconds

    async def context(app: web.Application) -> AsyncIterator[None]:
        direct = DirectPath(grant_ttl=ttl)
        app[DIRECT_PATH_KEY] = direct
        logger.info("agent traffic takes the direct path (grants kept %gs)", ttl)
        try:
            yield
        finally:
            await direct.close()

    async def shutdown(app: web.Application) -> None:
        direct = app.get(DIRECT_PATH_KEY)
        if direct is not None and (count := direct.break_off_streams()):
            logger.info("gateway shutdown: broke off %d open direct streams", count)

    app.cleanup_ctx.append(context)
    app.on_shutdown.append(shutdown)


def check_request(request: AgentRequest) -> None:
    """The control plane's checks of a ProxyHTTP head but the agent id's; raises InvalidArgument.

    The agent id is checked by GrantAgentAccess. The rules are shared with the
    control plane (:mod:`agentapi_proxy.http_rules`).
    """
    check_method(request.method)
    check_path(request.path)
    check_query(request.query)
    check_headers(request.headers)


class PassedRequests:
    """Requests that passed :func:`check_request`, remembered to skip checking them again.

    The checks are pure functions of the request, and most requests repeat one
    another exactly (same path, same headers), so this saves their regular
    expressions on nearly every request. Bounded: emptied when full, and large
    requests are not remembered.
    """

    def __init__(self, *, size: int = MAX_REMEMBERED) -> None:
        self._size = size
        self._keys: set[tuple[object, ...]] = set()

    def check(self, request: AgentRequest) -> None:
        """:func:`check_request`, unless this very request passed before."""
        key = (request.method, request.path, request.query, *request.headers)
        if key in self._keys:
            return
        check_request(request)
        if _small(request.headers):
            if len(self._keys) >= self._size:
                self._keys.clear()
            self._keys.add(key)


class ClientHeaderMap:
    """:func:`client_response_headers` plus X-Accel-Buffering, remembered per agent header list.

    An agent sends the same headers again and again (``Date`` changes once a
    second), so this turns the header rules into one lookup on most responses.
    The result is shared: aiohttp copies it into each response, nobody changes it.
    """

    def __init__(self, *, size: int = MAX_REMEMBERED) -> None:
        self._size = size
        self._known: dict[tuple[tuple[str, str], ...], CIMultiDict[str]] = {}

    def of(self, headers: Sequence[tuple[str, str]]) -> CIMultiDict[str]:
        key = tuple(headers)
        known = self._known.get(key)
        if known is None:
            known = client_response_headers(headers)
            known.setdefault("X-Accel-Buffering", STREAM_HEADERS["X-Accel-Buffering"])
            if _small(headers):
                if len(self._known) >= self._size:
                    self._known.clear()
                self._known[key] = known
        return known


def _small(headers: Sequence[tuple[str, str]]) -> bool:
    """Whether ``headers`` are small enough to remember (bounds the memory a peer can fill)."""
    return sum(len(name) + len(value) for name, value in headers) <= MAX_REMEMBERED_HEADER_CHARS


@dataclass(frozen=True, slots=True)
class Grant:
    """Where to send an agent's traffic, until ``expires`` (``time.monotonic()``)."""

    base_url: str
    host: str
    expires: float

    @property
    def direct(self) -> bool:
        """False: the control plane carries this agent's traffic (ProxyHTTP)."""
        return bool(self.base_url)


GrantKey = tuple[str, bytes]


class GrantCache:
    """Grants by (agent, credential), each asked for once even by concurrent requests.

    Credentials are kept only as digests. Not thread-safe; one event loop.
    """

    def __init__(self, *, ttl: float, max_grants: int = MAX_GRANTS) -> None:
        self._ttl = ttl
        self._max = max_grants
        self._grants: dict[GrantKey, Grant] = {}
        self._pending: dict[GrantKey, asyncio.Task[Grant]] = {}

    @staticmethod
    def key(agent_id: str, metadata: Iterable[tuple[str, str]]) -> GrantKey:
        digest = hashlib.blake2b(digest_size=16)
        for name, value in metadata:
            digest.update(f"{name}\0{value}\0".encode())
        return agent_id, digest.digest()

    async def get(
        self, key: GrantKey, *, metadata: tuple[tuple[str, str], ...], plane: ControlPlane
    ) -> Grant:
        """The grant for ``key``, from the cache or from the control plane.

        Raises grpc.aio.AioRpcError when the control plane refuses (the caller
        maps it like any other status).
        """
        grant = self.fresh(key)
        if grant is not None:
            return grant
        task = self._pending.get(key)
        if task is None:
            task = asyncio.create_task(self._ask(key, metadata=metadata, plane=plane))
            self._pending[key] = task
            task.add_done_callback(lambda done: self._settled(key, done))
        # One client leaving must not cancel the call the others wait for.
        return await asyncio.shield(task)

    def fresh(self, key: GrantKey) -> Grant | None:
        """The grant for ``key`` if one is held and has not run out."""
        grant = self._grants.get(key)
        return grant if grant is not None and grant.expires > time.monotonic() else None

    def drop(self, key: GrantKey) -> None:
        self._grants.pop(key, None)

    def _settled(self, key: GrantKey, task: asyncio.Task[Grant]) -> None:
        self._pending.pop(key, None)
        if not task.cancelled():
            # Retrieved here as well: every request that waited for it may have left.
            task.exception()

    async def _ask(
        self, key: GrantKey, *, metadata: tuple[tuple[str, str], ...], plane: ControlPlane
    ) -> Grant:
        reply: pb.GrantAgentAccessResponse = await plane.rpc("GrantAgentAccess")(
            pb.GrantAgentAccessRequest(agent_id=key[0]),
            metadata=metadata,
            wait_for_ready=False,
            timeout=GRANT_CALL_TIMEOUT_SECONDS,
        )
        remaining = reply.expire_time.ToNanoseconds() / 1e9 - time.time()
        # Never longer than the control plane allows, nor than our own setting; a
        # grant already expired (clocks apart) still serves the request that asked.
        grant = Grant(
            base_url=reply.base_url.rstrip("/"),
            host=reply.host,
            expires=time.monotonic() + max(0.0, min(self._ttl, remaining)),
        )
        if not grant.direct:
            logger.info("agent %s: no direct path; its traffic goes through gRPC", key[0])
        self._store(key, grant)
        return grant

    def _store(self, key: GrantKey, grant: Grant) -> None:
        self._grants.pop(key, None)
        if len(self._grants) >= self._max:
            now = time.monotonic()
            for stale in [k for k, g in self._grants.items() if g.expires <= now]:
                del self._grants[stale]
            while len(self._grants) >= self._max:
                del self._grants[next(iter(self._grants))]
        self._grants[key] = grant


class DirectPath:
    """The gateway's own HTTP client to agents, and the grants that allow its use.

    Create it inside the running event loop; close it with :meth:`close`.
    """

    def __init__(self, *, grant_ttl: float) -> None:
        self.grants = GrantCache(ttl=grant_ttl)
        # Keep-alive connections to agents; no cap on concurrent requests.
        self._pool = UpstreamPool()
        # The client connections of responses still streaming, to break off at shutdown.
        self._streams: set[asyncio.BaseTransport] = set()
        self._passed = PassedRequests()
        self._client_headers = ClientHeaderMap()

    async def close(self) -> None:
        await self._pool.close()

    def break_off_streams(self) -> int:
        """Break off every response still streaming (at shutdown); returns how many."""
        transports = list(self._streams)
        for transport in transports:
            transport.close()
        return len(transports)

    async def forward(
        self,
        request: web.Request,
        outgoing: AgentRequest,
        *,
        body: bytes | None,
        metadata: tuple[tuple[str, str], ...],
        plane: ControlPlane,
    ) -> web.StreamResponse | None:
        """Carry ``outgoing`` to the agent and its answer back; None: use ProxyHTTP instead.

        ``body`` is the whole request body when it was small enough to read
        first, else None and the body streams from the client. Failures
        before the agent's head are answered with their status; after it,
        the client connection is broken off.
        """
        agent_id = outgoing.agent_id
        key = self.grants.key(agent_id, metadata)
        try:
            self._passed.check(outgoing)
            grant = self.grants.fresh(key) or await self.grants.get(
                key, metadata=metadata, plane=plane
            )
        except AgentApiError as exc:
            return error_response(status_from_project_error(exc))
        except grpc.aio.AioRpcError as exc:
            return error_response(status_from_rpc_error(exc))
        if not grant.direct:
            return None
        # Per credential: one caller's connection never carries another's exchange.
        origin = self._pool.origin(grant.base_url, partition=key)
        if origin is None:
            # Not plain http://host:port: the control plane's own client carries it.
            logger.info(
                "agent %s: %r is not an http:// URL; using ProxyHTTP", agent_id, grant.base_url
            )
            return None

        headers = [("Host", grant.host), *outgoing.headers]
        data: bytes | AsyncIterator[bytes] | None = None
        if outgoing.has_body:
            if body is None:
                data = _client_body(request, agent_id)
            else:
                data = _count(body)
                if not any(name.lower() == "content-length" for name, _ in outgoing.headers):
                    headers.append(("Content-Length", str(len(body))))
        target = outgoing.path + "?" + outgoing.query if outgoing.query else outgoing.path
        try:
            upstream = await self._pool.request(
                origin, outgoing.method, target, headers=headers, body=data
            )
        except AgentUnreachable as exc:
            # No answer from the agent. It may be gone: what the control plane
            # says now decides the answer (NOT_FOUND once it was deleted).
            self.grants.drop(key)
            try:
                await self.grants.get(key, metadata=metadata, plane=plane)
            except grpc.aio.AioRpcError as refused:
                return error_response(status_from_rpc_error(refused))
            return _unreachable(agent_id, grant, exc)
        except AgentApiError as exc:
            return error_response(status_from_project_error(_public(agent_id, exc)))
        try:
            return await self._relay(request, upstream, agent_id=agent_id)
        except AgentApiError as exc:
            return error_response(status_from_project_error(_public(agent_id, exc)))
        finally:
            upstream.close()

    async def _relay(
        self, request: web.Request, upstream: UpstreamResponse, *, agent_id: str
    ) -> web.StreamResponse:
        """The agent's response to the client: in one write when small, else chunk by chunk.

        Raises AgentResponseInvalid only before anything was sent to the client.
        """
        headers = self._client_headers.of(upstream.headers)
        length = upstream.content_length
        if (upstream.complete and upstream.buffered <= CHUNK_BYTES) or (
            length is not None and length <= CHUNK_BYTES
        ):
            # Bounded: the whole body is at most CHUNK_BYTES.
            body = await upstream.read_all()
            _FROM_AGENT.inc(len(body))
            return web.Response(status=upstream.status, headers=headers, body=body)

        response = web.StreamResponse(status=upstream.status, headers=headers)
        transport = request.transport
        if transport is not None:
            self._streams.add(transport)
        try:
            await response.prepare(request)
            while chunk := await upstream.read_chunk(CHUNK_BYTES):
                _FROM_AGENT.inc(len(chunk))
                await response.write(chunk)
            await response.write_eof()
        except AgentResponseInvalid as exc:
            logger.info("agent %s: response broken off after its head: %s", agent_id, exc)
            break_off(request)
        except ConnectionError:
            logger.debug("agent %s: client left during the response", agent_id)
        finally:
            if transport is not None:
                self._streams.discard(transport)
        return response


DIRECT_PATH_KEY: Final = web.AppKey("direct_path", DirectPath)


def _unreachable(agent_id: str, grant: Grant, exc: Exception) -> web.Response:
    return error_response(
        status_from_project_error(
            Unavailable(
                f"agent {agent_id!r} did not answer at {grant.base_url}: {exc}; "
                "it may still be starting (see GetAgent) or have stopped",
                reason="AgentUnreachable",
            )
        )
    )


def _public(agent_id: str, exc: AgentApiError) -> AgentApiError:
    """``exc`` with the agent named, as ProxyHTTP names it for the same failure."""
    if isinstance(exc, AgentResponseInvalid):
        return Unavailable(
            f"agent {agent_id!r} sent a malformed or broken HTTP response",
            reason="AgentResponseInvalid",
        )
    return exc


def _count(body: bytes) -> bytes:
    _TO_AGENT.inc(len(body))
    return body


async def _client_body(request: web.Request, agent_id: str) -> AsyncIterator[bytes]:
    """The client's request body in chunks of at most CHUNK_BYTES, as they arrive."""
    try:
        async for chunk in request.content.iter_chunked(CHUNK_BYTES):
            _TO_AGENT.inc(len(chunk))
            yield chunk
    except (OSError, HttpProcessingError) as exc:
        logger.info("agent %s: client broke off its request body: %s", agent_id, exc)
        raise
