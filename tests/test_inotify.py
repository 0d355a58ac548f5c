"""The inotify binding: events reach their subscribers, watches and the descriptor are released.

Every wait has a generous deadline as a hang guard; nothing here asserts a speed.
Events are awaited, never slept for: "no event" is shown by a later event
arriving alone, since the kernel queues events in order.
"""

from __future__ import annotations

import asyncio
import errno
import os
import struct
import sys
from pathlib import Path

import pytest

from agentapi_proxy import inotify
from agentapi_proxy.inotify import (
    IN_CREATE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_MODIFY,
    IN_MOVED_TO,
    IN_Q_OVERFLOW,
    Event,
    parse_events,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux")

DEADLINE = 30.0


class Recorder:
    """A subscriber that keeps the masks it was called with."""

    def __init__(self) -> None:
        self.masks: list[int] = []
        self._called = asyncio.Event()

    def __call__(self, mask: int) -> None:
        self.masks.append(mask)
        self._called.set()

    async def next(self) -> int:
        async with asyncio.timeout(DEADLINE):
            while not self.masks:
                self._called.clear()
                await self._called.wait()
        return self.masks.pop(0)

    async def until(self, bits: int) -> int:
        """The or of the masks received until one with any of ``bits``."""
        seen = 0
        while not seen & bits:
            seen |= await self.next()
        return seen


def inotify_fds() -> dict[int, int]:
    """Open inotify descriptors of this process and the kernel watches on each."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") != "anon_inode:inotify":
                continue
            info = Path(f"/proc/self/fdinfo/{name}").read_text()
        except OSError:
            continue
        found[int(name)] = sum(line.startswith("inotify wd:") for line in info.splitlines())
    return found


def append(path: Path, data: bytes = b"x\n") -> None:
    with open(path, "ab") as file:
        file.write(data)


def must_subscribe(
    path: Path, mask: int, recorder: Recorder, **kwargs: str
) -> inotify.Subscription:
    subscription = inotify.subscribe(path, mask, recorder, **kwargs)
    assert subscription is not None
    return subscription


def packed(wd: int, mask: int, name: bytes = b"", *, pad: int = 0) -> bytes:
    field = name + b"\0" * pad if name or pad else b""
    return struct.pack("iIII", wd, mask, 0, len(field)) + field


class TestParse:
    def test_events_with_and_without_padded_names(self) -> None:
        data = packed(1, IN_MODIFY) + packed(2, IN_CREATE, b"current.log", pad=5)
        assert list(parse_events(data)) == [
            Event(1, IN_MODIFY, 0, b""),
            Event(2, IN_CREATE, 0, b"current.log"),
        ]

    def test_a_truncated_event_is_dropped(self) -> None:
        data = packed(1, IN_MODIFY) + packed(2, IN_CREATE, b"name", pad=4)[:-3]
        assert list(parse_events(data)) == [Event(1, IN_MODIFY, 0, b"")]


class TestEvents:
    async def test_writes_to_a_file_are_told(self, tmp_path: Path) -> None:
        path = tmp_path / "a.log"
        path.touch()
        recorder = Recorder()
        subscription = must_subscribe(path, IN_MODIFY, recorder)
        try:
            append(path)
            assert await recorder.next() & IN_MODIFY
        finally:
            subscription.cancel()

    async def test_a_burst_of_writes_makes_few_calls(self, tmp_path: Path) -> None:
        path = tmp_path / "a.log"
        path.touch()
        recorder = Recorder()
        subscription = must_subscribe(path, IN_MODIFY, recorder)
        try:
            # No await in between: all of them are queued before the loop reads any.
            for _ in range(1000):
                append(path)
            await recorder.next()
            inotify.read_pending()
            assert recorder.masks == []
        finally:
            subscription.cancel()

    async def test_a_directory_subscription_sees_only_its_entry(self, tmp_path: Path) -> None:
        recorder = Recorder()
        subscription = must_subscribe(
            tmp_path, IN_CREATE | IN_MOVED_TO, recorder, name="current.log"
        )
        try:
            (tmp_path / "other.log").touch()
            (tmp_path / "new.log").touch()
            (tmp_path / "new.log").rename(tmp_path / "current.log")
            # The other entries' events were queued first: had they been passed on,
            # they would have come before this one.
            assert await recorder.next() == IN_MOVED_TO
        finally:
            subscription.cancel()

    async def test_a_deleted_file_ends_its_subscription(self, tmp_path: Path) -> None:
        path = tmp_path / "a.log"
        path.touch()
        recorder = Recorder()
        subscription = must_subscribe(path, IN_DELETE_SELF, recorder)
        path.unlink()

        assert await recorder.until(IN_IGNORED) & IN_DELETE_SELF
        assert not subscription.active
        watcher = inotify.running_watcher()
        assert watcher is not None and watcher.watch_count == 0
        subscription.cancel()  # harmless once the kernel dropped the watch
        await inotify.close_idle()

    async def test_lost_events_are_told_to_everyone(self, tmp_path: Path) -> None:
        first, second = tmp_path / "a.log", tmp_path / "b.log"
        first.touch()
        second.touch()
        recorders = Recorder(), Recorder()
        subscriptions = [
            must_subscribe(first, IN_MODIFY, recorders[0]),
            must_subscribe(second, IN_MODIFY, recorders[1]),
        ]
        try:
            watcher = inotify.running_watcher()
            assert watcher is not None
            # An overflow cannot be provoked cheaply: hand the watcher the kernel's record.
            watcher._dispatch(packed(-1, IN_Q_OVERFLOW))
            assert [await r.next() for r in recorders] == [IN_Q_OVERFLOW, IN_Q_OVERFLOW]
        finally:
            for subscription in subscriptions:
                subscription.cancel()


class TestRelease:
    async def test_one_descriptor_shared_and_closed_after_the_last_watch(
        self, tmp_path: Path
    ) -> None:
        await inotify.close_idle()
        before = inotify_fds()
        paths = [tmp_path / f"{i}.log" for i in range(3)]
        for path in paths:
            path.touch()

        subscriptions = [must_subscribe(p, IN_MODIFY, Recorder()) for p in paths]
        # The same inode twice: one kernel watch.
        subscriptions.append(must_subscribe(paths[0], IN_MODIFY, Recorder()))
        watcher = inotify.running_watcher()
        assert watcher is not None and watcher.watch_count == 3
        fd = watcher.fileno()
        assert fd is not None
        assert inotify_fds() == {**before, fd: 3}

        # A watch shared by two goes when both are gone.
        subscriptions.pop(0).cancel()
        assert inotify_fds() == {**before, fd: 3}
        subscriptions.pop().cancel()
        assert inotify_fds() == {**before, fd: 2}
        for subscription in subscriptions:
            subscription.cancel()
            subscription.cancel()
        assert inotify_fds() == {**before, fd: 0}

        # Idle, the descriptor waits a while for the next subscriber, then closes.
        assert inotify.running_watcher() is watcher
        await inotify.close_idle()
        assert inotify.running_watcher() is None
        assert inotify_fds() == before

    async def test_the_other_subscriber_of_a_shared_watch_still_hears(self, tmp_path: Path) -> None:
        path = tmp_path / "a.log"
        path.touch()
        leaving, staying = Recorder(), Recorder()
        gone = must_subscribe(path, IN_MODIFY, leaving)
        kept = must_subscribe(path, IN_MODIFY, staying)
        try:
            gone.cancel()
            append(path)
            assert await staying.next() & IN_MODIFY
            assert leaving.masks == []
        finally:
            kept.cancel()

    async def test_many_subscribers_come_and_go(self, tmp_path: Path) -> None:
        await inotify.close_idle()
        before = inotify_fds()
        path = tmp_path / "a.log"
        path.touch()
        descriptors = set()
        for _ in range(200):
            recorder = Recorder()
            subscription = must_subscribe(path, IN_MODIFY, recorder)
            append(path)
            await recorder.next()
            descriptors.add(inotify.running_watcher())
            subscription.cancel()
            assert inotify_fds().keys() - before.keys() <= {w.fileno() for w in descriptors if w}
            assert sum(inotify_fds().values()) == sum(before.values())

        # One descriptor served them all: no churn of inotify instances.
        assert len(descriptors) == 1
        await inotify.close_idle()
        assert inotify_fds() == before

    async def test_what_cannot_be_watched_holds_nothing(self, tmp_path: Path) -> None:
        await inotify.close_idle()
        before = inotify_fds()
        assert inotify.subscribe(tmp_path / "missing", IN_MODIFY, Recorder()) is None
        await inotify.close_idle()
        assert inotify_fds() == before


class TestUnavailable:
    async def test_no_inotify_in_libc_means_none(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(inotify, "_libc", None)
        monkeypatch.setattr(inotify, "_libc_error", OSError(errno.ENOSYS, "no inotify"))
        assert inotify.subscribe(tmp_path, IN_CREATE, Recorder()) is None
        assert inotify.running_watcher() is None

    async def test_the_watch_limit_means_none(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        def no_room(self: object, fd: int, path: Path, mask: int) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        await inotify.close_idle()
        before = inotify_fds()
        monkeypatch.setattr(inotify._Libc, "add_watch", no_room)
        assert inotify.subscribe(tmp_path, IN_CREATE, Recorder()) is None
        assert "watch limit" in caplog.text
        await inotify.close_idle()
        assert inotify_fds() == before
