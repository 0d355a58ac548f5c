"""In-memory object storage with one global resourceVersion and a watch history.

Like etcd behind the API server: every write gets the next resourceVersion,
is appended to a bounded history, and fans out to the watchers of its
resource. The store knows nothing about API semantics (validation,
finalizers, defaults): that is :mod:`registry`. It runs on one event loop
and is not thread-safe; the harness marshals every call onto that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final, Literal

from .resources import STORED, ResourceType
from .status import JsonObject, expired

logger = logging.getLogger(__name__)

EventType = Literal["ADDED", "MODIFIED", "DELETED"]

# A watcher that falls this far behind is dropped, as the real watch cache does.
WATCHER_QUEUE_LIMIT: Final = 10_000


@dataclass(frozen=True)
class StoredEvent:
    """One write, as watchers see it. ``obj`` is a snapshot: never mutate it."""

    type: EventType
    resource_version: int
    resource: ResourceType
    namespace: str
    obj: JsonObject
    # The object before this write (None for ADDED); watches with selectors need it.
    previous: JsonObject | None = None


@dataclass(eq=False)
class Watcher:
    """A subscription of one watch request; ``queue`` yields events, then ``None`` at close."""

    resource: ResourceType
    namespace: str | None
    queue: asyncio.Queue[StoredEvent | None] = field(
        default_factory=lambda: asyncio.Queue(WATCHER_QUEUE_LIMIT)
    )
    closed: bool = False

    def wants(self, event: StoredEvent) -> bool:
        return event.resource is self.resource and (
            self.namespace is None or event.namespace == self.namespace
        )

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(None)


Key = tuple[str, str, str, str]  # group, plural, namespace, name


class Store:
    """Objects by (resource, namespace, name); reads return deep copies."""

    def __init__(self, *, history_limit: int = 5000, first_resource_version: int = 1000) -> None:
        self._objects: dict[Key, JsonObject] = {}
        self._rv = first_resource_version
        self._history: deque[StoredEvent] = deque(maxlen=history_limit)
        # Oldest resourceVersion a watch may start from; older ones get 410 Expired.
        self._oldest_watchable = first_resource_version
        self._watchers: set[Watcher] = set()
        self._listeners: list[Callable[[StoredEvent], None]] = []

    @property
    def resource_version(self) -> int:
        return self._rv

    @staticmethod
    def _key(rt: ResourceType, namespace: str, name: str) -> Key:
        return (rt.group, rt.plural, namespace, name)

    def get(self, rt: ResourceType, namespace: str, name: str) -> JsonObject | None:
        obj = self._objects.get(self._key(rt, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def list(self, rt: ResourceType, namespace: str | None = None) -> list[JsonObject]:
        """Objects of ``rt`` (in ``namespace`` when given), sorted by namespace and name."""
        found = [
            (key, obj)
            for key, obj in self._objects.items()
            if key[0] == rt.group
            and key[1] == rt.plural
            and (namespace is None or key[2] == namespace)
        ]
        found.sort(key=lambda item: (item[0][2], item[0][3]))
        return [copy.deepcopy(obj) for _, obj in found]

    def iter_all(self) -> Iterator[tuple[ResourceType, JsonObject]]:
        """Every stored object (not copied: callers must not mutate)."""
        for key, obj in list(self._objects.items()):
            yield STORED[(key[0], key[1])], obj

    def insert(self, rt: ResourceType, obj: JsonObject) -> JsonObject:
        """Store a new object; the caller has checked it does not exist."""
        meta = obj["metadata"]
        key = self._key(rt, meta.get("namespace", ""), meta["name"])
        assert key not in self._objects, key
        return self._write(rt, key, obj, "ADDED")

    def replace(self, rt: ResourceType, obj: JsonObject) -> JsonObject:
        meta = obj["metadata"]
        key = self._key(rt, meta.get("namespace", ""), meta["name"])
        assert key in self._objects, key
        return self._write(rt, key, obj, "MODIFIED")

    def remove(self, rt: ResourceType, namespace: str, name: str) -> JsonObject:
        """Delete for good; the DELETED event carries a new resourceVersion."""
        key = self._key(rt, namespace, name)
        obj = self._objects.pop(key)
        previous = copy.deepcopy(obj)
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._emit(StoredEvent("DELETED", self._rv, rt, namespace, obj, previous))
        return copy.deepcopy(obj)

    def _write(self, rt: ResourceType, key: Key, obj: JsonObject, kind: EventType) -> JsonObject:
        previous = self._objects.get(key)
        self._rv += 1
        stored = copy.deepcopy(obj)
        stored["metadata"]["resourceVersion"] = str(self._rv)
        self._objects[key] = stored
        self._emit(StoredEvent(kind, self._rv, rt, key[2], copy.deepcopy(stored), previous))
        return copy.deepcopy(stored)

    def _emit(self, event: StoredEvent) -> None:
        if len(self._history) == self._history.maxlen:
            self._oldest_watchable = self._history[0].resource_version
        self._history.append(event)
        for watcher in list(self._watchers):
            if watcher.closed or not watcher.wants(event):
                continue
            try:
                watcher.queue.put_nowait(event)
            except asyncio.QueueFull:
                logger.warning("dropping a watcher of %s that fell behind", event.resource.plural)
                self._watchers.discard(watcher)
                watcher.closed = True
        for listener in self._listeners:
            listener(event)

    def compact(self) -> int:
        """Forget the history: watches from any earlier resourceVersion now get 410."""
        self._history.clear()
        self._oldest_watchable = self._rv
        return self._rv

    def check_watchable(self, resource_version: int) -> None:
        """Raise 410 Expired when events after ``resource_version`` are no longer kept."""
        if resource_version < self._oldest_watchable:
            raise expired(
                f"too old resource version: {resource_version} ({self._oldest_watchable})"
            )

    def subscribe(self, rt: ResourceType, namespace: str | None, *, since: int | None) -> Watcher:
        """A watcher that first gets the kept events after ``since`` (if given), then live ones.

        Raises 410 Expired when ``since`` is older than the kept history. Replay and
        registration happen without yielding to the loop, so no event is lost or doubled.
        """
        if since is not None:
            self.check_watchable(since)
        watcher = Watcher(rt, namespace)
        if since is not None:
            for event in self._history:
                if event.resource_version > since and watcher.wants(event):
                    watcher.queue.put_nowait(event)
        self._watchers.add(watcher)
        return watcher

    def unsubscribe(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)
        watcher.closed = True

    def close_watchers(self) -> None:
        for watcher in list(self._watchers):
            watcher.close()
        self._watchers.clear()

    def add_listener(self, listener: Callable[[StoredEvent], None]) -> None:
        """Call ``listener`` synchronously after every write (controllers use it to wake)."""
        self._listeners.append(listener)
