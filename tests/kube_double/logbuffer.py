"""Container logs of the fake kubelet: the current and the previous instance per container.

Lines a test appends before the container runs are kept and appear, with the
time they are released, once it starts: like an agent that prints at startup.
When a container exits (crash loop) its log becomes the ``previous`` one and
a follower of it reaches the end.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from .timestamps import rfc3339_nano

LogKey = tuple[str, str, str]  # namespace, pod, container


@dataclass(frozen=True)
class LogEntry:
    time_ns: int
    data: bytes


def split_lines(data: bytes) -> list[bytes]:
    """Lines with their newline kept; a trailing piece without one stays a partial line."""
    if not data:
        return []
    return data.splitlines(keepends=True)


@dataclass(eq=False)
class ContainerLog:
    """The log of one container instance; ``ended`` once the instance exits."""

    entries: list[LogEntry] = field(default_factory=list)
    ended: bool = False
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def append(self, data: bytes) -> None:
        now = time.time_ns()
        for line in split_lines(data):
            self.entries.append(LogEntry(now, line))
        self._wake()

    def end(self) -> None:
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()


@dataclass(frozen=True)
class LogQuery:
    """The pods/log query parameters that select what is returned."""

    timestamps: bool = False
    tail_lines: int | None = None
    since_ns: int | None = None
    limit_bytes: int | None = None

    def select(self, entries: list[LogEntry]) -> list[LogEntry]:
        chosen = [e for e in entries if self.since_ns is None or e.time_ns >= self.since_ns]
        if self.tail_lines is not None:
            chosen = chosen[len(chosen) - self.tail_lines :] if self.tail_lines else []
        return chosen

    def render(self, entry: LogEntry) -> bytes:
        if self.timestamps:
            return rfc3339_nano(entry.time_ns).encode() + b" " + entry.data
        return entry.data


class LogStore:
    """Logs by (namespace, pod, container); all methods run on the double's loop."""

    def __init__(self) -> None:
        self._current: dict[LogKey, ContainerLog] = {}
        self._previous: dict[LogKey, ContainerLog] = {}
        self._pending: dict[LogKey, list[bytes]] = {}

    def current(self, key: LogKey) -> ContainerLog | None:
        return self._current.get(key)

    def previous(self, key: LogKey) -> ContainerLog | None:
        return self._previous.get(key)

    def append(self, key: LogKey, data: bytes, *, previous: bool = False) -> None:
        """Append to the running instance, to the previous one, or keep until the start."""
        if previous:
            self._previous.setdefault(key, ContainerLog(ended=True)).append(data)
            return
        log = self._current.get(key)
        if log is None or log.ended:
            self._pending.setdefault(key, []).append(data)
        else:
            log.append(data)

    def start(self, key: LogKey) -> None:
        """A new instance starts: the old one becomes ``previous``; pending lines flow."""
        old = self._current.get(key)
        if old is not None:
            old.end()
            self._previous[key] = old
        log = ContainerLog()
        self._current[key] = log
        for data in self._pending.pop(key, []):
            log.append(data)

    def stop(self, key: LogKey) -> None:
        if (log := self._current.get(key)) is not None:
            log.end()

    def forget_pod(self, namespace: str, pod: str) -> None:
        """The pod is gone: end every follower and drop its logs (pending ones included)."""
        for store in (self._current, self._previous, self._pending):
            for key in [k for k in store if k[0] == namespace and k[1] == pod]:
                value = store.pop(key)
                if isinstance(value, ContainerLog):
                    value.end()

    def end_all(self) -> None:
        for log in self._current.values():
            log.end()


async def follow(log: ContainerLog, query: LogQuery) -> AsyncIterator[bytes]:
    """Yield the selected backlog, then new entries until the instance ends.

    ``limit_bytes`` counts across the whole stream; the last chunk is cut to fit.
    """
    budget = query.limit_bytes
    position = len(log.entries)
    chunks = [query.render(e) for e in query.select(log.entries)]
    while True:
        for chunk in chunks:
            if budget is not None:
                if budget <= 0:
                    return
                chunk = chunk[:budget]
                budget -= len(chunk)
            yield chunk
        if position == len(log.entries):
            if log.ended:
                return
            await log.wait_changed()
        fresh = log.entries[position:]
        position = len(log.entries)
        chunks = [query.render(e) for e in fresh]
