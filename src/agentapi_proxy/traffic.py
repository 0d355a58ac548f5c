"""Carries one HTTP exchange from a ProxyHTTP stream to an agent's server.

Bodies flow in both directions chunk by chunk, so SSE events reach the
caller as the agent sends them and no body is held whole in memory.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from urllib.parse import unquote

import aiohttp
from yarl import URL

from agentapi_proxy import metrics
from agentapi_proxy.drivers.base import Driver
from agentapi_proxy.errors import InvalidArgument, Unavailable
from agentapi_proxy.ids import validate_agent_id
from agentapi_proxy.v1 import agent_service_pb2 as pb

logger = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Set by the relay itself or meant for the gateway, never forwarded to the agent.
NOT_FORWARDED = frozenset({"host", "authorization", "x-api-key"})
BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE"})

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FORBIDDEN_IN_VALUE = re.compile(r"[\r\n\x00]")


def end_to_end_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop hop-by-hop headers and every header that ``Connection`` names."""
    headers = list(headers)
    named = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == "connection"
        for token in value.split(",")
    }
    return [
        (name, value)
        for name, value in headers
        if name.lower() not in HOP_BY_HOP and name.lower() not in named
    ]


def check_path(path: str) -> str:
    """Return ``path`` if it stays inside the agent's root, else raise InvalidArgument.

    The path is forwarded verbatim (still percent-encoded); dot-segments, in
    any encoding, are refused rather than resolved, because behind the
    Kubernetes API server's pod proxy they could climb out of the pod's URL.
    """
    if not path.startswith("/") or path.startswith("//"):
        raise InvalidArgument(f"proxied path {path[:200]!r} must start with a single '/'")
    if _FORBIDDEN_IN_VALUE.search(path) or " " in path or "#" in path or "?" in path:
        raise InvalidArgument(f"proxied path {path[:200]!r} contains characters not allowed")
    for segment in path.split("/"):
        decoded = segment
        for _ in range(3):
            decoded = unquote(decoded)
        if decoded in {".", ".."} or "/" in decoded or "\\" in decoded:
            raise InvalidArgument(
                f"proxied path {path[:200]!r} has a dot-segment or an encoded slash; "
                "send the path the agent should see"
            )
    return path


def check_head(head: pb.HTTPRequestHead) -> None:
    validate_agent_id(head.agent_id)
    if not _TOKEN.fullmatch(head.method):
        raise InvalidArgument(f"HTTP method {head.method[:40]!r} is not a valid token")
    check_path(head.path)
    if _FORBIDDEN_IN_VALUE.search(head.query) or "#" in head.query:
        raise InvalidArgument("query string contains characters not allowed")
    for header in head.headers:
        if not _TOKEN.fullmatch(header.name) or _FORBIDDEN_IN_VALUE.search(header.value):
            raise InvalidArgument(f"header {header.name[:80]!r} is not a valid HTTP header")


class TrafficRelay:
    """Relays ProxyHTTP calls to agents over one shared HTTP client."""

    def __init__(self, driver: Driver) -> None:
        self._driver = driver
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            # The agent's Content-Encoding is passed through untouched.
            auto_decompress=False,
            # Streams (SSE) stay open as long as both sides want them.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None),
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
        """Yields the response head, then body chunks. Raises the project's errors.

        ``authorize(agent_id)`` runs before anything is sent and raises when
        the caller may not reach that agent.
        """
        assert self._session is not None, "start() first"
        first = await anext(requests, None)
        if first is None or first.WhichOneof("frame") != "head":
            raise InvalidArgument("the first ProxyHTTP message must be the request head")
        head = first.head
        check_head(head)
        await authorize(head.agent_id)
        endpoint = await self._driver.endpoint(head.agent_id)

        headers = [
            (name, value)
            for name, value in end_to_end_headers((h.name, h.value) for h in head.headers)
            if name.lower() not in NOT_FORWARDED
        ]
        headers.append(("Host", endpoint.host))
        headers.extend(endpoint.headers.items())
        has_body = head.method.upper() not in BODYLESS_METHODS or any(
            name.lower() == "content-length" for name, _ in headers
        )

        target = endpoint.base_url.rstrip("/") + head.path
        if head.query:
            target += "?" + head.query
        try:
            async with self._session.request(
                head.method,
                URL(target, encoded=True),
                headers=headers,
                data=_body(requests) if has_body else None,
                allow_redirects=False,
                ssl=endpoint.ssl if endpoint.ssl is not None else True,
            ) as response:
                yield pb.ProxyHTTPResponse(
                    head=pb.HTTPResponseHead(
                        status=response.status,
                        headers=[
                            pb.HTTPHeader(name=name, value=value)
                            for name, value in end_to_end_headers(response.headers.items())
                        ],
                    )
                )
                from_agent = metrics.PROXIED_BYTES.labels("from_agent")
                async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                    from_agent.inc(len(chunk))
                    yield pb.ProxyHTTPResponse(body=chunk)
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise Unavailable(
                f"agent {head.agent_id!r} did not answer at {endpoint.base_url}: {exc}; "
                "it may still be starting (see GetAgent) or have stopped",
                reason="AgentUnreachable",
            ) from exc
        except aiohttp.ClientPayloadError as exc:
            raise Unavailable(
                f"agent {head.agent_id!r} broke off its response: {exc}",
                reason="AgentUnreachable",
            ) from exc


async def _body(requests: AsyncIterator[pb.ProxyHTTPRequest]) -> AsyncIterator[bytes]:
    to_agent = metrics.PROXIED_BYTES.labels("to_agent")
    async for message in requests:
        if message.WhichOneof("frame") != "body":
            raise InvalidArgument("only body messages may follow the request head")
        if message.body:
            to_agent.inc(len(message.body))
            yield message.body
