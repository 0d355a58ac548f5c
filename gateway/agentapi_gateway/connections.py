"""What a connection to the gateway must do to be served: arrive while there is room,
and send each request head in time.

aiohttp has no timeout for reading request headers, so a client that sends
a header line every few seconds would hold its connection and a file
descriptor for ever (slowloris). Nor does it bound how many connections it
holds: one client opening thousands would use up the descriptors every
other client and every agent connection needs. :class:`GatewaySite` wraps
each connection's HTTP protocol to enforce both.

The first head must be complete within the deadline of the connection's
start; every later head within the deadline of its own first byte, so an
idle kept-alive connection and a long response (SSE) cost nothing. To find
where the next head starts, the request framing is followed just far enough:
``Content-Length`` and chunked bodies are skipped by counting; after a head
whose body cannot be followed that way (another Transfer-Encoding, a
malformed length) the connection is no longer timed (it is still counted).
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from collections import Counter
from collections.abc import Callable
from typing import Final

from aiohttp import web

logger = logging.getLogger(__name__)

_END_OF_HEAD = b"\r\n\r\n"
# Past this a head is not followed further (aiohttp's own limits are far lower).
_MAX_FOLLOWED_HEAD = 256 * 1024
_MAX_CHUNK_LINE = 8 * 1024
# Descriptors kept free of client connections: the control-plane channel, log
# files, and on the direct path one connection to an agent per proxied request.
_RESERVED_DESCRIPTORS: Final = 256
# How long a refused connection is kept to drain the client's request (see _Guarded).
REFUSAL_LINGER_SECONDS: Final = 1.0


def connection_limit(configured: int) -> int:
    """``configured``, or with 0 what the process's descriptor limit leaves room for.

    Every client connection may need a second descriptor (the agent's, on the
    direct path), so half of what is left after the reserve.
    """
    if configured > 0:
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(16, (soft - _RESERVED_DESCRIPTORS) // 2)


class ConnectionLimits:
    """Counts open connections, in all and by client address, and refuses past the limits.

    ``per_client`` 0 means no limit per client (behind a load balancer every
    client has the balancer's address).
    """

    def __init__(self, *, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self.open = 0
        self._by_client: Counter[str] = Counter()

    def admit(self, client: str) -> bytes | None:
        """Count the connection in; or return the response that refuses it, uncounted."""
        if self.open >= self.total:
            return _refusal(
                503,
                "UNAVAILABLE",
                f"the gateway holds its maximum of {self.total} connections; retry shortly",
            )
        if self.per_client and self._by_client[client] >= self.per_client:
            return _refusal(
                429,
                "RESOURCE_EXHAUSTED",
                f"{client} already has {self.per_client} connections open to the gateway "
                "(gateway.max_connections_per_client); reuse them (keep-alive) or close some",
            )
        self.open += 1
        self._by_client[client] += 1
        return None

    def release(self, client: str) -> None:
        self.open -= 1
        self._by_client[client] -= 1
        if not self._by_client[client]:
            del self._by_client[client]


def _refusal(status: int, code_name: str, message: str) -> bytes:
    body = json.dumps({"error": {"code": status, "status": code_name, "message": message}})
    reason = {429: "Too Many Requests", 503: "Service Unavailable"}[status]
    return (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n\r\n"
        f"{body}"
    ).encode()


_CHUNKED: Final = -1


def _declared_body(head: bytes) -> int | None:
    """The body a request head declares: its length (0 without one), _CHUNKED, or None
    when its end cannot be found by following the framing."""
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        value = value.strip()
        if name == b"transfer-encoding":
            return _CHUNKED if value.lower() == b"chunked" else None
        if name == b"content-length":
            if not value.isdigit():
                return None
            length = int(value)
    return length


class _Guarded(asyncio.Protocol):
    """Forwards everything to the HTTP protocol once the connection is admitted;
    closes a connection slow to send its head."""

    def __init__(
        self,
        make_inner: Callable[[], asyncio.Protocol],
        *,
        seconds: float,
        limits: ConnectionLimits,
    ) -> None:
        self._make_inner = make_inner
        self._inner: asyncio.Protocol | None = None
        self._seconds = seconds
        self._limits = limits
        self._client = ""
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.BaseTransport | None = None
        # The request framing as far as it is followed (see the module docstring).
        self._timing = True
        self._head = bytearray()
        self._body_left = 0
        self._in_chunks = False
        self._in_trailer = False
        self._line = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self._client = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        refusal = self._limits.admit(self._client)
        if refusal is not None:
            logger.info("refusing a connection from %s: too many connections", self._client)
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(refusal)
            # Closing now, with the client's request still arriving, would answer it with
            # a reset that can destroy the refusal before the client reads it. So the
            # request is read and dropped until the client closes, for a moment at most.
            if transport.can_write_eof():
                transport.write_eof()
            asyncio.get_running_loop().call_later(REFUSAL_LINGER_SECONDS, transport.close)
            return
        self._timer = asyncio.get_running_loop().call_later(self._seconds, self._expire)
        self._inner = self._make_inner()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if self._timing:
            self._follow(data)
        self._inner.data_received(data)

    def _follow(self, data: bytes) -> None:
        """Time the request heads in ``data``, skipping the bodies between them."""
        while data and self._timing:
            if self._body_left:
                taken = min(self._body_left, len(data))
                self._body_left -= taken
                data = data[taken:]
                continue
            if self._in_chunks:
                data = self._follow_chunk_line(data)
                continue
            if not self._head:
                # Empty lines before a request line are skipped by HTTP parsers (RFC 9112
                # 2.2), so they neither count as a head nor start one.
                data = data.lstrip(b"\r\n")
                if not data:
                    return
                if self._timer is None:
                    self._timer = asyncio.get_running_loop().call_later(self._seconds, self._expire)
            searched = max(0, len(self._head) - 3)
            self._head += data
            end = self._head.find(_END_OF_HEAD, searched)
            if end < 0:
                if len(self._head) > _MAX_FOLLOWED_HEAD:
                    # aiohttp refuses such a head itself; nothing more to time.
                    self._stop_timing()
                return
            head = bytes(self._head[:end])
            data = bytes(self._head[end + len(_END_OF_HEAD) :])
            self._head.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            body = _declared_body(head)
            if body is None:
                self._stop_timing()
                return
            if body == _CHUNKED:
                self._in_chunks = True
            else:
                self._body_left = body

    def _follow_chunk_line(self, data: bytes) -> bytes:
        """Read one chunk-size or trailer line of a chunked body; returns the rest of ``data``.

        A chunk's data and its CRLF are skipped by counting; the body ends with
        the empty line after the last chunk and its trailers.
        """
        end = data.find(b"\n")
        if end < 0:
            self._line += data
            if len(self._line) > _MAX_CHUNK_LINE:
                self._stop_timing()
            return b""
        line = bytes(self._line + data[:end]).rstrip(b"\r")
        self._line.clear()
        rest = data[end + 1 :]
        if self._in_trailer:
            if not line:
                self._in_chunks = self._in_trailer = False
            return rest
        size = line.split(b";", 1)[0].strip()
        if not size or size.strip(b"0123456789abcdefABCDEF") or len(size) > 16:
            # Malformed: aiohttp refuses the request; nothing more to time.
            self._stop_timing()
            return b""
        if int(size, 16) == 0:
            self._in_trailer = True
        else:
            self._body_left = int(size, 16) + len(b"\r\n")
        return rest

    def _stop_timing(self) -> None:
        self._timing = False
        self._head.clear()
        self._line.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def eof_received(self) -> bool | None:
        if self._inner is None:
            # A refused client is done sending: nothing is left to wait for.
            return False
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._inner is not None:
            self._limits.release(self._client)
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def _expire(self) -> None:
        self._timer = None
        if self._transport is not None and not self._transport.is_closing():
            logger.info("closing a connection that sent no request head in %gs", self._seconds)
            self._transport.close()


class GatewaySite(web.TCPSite):
    """A TCP site with bounded connections that must send a complete request head in time."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        head_seconds: float,
        limits: ConnectionLimits,
    ) -> None:
        super().__init__(runner, host, port)
        self._head_seconds = head_seconds
        self.limits = limits

    async def start(self) -> None:
        # BaseSite.start registers the site with the runner; the server is made here.
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        factory: Callable[[], asyncio.Protocol] = lambda: _Guarded(  # noqa: E731
            server, seconds=self._head_seconds, limits=self.limits
        )
        self._server = await asyncio.get_running_loop().create_server(
            factory, self._host, self._port, reuse_address=True
        )
