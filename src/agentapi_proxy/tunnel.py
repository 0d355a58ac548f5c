"""The control plane's end of TunnelHTTP: many HTTP exchanges over one stream.

Each gRPC message costs a batch of its own on both ends, whatever it holds,
so the gateway carries many small exchanges in one long-lived stream and
each message holds as many frames as were ready when it was sent. One
reader loop takes the gateway's frames and starts an exchange task per
request; one writer sends every frame queued by then in one message. Under
load, frames pile up while a message is being written, so one message
carries many exchanges.

Every exchange is checked on its own credentials (the ``run`` callback
does that, as ProxyHTTP would); the stream itself grants nothing.

A response body that streams is sent against credit: up to WINDOW_BYTES
that the gateway has not yet written to its client. An exchange out of
credit stops reading from its agent until the gateway returns some, so one
slow client neither stalls the other exchanges nor fills memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Final

from agentapi_proxy import errors, status
from agentapi_proxy.traffic import ResponsePart
from agentapi_proxy.tunnel_frames import (
    MAX_OUTBOX_BYTES,
    MAX_START_BODY_BYTES,
    WINDOW_BYTES,
    gather_more,
    take_batch,
)
from agentapi_proxy.v1 import agent_service_pb2 as pb

logger = logging.getLogger(__name__)

ExchangeRunner = Callable[[pb.TunnelExchangeStart], AsyncGenerator[ResponsePart, None]]


def error_frame(exchange_id: int, exc: BaseException) -> pb.TunnelResponseFrame:
    """The frame that ends an exchange with the status a ProxyHTTP call would end with."""
    if not isinstance(exc, errors.AgentApiError):
        logger.error("tunnel exchange %d failed", exchange_id, exc_info=exc)
        exc = errors.Internal(
            f"internal error in TunnelHTTP ({type(exc).__name__}); see the control plane log"
        )
    error = pb.TunnelError(
        code=status.code_for(exc).value[0], message=exc.message, reason=exc.reason
    )
    if isinstance(exc, errors.Unavailable):
        error.retry_after_seconds = exc.retry_after
    return pb.TunnelResponseFrame(exchange_id=exchange_id, error=error)


# Exchanges of one tunnel in flight at most (each also holds a stream slot of its
# caller's); a caller starting more waits until some end.
MAX_EXCHANGES: Final = 8192


def _queued_size(frame: pb.TunnelResponseFrame) -> int:
    # The body is nearly all of a frame; the rest is counted as a flat allowance.
    return len(frame.body) + 256


class _Exchange:
    """One exchange in flight: its task and its credit."""

    __slots__ = ("credit", "refilled", "task")

    def __init__(self) -> None:
        self.credit = WINDOW_BYTES
        self.refilled: asyncio.Event | None = None
        self.task: asyncio.Task[None] | None = None

    def grant(self, count: int) -> None:
        # Never more than a window ahead, whatever the client claims it has written.
        self.credit = min(self.credit + count, WINDOW_BYTES)
        if self.refilled is not None and self.credit > 0:
            self.refilled.set()

    async def wait_for_credit(self) -> None:
        while self.credit <= 0:
            self.refilled = asyncio.Event()
            await self.refilled.wait()
        self.refilled = None


class TunnelSession:
    """Serves one TunnelHTTP stream; use :meth:`serve` once.

    ``run`` carries one exchange: it checks the exchange's credentials and
    yields its response, raising the project's errors. ``accepting()`` false
    refuses new exchanges with UNAVAILABLE (the control plane shuts down).
    """

    def __init__(self, run: ExchangeRunner, *, accepting: Callable[[], bool]) -> None:
        self._run = run
        self._accepting = accepting
        self._exchanges: dict[int, _Exchange] = {}
        self._outbox: list[pb.TunnelResponseFrame] = []
        # Roughly the bytes queued in the outbox; past MAX_OUTBOX_BYTES nothing more is
        # read from the client and no exchange queues more, until the client reads.
        self._outbox_bytes = 0
        self._room = asyncio.Event()
        self._room.set()
        self._ready = asyncio.Event()
        self._reading = True
        self._violation: errors.AgentApiError | None = None
        self._exchange_ended = asyncio.Event()

    async def serve(
        self, requests: AsyncIterator[pb.TunnelHTTPRequest]
    ) -> AsyncIterator[pb.TunnelHTTPResponse]:
        """Yields the response messages until the gateway half-closes and all is sent.

        Leaving early (the gateway cancels the call) cancels every exchange.
        """
        reader = asyncio.create_task(self._read(requests))
        try:
            while True:
                if self._violation is not None:
                    raise self._violation
                if not self._outbox:
                    if not self._reading and not self._exchanges:
                        break
                    self._ready.clear()
                    await self._ready.wait()
                    await gather_more(self._outbox)
                    continue
                batch = take_batch(self._outbox)
                self._outbox_bytes -= sum(_queued_size(frame) for frame in batch)
                if self._outbox_bytes <= MAX_OUTBOX_BYTES:
                    self._room.set()
                yield pb.TunnelHTTPResponse(frames=batch)
            await reader
        finally:
            reader.cancel()
            tasks = [ex.task for ex in self._exchanges.values() if ex.task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(reader, *tasks, return_exceptions=True)

    def _send(self, frame: pb.TunnelResponseFrame) -> None:
        self._outbox.append(frame)
        self._outbox_bytes += _queued_size(frame)
        if self._outbox_bytes > MAX_OUTBOX_BYTES:
            self._room.clear()
        self._ready.set()

    async def _read(self, requests: AsyncIterator[pb.TunnelHTTPRequest]) -> None:
        try:
            async for message in requests:
                await self._room.wait()
                for frame in message.frames:
                    kind = frame.WhichOneof("kind")
                    exchange = self._exchanges.get(frame.exchange_id)
                    if kind == "start" and exchange is None:
                        while len(self._exchanges) >= MAX_EXCHANGES:
                            self._exchange_ended.clear()
                            await self._exchange_ended.wait()
                    if kind == "start":
                        self._start(frame.exchange_id, frame.start, running=exchange)
                    elif exchange is None:
                        # The exchange ended already; its client's news came too late.
                        continue
                    elif kind == "window_update":
                        exchange.grant(frame.window_update)
                    elif kind == "cancel" and exchange.task is not None:
                        exchange.task.cancel()
        finally:
            self._reading = False
            self._ready.set()

    def _start(
        self, exchange_id: int, start: pb.TunnelExchangeStart, *, running: _Exchange | None
    ) -> None:
        if running is not None:
            # An answer under this id would end the running exchange for the client too.
            self._violation = errors.InvalidArgument(
                f"exchange id {exchange_id} was started again while it runs; "
                "each exchange of a tunnel needs an id of its own"
            )
            self._ready.set()
            return
        if len(start.body) > MAX_START_BODY_BYTES:
            self._send(
                error_frame(
                    exchange_id,
                    errors.InvalidArgument(
                        f"a tunnel exchange carries at most {MAX_START_BODY_BYTES} bytes of "
                        f"body, this one {len(start.body)}; send larger bodies with ProxyHTTP"
                    ),
                )
            )
            return
        if not self._accepting():
            self._send(
                error_frame(
                    exchange_id,
                    errors.Unavailable("the control plane is shutting down; retry shortly"),
                )
            )
            return
        exchange = _Exchange()
        self._exchanges[exchange_id] = exchange
        exchange.task = asyncio.create_task(self._carry(exchange_id, start, exchange))

    async def _carry(
        self, exchange_id: int, start: pb.TunnelExchangeStart, exchange: _Exchange
    ) -> None:
        """Relay one exchange, frame by frame, within its credit."""
        ended = False
        try:
            # Closed at once when the exchange is cancelled, which ends the agent request.
            async with contextlib.aclosing(self._run(start)) as parts:
                async for part in parts:
                    await self._room.wait()
                    self._send(
                        pb.TunnelResponseFrame(
                            exchange_id=exchange_id,
                            head=part.head,
                            body=part.body,
                            end_of_body=part.end_of_body,
                        )
                    )
                    if part.end_of_body:
                        # Not break: the runner ends by itself right after, and so counts an OK.
                        ended = True
                    elif part.body:
                        exchange.credit -= len(part.body)
                        if exchange.credit <= 0:
                            await exchange.wait_for_credit()
            if not ended:
                self._send(pb.TunnelResponseFrame(exchange_id=exchange_id, end_of_body=True))
        except asyncio.CancelledError:
            # The client went away or the stream ended: nobody is left to tell.
            raise
        except Exception as exc:
            self._send(error_frame(exchange_id, exc))
        finally:
            with contextlib.suppress(KeyError):
                del self._exchanges[exchange_id]
            self._exchange_ended.set()
            self._ready.set()
