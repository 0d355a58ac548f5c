"""The gateway's end of TunnelHTTP: many HTTP exchanges over one long-lived stream.

A gRPC message costs about as much as a whole small HTTP exchange, so the
gateway does not spend messages of its own on each exchange: it keeps one
TunnelHTTP stream per control-plane channel and sends each exchange as a
frame in it. One writer task sends every frame queued by then in one
message, and one reader task hands each frame that comes back to its
exchange; under load a message carries many exchanges each way.

Only requests whose whole body is at hand travel here; the rest, and
everything when the control plane does not know TunnelHTTP (UNIMPLEMENTED),
keep using ProxyHTTP. The stream is opened on the first such request's
credentials and reopened on demand after it breaks. Each exchange carries
its own caller's credentials and is checked on them alone.

A response body that streams is read from the agent against credit (see
:mod:`agentapi_proxy.tunnel`): :meth:`TunnelExchange.written` returns it as
the body reaches the client.

When the stream breaks, every open exchange fails with UNAVAILABLE: one
still waiting for its head is answered 503, one whose body was under way is
broken off.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Sequence
from typing import Any, Final

import grpc

from agentapi_gateway.errors import ErrorStatus, status_from_rpc_error
from agentapi_proxy.tunnel_frames import WINDOW_BYTES, gather_more, take_batch
from agentapi_proxy.v1 import agent_service_pb2 as pb

logger = logging.getLogger(__name__)

TUNNEL_METHOD: Final = "/agentapi_proxy.v1.AgentService/TunnelHTTP"
# Credit is returned in steps of this size, not per chunk, to keep frames few.
CREDIT_STEP_BYTES: Final = WINDOW_BYTES // 4
# After UNIMPLEMENTED (an older control plane), ProxyHTTP only, for this long.
UNSUPPORTED_RETRY_SECONDS: Final = 60.0
# What read() returns at the end of a stream (grpc-stubs does not declare it).
_END_OF_STREAM: Final[object] = grpc.aio.EOF  # type: ignore[attr-defined]

Metadata = Sequence[tuple[str, str]]

_CODES: Final = {code.value[0]: code for code in grpc.StatusCode}


def error_status(error: pb.TunnelError) -> ErrorStatus:
    """The status of an exchange the control plane failed, as if a ProxyHTTP call ended so."""
    try:
        code = _CODES[error.code]
    except KeyError:
        code = grpc.StatusCode.UNKNOWN
    retry_after = error.retry_after_seconds if code is grpc.StatusCode.UNAVAILABLE else None
    return ErrorStatus(code, error.message, reason=error.reason, retry_after=retry_after or None)


def _broken(code: grpc.StatusCode, details: str, *, retry_after: float | None) -> ErrorStatus:
    """How a broken stream fails its exchanges: the control plane is unreachable."""
    return ErrorStatus(
        grpc.StatusCode.UNAVAILABLE,
        f"the connection to the control plane broke ({code.name}: {details}); retry shortly",
        retry_after=retry_after,
    )


class TunnelFailed(Exception):
    """The exchange cannot go on; ``status`` says why (the stream broke)."""

    def __init__(self, status: ErrorStatus) -> None:
        super().__init__(status.message)
        self.status = status


class TunnelExchange:
    """One exchange in a tunnel, from its request to the end of its response.

    Use it from one task: :meth:`next` for each response frame, :meth:`written`
    as body bytes reach the client, :meth:`close` when done (always).
    """

    __slots__ = (
        "_failure",
        "_frames",
        "_id",
        "_loop",
        "_pending_credit",
        "_tunnel",
        "_waiter",
        "finished",
    )

    def __init__(self, tunnel: Tunnel, exchange_id: int) -> None:
        self._tunnel = tunnel
        self._id = exchange_id
        self._frames: collections.deque[pb.TunnelResponseFrame] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._failure: ErrorStatus | None = None
        self._pending_credit = 0
        # Kept: get_running_loop() costs a getpid() on every call in Python 3.11.
        self._loop = asyncio.get_running_loop()
        # The control plane ended the exchange (end of body or error); nothing more comes.
        self.finished = False

    async def next(self) -> pb.TunnelResponseFrame:
        """The next response frame; raises TunnelFailed when the stream broke first."""
        while not self._frames:
            if self._failure is not None:
                raise TunnelFailed(self._failure)
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._frames.popleft()

    def written(self, count: int) -> None:
        """``count`` more body bytes reached the client: the control plane may send more."""
        if self.finished:
            return
        self._pending_credit += count
        if self._pending_credit >= CREDIT_STEP_BYTES:
            self._tunnel.send(
                pb.TunnelRequestFrame(exchange_id=self._id, window_update=self._pending_credit)
            )
            self._pending_credit = 0

    def close(self) -> None:
        """Forget the exchange; an unfinished one is cancelled at the control plane."""
        if not self.finished and self._failure is None:
            self.finished = True
            self._tunnel.cancel(self._id)

    def _deliver(self, frame: pb.TunnelResponseFrame) -> None:
        self._frames.append(frame)
        if frame.end_of_body or frame.HasField("error"):
            self.finished = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, status: ErrorStatus) -> None:
        self._failure = status
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Tunnel:
    """One open TunnelHTTP call, its writer task and its reader task."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._outbox: list[pb.TunnelRequestFrame] = []
        self._ready = asyncio.Event()
        self._exchanges: dict[int, TunnelExchange] = {}
        self._last_id = 0
        self.broken: ErrorStatus | None = None
        self._writer = asyncio.create_task(self._write())
        self._reader = asyncio.create_task(self._read())

    def start(
        self, head: pb.HTTPRequestHead, *, body: bytes, credentials: Metadata
    ) -> TunnelExchange:
        """Send a whole request; its response comes through the returned exchange."""
        self._last_id += 1
        exchange = TunnelExchange(self, self._last_id)
        if self.broken is not None:
            exchange._fail(self.broken)
            return exchange
        self._exchanges[self._last_id] = exchange
        self.send(
            pb.TunnelRequestFrame(
                exchange_id=self._last_id,
                start=pb.TunnelExchangeStart(
                    head=head,
                    credentials=[pb.HTTPHeader(name=k, value=v) for k, v in credentials],
                    body=body,
                ),
            )
        )
        return exchange

    def send(self, frame: pb.TunnelRequestFrame) -> None:
        self._outbox.append(frame)
        self._ready.set()

    def cancel(self, exchange_id: int) -> None:
        if self._exchanges.pop(exchange_id, None) is not None and self.broken is None:
            self.send(pb.TunnelRequestFrame(exchange_id=exchange_id, cancel=True))

    async def close(self) -> None:
        """End the call and both tasks; open exchanges fail."""
        self._break(ErrorStatus(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down"))
        await asyncio.gather(self._writer, self._reader, return_exceptions=True)

    def _break(self, status: ErrorStatus) -> None:
        if self.broken is not None:
            return
        self.broken = status
        self._call.cancel()
        self._writer.cancel()
        self._reader.cancel()
        exchanges, self._exchanges = self._exchanges, {}
        for exchange in exchanges.values():
            exchange._fail(status)
        if exchanges:
            logger.info(
                "tunnel to the control plane broke with %d exchanges open: %s",
                len(exchanges),
                status.message,
            )

    async def _write(self) -> None:
        try:
            while True:
                if not self._outbox:
                    self._ready.clear()
                    await self._ready.wait()
                    await gather_more(self._outbox)
                    continue
                await self._call.write(pb.TunnelHTTPRequest(frames=take_batch(self._outbox)))
        except (grpc.RpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            # The call ended; the reader reports how.
            return

    async def _read(self) -> None:
        try:
            while True:
                message = await self._call.read()
                if message is _END_OF_STREAM:
                    code = await self._call.code()
                    self._break(_broken(code, "the control plane ended it", retry_after=None))
                    return
                for frame in message.frames:
                    exchange = self._exchanges.get(frame.exchange_id)
                    if exchange is None:
                        continue
                    exchange._deliver(frame)
                    if exchange.finished:
                        del self._exchanges[frame.exchange_id]
        except grpc.aio.AioRpcError as exc:
            retry_after = status_from_rpc_error(exc).retry_after
            self._break(_broken(exc.code(), exc.details() or "", retry_after=retry_after))


class Tunnels:
    """The tunnel of one channel: opened on demand, reopened after it breaks.

    Not thread-safe; use it inside the channel's event loop.
    """

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._open_call = channel.stream_stream(
            TUNNEL_METHOD,
            request_serializer=pb.TunnelHTTPRequest.SerializeToString,
            response_deserializer=pb.TunnelHTTPResponse.FromString,
        )
        self._tunnel: Tunnel | None = None
        self._opening: asyncio.Task[Tunnel | None] | None = None
        self._unsupported_until = 0.0
        self._closed = False

    async def get(self, credentials: Metadata) -> Tunnel | None:
        """The open tunnel, opened on ``credentials`` if there is none.

        None when there can be none now (the control plane does not know
        TunnelHTTP, refused these credentials, or is unreachable): the
        caller uses ProxyHTTP, which answers with the call's own status.
        """
        tunnel = self._tunnel
        if tunnel is not None and tunnel.broken is None:
            return tunnel
        if self._closed or time.monotonic() < self._unsupported_until:
            return None
        if self._opening is None:
            self._opening = asyncio.create_task(self._open(credentials))
            self._opening.add_done_callback(self._opened)
        return await asyncio.shield(self._opening)

    def _opened(self, task: asyncio.Task[Tunnel | None]) -> None:
        self._opening = None
        if not task.cancelled() and task.exception() is None:
            self._tunnel = task.result()

    async def _open(self, credentials: Metadata) -> Tunnel | None:
        call = self._open_call(None, metadata=credentials, wait_for_ready=False)
        try:
            # The control plane answers its (empty) initial metadata once it accepted;
            # a refusal ends the call instead.
            await call.initial_metadata()
            code = await call.code() if call.done() else None
            details = await call.details() if call.done() else ""
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
        if code is not None:
            call.cancel()
            if code is grpc.StatusCode.UNIMPLEMENTED:
                logger.info(
                    "the control plane does not know TunnelHTTP; using ProxyHTTP for %gs",
                    UNSUPPORTED_RETRY_SECONDS,
                )
                self._unsupported_until = time.monotonic() + UNSUPPORTED_RETRY_SECONDS
            else:
                logger.debug("tunnel not opened: %s %s", code.name, details)
            return None
        if self._closed:
            call.cancel()
            return None
        return Tunnel(call)

    def break_off(self) -> int:
        """Break the open tunnel, failing its exchanges (at shutdown); returns how many.

        No tunnel opens after this.
        """
        self._closed = True
        tunnel = self._tunnel
        if tunnel is None or tunnel.broken is not None:
            return 0
        count = len(tunnel._exchanges)
        tunnel._break(ErrorStatus(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down"))
        return count

    async def close(self) -> None:
        """Close the tunnel and wait for its tasks."""
        self._closed = True
        if self._opening is not None:
            self._opening.cancel()
            await asyncio.gather(self._opening, return_exceptions=True)
        if self._tunnel is not None:
            await self._tunnel.close()
