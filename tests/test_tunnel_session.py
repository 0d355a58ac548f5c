"""The control plane's end of TunnelHTTP in-process, against callers that misbehave.

A gateway reads what it is sent, returns credit only for what it wrote, and
never reuses an exchange id. These callers do none of that; the session must
stay within its bounds anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator

import pytest

from agentapi_proxy import errors
from agentapi_proxy.traffic import ResponsePart
from agentapi_proxy.tunnel import TunnelSession
from agentapi_proxy.tunnel_frames import MAX_OUTBOX_BYTES, MAX_START_BODY_BYTES, WINDOW_BYTES
from agentapi_proxy.v1 import agent_service_pb2 as pb

CHUNK = 64 * 1024
HEAD = pb.HTTPRequestHead(agent_id="a1", method="GET", path="/")


def start(exchange_id: int, *, body: bytes = b"") -> pb.TunnelRequestFrame:
    return pb.TunnelRequestFrame(
        exchange_id=exchange_id, start=pb.TunnelExchangeStart(head=HEAD, body=body)
    )


async def requests_then_wait(
    *messages: pb.TunnelHTTPRequest, sent: list[int] | None = None
) -> AsyncIterator[pb.TunnelHTTPRequest]:
    """The messages, then nothing more, with the stream kept open."""
    for message in messages:
        if sent is not None:
            sent.append(1)
        yield message
    await asyncio.Event().wait()


async def test_credit_never_runs_more_than_a_window_ahead() -> None:
    produced = 0

    async def endless(_: pb.TunnelExchangeStart) -> AsyncGenerator[ResponsePart, None]:
        nonlocal produced
        yield ResponsePart(pb.HTTPResponseHead(status=200), b"", False)
        while True:
            produced += CHUNK
            yield ResponsePart(None, b"x" * CHUNK, False)

    grant_everything = pb.TunnelRequestFrame(exchange_id=1, window_update=2**32 - 1)
    session = TunnelSession(endless, accepting=lambda: True)
    responses = session.serve(
        requests_then_wait(pb.TunnelHTTPRequest(frames=[start(1), grant_everything]))
    )
    # This caller reads everything it is sent, but returns no credit beyond that grant.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(1.0):
            async for _ in responses:
                pass
    await responses.aclose()
    assert produced <= 2 * WINDOW_BYTES + CHUNK


async def test_a_caller_that_never_reads_holds_a_bounded_queue() -> None:
    async def refused(_: pb.TunnelExchangeStart) -> AsyncGenerator[ResponsePart, None]:
        raise errors.Unauthenticated("an API key is required")
        yield  # pragma: no cover - makes this a generator

    flood = [
        pb.TunnelHTTPRequest(frames=[start(n) for n in range(i, i + 100)])
        for i in range(0, 100_000, 100)
    ]
    sent: list[int] = []
    session = TunnelSession(refused, accepting=lambda: True)
    responses = session.serve(requests_then_wait(*flood, sent=sent))
    first = await anext(responses)
    assert first.frames[0].error.code == 16  # UNAUTHENTICATED
    # The caller stops reading here; the session must stop reading from it too.
    await asyncio.sleep(1.0)
    queued = sum(len(frame.SerializeToString()) for frame in session._outbox)
    await responses.aclose()
    assert queued <= MAX_OUTBOX_BYTES + 100 * 1024
    assert len(sent) < len(flood)


async def test_an_exchange_id_started_twice_ends_the_tunnel() -> None:
    async def slow(_: pb.TunnelExchangeStart) -> AsyncGenerator[ResponsePart, None]:
        await asyncio.Event().wait()
        yield ResponsePart(None, b"", True)  # pragma: no cover

    session = TunnelSession(slow, accepting=lambda: True)
    responses = session.serve(requests_then_wait(pb.TunnelHTTPRequest(frames=[start(7), start(7)])))
    with pytest.raises(errors.InvalidArgument, match="exchange id 7 was started again"):
        async with asyncio.timeout(10):
            async for _ in responses:
                pass


async def test_a_start_frame_with_a_large_body_is_refused() -> None:
    ran = False

    async def runner(_: pb.TunnelExchangeStart) -> AsyncGenerator[ResponsePart, None]:
        nonlocal ran
        ran = True
        yield ResponsePart(pb.HTTPResponseHead(status=200), b"", True)

    big = start(3, body=b"x" * (MAX_START_BODY_BYTES + 1))
    session = TunnelSession(runner, accepting=lambda: True)
    responses = session.serve(requests_then_wait(pb.TunnelHTTPRequest(frames=[big])))
    async with asyncio.timeout(10):
        answer = await anext(responses)
    await responses.aclose()
    assert answer.frames[0].error.code == 3  # INVALID_ARGUMENT
    assert "ProxyHTTP" in answer.frames[0].error.message
    assert not ran
