"""Linux inotify through ctypes: one descriptor per event loop, shared by every watch on it.

A :class:`Watcher` is the inotify instance of one event loop. Its descriptor is
non-blocking and registered with ``loop.add_reader``; each time it is readable
the watcher reads every queued event at once and calls each interested
:class:`Subscription` once, with the union of its events' masks. Many writes
between two loop iterations therefore cost one ``read(2)`` and one call per
subscriber, however many followers stand behind a subscriber.

The kernel keeps one watch (a *wd*) per watched inode and instance, whatever
the path used to reach it. Subscriptions to the same inode share its wd, whose
mask only ever grows (``IN_MASK_ADD``); the watch is removed when its last
subscription is cancelled. A watcher left without watches closes its
descriptor after :data:`IDLE_CLOSE_DELAY` seconds, in a worker thread: closing
an inotify descriptor waits for the kernel (milliseconds), and followers that
come and go must neither stall the loop nor use up the user's inotify
instances (``fs.inotify.max_user_instances``, often 128) with descriptors
still being closed.

Nothing here blocks or raises on the event loop: when inotify cannot be used
(not Linux, no such call in libc, instance or watch limits reached, a file
system that refuses watches) :func:`subscribe` answers None and the caller
polls instead.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = [
    "IDLE_CLOSE_DELAY",
    "IN_ATTRIB",
    "IN_CREATE",
    "IN_DELETE",
    "IN_DELETE_SELF",
    "IN_IGNORED",
    "IN_MODIFY",
    "IN_MOVED_FROM",
    "IN_MOVED_TO",
    "IN_MOVE_SELF",
    "IN_ONLYDIR",
    "IN_Q_OVERFLOW",
    "IN_UNMOUNT",
    "Event",
    "Subscription",
    "Watcher",
    "close_idle",
    "parse_events",
    "read_pending",
    "running_watcher",
    "subscribe",
]

logger = logging.getLogger(__name__)

# Event bits (linux/inotify.h).
IN_MODIFY: Final = 0x00000002
IN_ATTRIB: Final = 0x00000004
IN_MOVED_FROM: Final = 0x00000040
IN_MOVED_TO: Final = 0x00000080
IN_CREATE: Final = 0x00000100
IN_DELETE: Final = 0x00000200
IN_DELETE_SELF: Final = 0x00000400
IN_MOVE_SELF: Final = 0x00000800
# Sent whatever the mask: the file system went away, events were lost, the watch is gone.
IN_UNMOUNT: Final = 0x00002000
IN_Q_OVERFLOW: Final = 0x00004000
IN_IGNORED: Final = 0x00008000
# Flags of inotify_add_watch, never set in events.
IN_ONLYDIR: Final = 0x01000000
_IN_MASK_ADD: Final = 0x20000000

_ALWAYS: Final = IN_UNMOUNT | IN_Q_OVERFLOW | IN_IGNORED
_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len of the NUL-padded name
# Room for many events; one event needs at most the header plus NAME_MAX + 1.
_READ_SIZE = 64 * 1024
# Seconds an idle watcher keeps its descriptor for the next subscriber.
IDLE_CLOSE_DELAY = 10.0

Callback = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class Event:
    """One ``struct inotify_event``; ``name`` is empty for events about the watched inode."""

    wd: int
    mask: int
    cookie: int
    name: bytes


def parse_events(data: bytes) -> Iterator[Event]:
    """The events packed in ``data``, as returned by ``read(2)`` on an inotify descriptor.

    A truncated last event (which the kernel never produces) is ignored.
    """
    offset = 0
    size = len(data)
    while offset + _HEADER.size <= size:
        wd, mask, cookie, length = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        offset = start + length
        if offset > size:
            return
        yield Event(wd, mask, cookie, data[start:offset].rstrip(b"\0"))


class _Libc:
    """The three inotify calls of libc, typed; errors come back as OSError."""

    def __init__(self) -> None:
        if not sys.platform.startswith("linux"):
            raise OSError(errno.ENOSYS, "inotify exists on Linux only")
        # The process's own symbols include libc's, on glibc and musl alike.
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            self._init1 = libc.inotify_init1
            self._add_watch = libc.inotify_add_watch
            self._rm_watch = libc.inotify_rm_watch
        except AttributeError as exc:
            raise OSError(errno.ENOSYS, "libc has no inotify") from exc
        self._init1.argtypes = [ctypes.c_int]
        self._init1.restype = ctypes.c_int
        self._add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._add_watch.restype = ctypes.c_int
        self._rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        self._rm_watch.restype = ctypes.c_int

    def init1(self, flags: int) -> int:
        return self._check(self._init1(flags), "inotify_init1")

    def add_watch(self, fd: int, path: Path, mask: int) -> int:
        return self._check(self._add_watch(fd, os.fsencode(path), mask), f"watch {path}")

    def rm_watch(self, fd: int, wd: int) -> None:
        self._check(self._rm_watch(fd, wd), "inotify_rm_watch")

    @staticmethod
    def _check(result: int, what: str) -> int:
        if result < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), what)
        return result


_libc: _Libc | None = None
_libc_error: OSError | None = None


def _load_libc() -> _Libc:
    global _libc, _libc_error
    if _libc is None:
        if _libc_error is not None:
            raise _libc_error
        try:
            _libc = _Libc()
        except OSError as exc:
            _libc_error = exc
            raise
    return _libc


class Subscription:
    """Interest in the events of one watched inode; ``cancel()`` ends it (idempotent).

    ``active`` turns False when the kernel dropped the watch (the inode was
    deleted, its file system unmounted) or the watcher failed: no event will
    come any more, and the owner should look at the path itself.
    """

    __slots__ = ("_cancelled", "_watcher", "active", "callback", "mask", "name", "wd")

    def __init__(
        self, watcher: Watcher, wd: int, mask: int, callback: Callback, name: bytes | None
    ) -> None:
        self._watcher: Watcher | None = watcher
        self.wd = wd
        self.mask = mask
        self.callback = callback
        self.name = name
        self.active = True
        self._cancelled = False

    def cancel(self) -> None:
        watcher, self._watcher = self._watcher, None
        self.active = False
        self._cancelled = True
        if watcher is not None:
            watcher._release(self)


_watchers: dict[asyncio.AbstractEventLoop, Watcher] = {}
_closing: set[asyncio.Future[None]] = set()


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError as exc:
        logger.warning("cannot close inotify descriptor %s: %s", fd, exc.strerror)


def subscribe(
    path: Path, mask: int, callback: Callback, *, name: str | None = None
) -> Subscription | None:
    """Calls ``callback(mask)`` after events of ``mask`` on the inode ``path`` names now.

    The watch is made on the running loop's watcher, opened if needed.
    ``name`` restricts a directory's events about its entries to the entry of
    that name (events about the directory itself still come). ``callback``
    runs on the loop, at most once per batch of events read, with their masks
    or-ed; IN_IGNORED, IN_UNMOUNT and IN_Q_OVERFLOW (events were lost: look at
    everything again) come whatever the mask. It is never called after
    :meth:`Subscription.cancel`.

    Returns None when the path cannot be watched: inotify is unavailable, the
    path does not exist, the watch limit is reached (logged), or the file
    system refuses. Never blocks, never raises.
    """
    loop = asyncio.get_running_loop()
    watcher = _watchers.get(loop) or Watcher._open(loop)
    if watcher is None:
        return None
    return watcher._subscribe(path, mask, callback, name)


def running_watcher() -> Watcher | None:
    """The running loop's watcher if it has one open (it has while anything is watched)."""
    return _watchers.get(asyncio.get_running_loop())


async def close_idle() -> None:
    """Closes the running loop's watcher now if it has no watch, and waits until it is.

    An idle watcher otherwise keeps its descriptor :data:`IDLE_CLOSE_DELAY`
    seconds for the next subscriber; only what must see the descriptor gone
    (a test) needs this. Also closes the watchers left behind by loops that
    were closed while theirs idled.
    """
    loop = asyncio.get_running_loop()
    for other_loop, watcher in list(_watchers.items()):
        if other_loop.is_closed() or (other_loop is loop and not watcher._subscriptions):
            watcher._close()
    mine = [future for future in _closing if future.get_loop() is loop]
    if mine:
        await asyncio.gather(*mine)


def read_pending() -> None:
    """Reads and dispatches the events queued now, without waiting for the loop to do it."""
    watcher = running_watcher()
    if watcher is not None:
        watcher._on_readable()


class Watcher:
    """The inotify instance of one event loop: its descriptor and the watches on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, libc: _Libc, fd: int) -> None:
        self._loop = loop
        self._libc = libc
        self._fd: int | None = fd
        self._subscriptions: dict[int, list[Subscription]] = {}
        self._close_timer: asyncio.TimerHandle | None = None

    @classmethod
    def _open(cls, loop: asyncio.AbstractEventLoop) -> Watcher | None:
        for other_loop, watcher in list(_watchers.items()):
            if other_loop.is_closed():
                # Its loop ended while the watcher idled: nothing else would close it.
                watcher._close()
        try:
            libc = _load_libc()
            fd = libc.init1(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            logger.debug("inotify unavailable, polling instead: %s", exc)
            return None
        watcher = cls(loop, libc, fd)
        try:
            loop.add_reader(fd, watcher._on_readable)
        except NotImplementedError:
            os.close(fd)
            logger.debug("this event loop cannot watch descriptors, polling instead")
            return None
        _watchers[loop] = watcher
        return watcher

    @property
    def watch_count(self) -> int:
        """Kernel watches this watcher holds."""
        return len(self._subscriptions)

    def fileno(self) -> int | None:
        """The inotify descriptor, or None once closed."""
        return self._fd

    def _subscribe(
        self, path: Path, mask: int, callback: Callback, name: str | None
    ) -> Subscription | None:
        if self._fd is None:
            return None
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        try:
            wd = self._libc.add_watch(self._fd, path, mask | _IN_MASK_ADD)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                logger.warning(
                    "inotify watch limit reached (fs.inotify.max_user_watches); polling %s instead",
                    path,
                )
            elif exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                logger.info("cannot watch %s, polling instead: %s", path, exc.strerror)
            self._close_if_idle()
            return None
        subscription = Subscription(
            self, wd, mask, callback, None if name is None else os.fsencode(name)
        )
        self._subscriptions.setdefault(wd, []).append(subscription)
        return subscription

    def _release(self, subscription: Subscription) -> None:
        users = self._subscriptions.get(subscription.wd)
        if users is not None and subscription in users:
            users.remove(subscription)
            if not users:
                del self._subscriptions[subscription.wd]
                self._remove_watch(subscription.wd)
        self._close_if_idle()

    def _remove_watch(self, wd: int) -> None:
        if self._fd is None:
            return
        try:
            self._libc.rm_watch(self._fd, wd)
        except OSError as exc:
            # EINVAL: the kernel dropped it already and its IN_IGNORED is still queued.
            if exc.errno != errno.EINVAL:
                logger.warning("cannot remove inotify watch %s: %s", wd, exc.strerror)

    def _close_if_idle(self) -> None:
        if self._subscriptions or self._fd is None or self._close_timer is not None:
            return
        if self._loop.is_closed():
            self._close()
        else:
            self._close_timer = self._loop.call_later(IDLE_CLOSE_DELAY, self._close)

    def _close(self) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if _watchers.get(self._loop) is self:
            del _watchers[self._loop]
        if self._loop.is_closed():
            _close_quietly(fd)
            return
        self._loop.remove_reader(fd)
        # Closing an inotify descriptor that ever had a watch waits for an RCU grace
        # period in the kernel (milliseconds): that must not stall the event loop.
        try:
            closing = self._loop.run_in_executor(None, _close_quietly, fd)
        except RuntimeError:
            _close_quietly(fd)  # the loop's executor is shut down
            return
        _closing.add(closing)
        closing.add_done_callback(_closing.discard)

    def _on_readable(self) -> None:
        while self._fd is not None:
            try:
                data = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                logger.error("reading inotify events failed, watching anew: %s", exc)
                self._fail()
                return
            self._dispatch(data)

    def _dispatch(self, data: bytes) -> None:
        # Coalesced per subscription, so that a burst of writes makes one call each.
        pending: dict[Subscription, int] = {}
        overflow = False
        for event in parse_events(data):
            if event.mask & IN_Q_OVERFLOW:
                overflow = True
                continue
            users = self._subscriptions.get(event.wd)
            if not users:
                continue
            for subscription in users:
                if event.name and subscription.name is not None and event.name != subscription.name:
                    continue
                mask = event.mask & (subscription.mask | _ALWAYS)
                if mask:
                    pending[subscription] = pending.get(subscription, 0) | mask
            if event.mask & IN_IGNORED:
                # The kernel removed the watch itself: it must not be removed again.
                del self._subscriptions[event.wd]
                for subscription in users:
                    subscription.active = False
                    subscription._watcher = None

        if overflow:
            for users in self._subscriptions.values():
                for subscription in users:
                    pending[subscription] = pending.get(subscription, 0) | IN_Q_OVERFLOW
        for subscription, mask in pending.items():
            self._call(subscription, mask)
        self._close_if_idle()

    def _fail(self) -> None:
        everyone = [s for users in self._subscriptions.values() for s in users]
        self._subscriptions.clear()
        for subscription in everyone:
            subscription.active = False
            subscription._watcher = None
        self._close()
        for subscription in everyone:
            self._call(subscription, IN_Q_OVERFLOW | IN_IGNORED)

    @staticmethod
    def _call(subscription: Subscription, mask: int) -> None:
        # An earlier callback of the same batch may have cancelled it.
        if subscription._cancelled:
            return
        try:
            subscription.callback(mask)
        except Exception:
            # One broken subscriber must not keep the events from the others.
            logger.exception("inotify callback failed")
