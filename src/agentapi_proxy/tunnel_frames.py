"""What both ends of TunnelHTTP agree on: flow-control credit and message batching.

The gateway and the control plane each send the frames queued at one moment
in one message; both must cut batches and count credit the same way.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final, Protocol, TypeVar

# Response body bytes one exchange may have sent that the gateway has not yet written.
WINDOW_BYTES: Final = 256 * 1024
# A message holds frames up to this size, or one frame if that alone is larger: no
# message is larger than a ProxyHTTP message, whatever the receiver's size limit.
BATCH_BYTES: Final = 64 * 1024
# What one end queues for the other at most before it stops reading from it (and so
# the other end's writes wait): a peer that never reads holds no more than this.
MAX_OUTBOX_BYTES: Final = 4 * 1024 * 1024
# The body a start frame may carry (the gateway sends only bodies it has whole).
MAX_START_BODY_BYTES: Final = 64 * 1024
# Loop iterations a writer waits at most for more frames before it sends.
GATHER_ROUNDS: Final = 1


class _Sized(Protocol):
    def ByteSize(self) -> int: ...


Frame = TypeVar("Frame", bound=_Sized)


def take_batch(queue: list[Frame]) -> list[Frame]:
    """Remove and return the frames at the head of ``queue`` that fit in one message."""
    if len(queue) == 1:
        return [queue.pop()]
    size = 0
    count = 0
    for frame in queue:
        size += frame.ByteSize()
        if count and size > BATCH_BYTES:
            break
        count += 1
    batch = queue[:count]
    del queue[:count]
    return batch


async def gather_more(queue: list[Any]) -> None:
    """Let the tasks that are ready queue their frames too, while they keep coming.

    A loop iteration costs far less than a message, and under load many
    exchanges become ready within a few iterations of each other.
    """
    count = -1
    for _ in range(GATHER_ROUNDS):
        if len(queue) == count:
            return
        count = len(queue)
        await asyncio.sleep(0)
