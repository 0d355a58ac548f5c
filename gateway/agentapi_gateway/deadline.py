"""A deadline for a connection's first request head (against slowloris).

aiohttp has no timeout for reading request headers, so a client that sends
a header line every few seconds would hold its connection and a file
descriptor for ever. :class:`HeadDeadlineSite` wraps each connection's HTTP
protocol and closes the connection when no complete request head arrived
within the deadline; later requests on a kept-alive connection are covered
by aiohttp's keep-alive timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiohttp import web

logger = logging.getLogger(__name__)

_END_OF_HEAD = b"\r\n\r\n"


class _HeadDeadline(asyncio.Protocol):
    """Forwards everything to the HTTP protocol; closes a connection slow to send its head."""

    def __init__(self, inner: asyncio.Protocol, *, seconds: float) -> None:
        self._inner = inner
        self._seconds = seconds
        self._tail = b""
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_later(self._seconds, self._expire)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            # Only the last few bytes matter to find a head's end across chunks.
            seen = self._tail + data
            if _END_OF_HEAD in seen:
                self._timer.cancel()
                self._timer = None
            self._tail = seen[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def _expire(self) -> None:
        self._timer = None
        if self._transport is not None and not self._transport.is_closing():
            logger.info("closing a connection that sent no request head in %gs", self._seconds)
            self._transport.close()


class HeadDeadlineSite(web.TCPSite):
    """A TCP site whose connections must send a complete request head in time."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, seconds: float) -> None:
        super().__init__(runner, host, port)
        self._seconds = seconds

    async def start(self) -> None:
        # BaseSite.start registers the site with the runner; the server is made here.
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        factory: Callable[[], asyncio.Protocol] = lambda: _HeadDeadline(  # noqa: E731
            server(), seconds=self._seconds
        )
        self._server = await asyncio.get_running_loop().create_server(
            factory, self._host, self._port, reuse_address=True
        )
