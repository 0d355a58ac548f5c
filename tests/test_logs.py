"""The log reader: the options of ``kubectl logs`` over CRI log files.

Most files are written by the tests record by record, so each case is exact;
the last group reads what the real shim writes while it writes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from agentapi_proxy import inotify, logs, shim
from agentapi_proxy.errors import InvalidArgument
from agentapi_proxy.logs import (
    LogRecord,
    format_timestamp,
    parse_record,
    parse_timestamp,
    read_log,
    tail_text,
)
from agentapi_proxy.model import LogOptions
from tests.harness import group_members

# Hang guard for every wait; never an expectation about speed.
DEADLINE = 30.0
BASE_NS = 1_796_400_000 * 10**9  # 2026-12-04T16:00:00Z


def stamp(second: float) -> str:
    return format_timestamp(BASE_NS + round(second * 10**9))


def record(second: float, stream: str, tag: str, content: bytes | str) -> bytes:
    data = content.encode() if isinstance(content, str) else content
    return f"{stamp(second)} {stream} {tag} ".encode() + data + b"\n"


def append(path: Path, *lines: bytes) -> None:
    with open(path, "ab") as log:
        log.write(b"".join(lines))


def lines_file(path: Path, count: int, *, width: int = 0) -> list[bytes]:
    """Writes ``count`` stdout lines ``line-N`` (padded to ``width``); returns the output lines."""
    out = [f"line-{i}".ljust(width, ".").encode() for i in range(count)]
    append(path, *(record(i / 1000, "stdout", "F", line) for i, line in enumerate(out)))
    return [line + b"\n" for line in out]


async def read_all(path: Path, options: LogOptions | None = None, **kwargs: object) -> bytes:
    chunks = [c async for c in read_log(path, options or LogOptions(), **kwargs)]  # type: ignore[arg-type]
    return b"".join(chunks)


def rotate(path: Path) -> None:
    """What the control plane does when it restarts an agent."""
    path.rename(path.with_name("previous.log"))


def file_size(path: Path) -> int:
    return path.stat().st_size


class Follower:
    """Reads a followed log in a task, collecting what arrives."""

    def __init__(
        self,
        path: Path,
        options: LogOptions,
        *,
        stopped: asyncio.Event | None = None,
        **kwargs: object,
    ) -> None:
        self.stopped = stopped or asyncio.Event()
        self.data = bytearray()
        self.chunks: list[bytes] = []
        self._changed = asyncio.Event()
        self._iterator = read_log(path, options, stopped=self.stopped, **kwargs)  # type: ignore[arg-type]
        self.task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        try:
            async for chunk in self._iterator:
                self.chunks.append(chunk)
                self.data += chunk
                self._changed.set()
        finally:
            self._changed.set()

    async def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        async with asyncio.timeout(DEADLINE):
            while not condition() and not self.task.done():
                self._changed.clear()
                await self._changed.wait()
        assert condition(), f"the stream ended before {what}"

    async def has(self, text: bytes) -> None:
        await self.wait_until(lambda: text in self.data, f"{text!r} arrived")

    async def stop(self) -> bytes:
        self.stopped.set()
        async with asyncio.timeout(DEADLINE):
            await self.task
        return bytes(self.data)


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "current.log"


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


def no_inotify(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inotify, "_libc", None)
    monkeypatch.setattr(inotify, "_libc_error", OSError(errno.ENOSYS, "no inotify"))


def watch_limit_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_room(self: object, fd: int, path: Path, mask: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(inotify._Libc, "add_watch", no_room)


def events_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Polls so seldom that whatever a follower gets came by an event."""
    monkeypatch.setattr(logs, "POLL_INTERVAL", 3600.0)
    monkeypatch.setattr(logs, "SAFETY_POLL_INTERVAL", 3600.0)


@pytest.fixture(params=["inotify", "no inotify", "watch limit"])
def watch_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Following works the same with events and with each reason to poll instead."""
    mode: str = request.param
    if mode == "no inotify":
        no_inotify(monkeypatch)
    elif mode == "watch limit":
        watch_limit_reached(monkeypatch)
    return mode


class TestRecordFormat:
    def test_parse_record(self) -> None:
        line = record(1.5, "stderr", "P", "a b  c")
        assert parse_record(line) == LogRecord(stamp(1.5), "stderr", True, b"a b  c")
        assert parse_record(line).time_ns == BASE_NS + 1_500_000_000
        assert parse_record(b"2026-12-04T16:00:00Z stdout F").content == b""
        assert parse_record(b"2026-12-04T16:00:00Z stdout F:x y").partial is False

    @pytest.mark.parametrize(
        "line",
        [
            b"",
            b"garbage",
            b"2026-12-04T16:00:00Z stdin F x",
            b"2026-12-04T16:00:00Z stdout X x",
            b"yesterday stdout F x",
            b"2026-13-04T16:00:00Z stdout F x",
        ],
    )
    def test_malformed_records_are_rejected(self, line: bytes) -> None:
        with pytest.raises(InvalidArgument):
            parse_record(line)

    def test_timestamps(self) -> None:
        assert format_timestamp(BASE_NS + 5) == "2026-12-04T16:00:00.000000005Z"
        assert parse_timestamp("2026-12-04T16:00:00.000000005Z") == BASE_NS + 5
        assert parse_timestamp(b"2026-12-04T16:00:00.5Z") == BASE_NS + 500_000_000
        assert parse_timestamp("2026-12-04T17:30:00+01:30") == BASE_NS
        assert parse_timestamp("2026-12-04T16:00:00Z") == BASE_NS
        expected = datetime(2026, 12, 4, 16, tzinfo=UTC).timestamp()
        assert parse_timestamp("2026-12-04T16:00:00Z") == expected * 10**9


class TestWholeLog:
    async def test_streams_interleave_in_file_order_and_partials_join(self, log_path: Path) -> None:
        append(
            log_path,
            record(0, "stdout", "F", "out 1"),
            record(1, "stderr", "F", "err 1"),
            record(2, "stdout", "P", "long "),
            record(2, "stdout", "P", "line "),
            record(3, "stdout", "F", "ends"),
            record(4, "stderr", "F", ""),
            record(5, "stdout", "F", "out 2"),
        )
        assert await read_all(log_path) == b"out 1\nerr 1\nlong line ends\n\nout 2\n"

    async def test_a_line_interrupted_by_the_other_stream_is_shown_broken(
        self, log_path: Path
    ) -> None:
        append(
            log_path,
            record(0, "stdout", "P", "aaa"),
            record(1, "stderr", "F", "err"),
            record(2, "stdout", "F", "bbb"),
        )
        assert await read_all(log_path) == b"aaa\nerr\nbbb\n"

    async def test_an_unfinished_line_ends_the_output_without_newline(self, log_path: Path) -> None:
        append(log_path, record(0, "stdout", "F", "done"), record(1, "stdout", "P", "half"))
        # A record still being written (no newline yet) is not shown.
        append(log_path, f"{stamp(2)} stdout F unfinis".encode())
        assert await read_all(log_path) == b"done\nhalf"

    async def test_missing_file_gives_nothing(self, log_path: Path) -> None:
        assert await read_all(log_path) == b""

    async def test_malformed_records_are_skipped(self, log_path: Path) -> None:
        append(
            log_path,
            record(0, "stdout", "F", "before"),
            b"not a record\n",
            b"x" * (logs.MAX_RECORD_LINE + 10) + b"\n",
            record(1, "stdout", "F", "after"),
        )
        assert await read_all(log_path) == b"before\nafter\n"
        assert tail_text(log_path, 2) == "before\nafter\n"

    async def test_bad_arguments(self, log_path: Path) -> None:
        with pytest.raises(InvalidArgument):
            await read_all(log_path, chunk_bytes=0)
        with pytest.raises(InvalidArgument):
            await read_all(log_path, LogOptions(limit_bytes=-1))


class TestOptions:
    async def test_timestamps_prefix_each_line_with_its_first_record_time(
        self, log_path: Path
    ) -> None:
        append(
            log_path,
            record(0, "stdout", "F", "one"),
            record(1, "stderr", "P", "two "),
            record(2, "stderr", "F", "parts"),
        )
        got = await read_all(log_path, LogOptions(timestamps=True))
        assert got == f"{stamp(0)} one\n{stamp(1)} two parts\n".encode()

    async def test_since_time_keeps_lines_at_or_after_it(self, log_path: Path) -> None:
        append(
            log_path,
            record(0, "stdout", "F", "old"),
            record(1, "stdout", "P", "started before "),
            record(2, "stdout", "F", "the cut"),
            record(2, "stderr", "F", "at the cut"),
            record(3, "stdout", "F", "new"),
        )
        since = datetime.fromtimestamp(BASE_NS / 10**9 + 2, tz=UTC)
        assert await read_all(log_path, LogOptions(since_time=since)) == b"at the cut\nnew\n"

        # Same instant in another zone, and naive times are UTC.
        elsewhere = since.astimezone(timezone(timedelta(hours=-5)))
        assert await read_all(log_path, LogOptions(since_time=elsewhere)) == b"at the cut\nnew\n"
        naive = since.replace(tzinfo=None)
        assert await read_all(log_path, LogOptions(since_time=naive)) == b"at the cut\nnew\n"

    async def test_tail_lines_counts_output_lines(self, log_path: Path) -> None:
        append(
            log_path,
            record(0, "stdout", "F", "a"),
            record(1, "stdout", "P", "b1 "),
            record(1, "stderr", "F", "c"),
            record(2, "stdout", "P", "d1 "),
            record(2, "stdout", "P", "d2 "),
            record(2, "stdout", "F", "d3"),
            record(3, "stderr", "F", "e"),
        )
        # Output lines: a / b1 / c / d1 d2 d3 / e
        tails = [await read_all(log_path, LogOptions(tail_lines=n)) for n in range(7)]
        assert tails == [
            b"",
            b"e\n",
            b"d1 d2 d3\ne\n",
            b"c\nd1 d2 d3\ne\n",
            b"b1 \nc\nd1 d2 d3\ne\n",
            b"a\nb1 \nc\nd1 d2 d3\ne\n",
            b"a\nb1 \nc\nd1 d2 d3\ne\n",
        ]
        assert await read_all(log_path, LogOptions(tail_lines=-1)) == tails[-1]

    async def test_tail_lines_reads_only_the_end_of_a_large_file(
        self, log_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        expected = lines_file(log_path, 100_000, width=60)
        assert file_size(log_path) > 8 * 1024 * 1024
        read_bytes = 0
        real_pread = logs._pread

        def counting_pread(fd: int, size: int, offset: int, path: Path) -> bytes:
            nonlocal read_bytes
            data = real_pread(fd, size, offset, path)
            read_bytes += len(data)
            return data

        monkeypatch.setattr(logs, "_pread", counting_pread)
        assert await read_all(log_path, LogOptions(tail_lines=3)) == b"".join(expected[-3:])
        assert read_bytes < 4 * logs.READ_SIZE

        # Lines straddling block boundaries are counted right.
        got = await read_all(log_path, LogOptions(tail_lines=5000))
        assert got == b"".join(expected[-5000:])

    async def test_tail_and_since_together(self, log_path: Path) -> None:
        append(log_path, *(record(i, "stdout", "F", f"l{i}") for i in range(6)))
        since = datetime.fromtimestamp(BASE_NS / 10**9 + 4, tz=UTC)
        got = await read_all(log_path, LogOptions(tail_lines=3, since_time=since))
        assert got == b"l4\nl5\n"

    @pytest.mark.parametrize("limit", [0, 1, 5, 6, 7, 1000])
    async def test_limit_bytes_stops_after_exactly_that_many(
        self, log_path: Path, limit: int
    ) -> None:
        append(log_path, record(0, "stdout", "F", "12345"), record(1, "stdout", "F", "abcde"))
        whole = b"12345\nabcde\n"
        assert await read_all(log_path, LogOptions(limit_bytes=limit)) == whole[:limit]
        assert (
            await read_all(log_path, LogOptions(limit_bytes=limit), chunk_bytes=2)
            == (whole[:limit])
        )

    async def test_limit_bytes_ends_a_follow(self, log_path: Path) -> None:
        append(log_path, record(0, "stdout", "F", "12345"))
        async with asyncio.timeout(DEADLINE):
            got = await read_all(log_path, LogOptions(follow=True, limit_bytes=3))
        assert got == b"123"


class TestChunks:
    async def test_many_short_lines_come_in_few_chunks_of_whole_lines(self, log_path: Path) -> None:
        expected = lines_file(log_path, 10_000)
        chunks = [c async for c in read_log(log_path, LogOptions(), chunk_bytes=4096)]

        assert b"".join(chunks) == b"".join(expected)
        assert len(chunks) < 50
        assert all(len(c) <= 4096 and c.endswith(b"\n") for c in chunks)

    async def test_a_line_longer_than_a_chunk_is_split(self, log_path: Path) -> None:
        append(
            log_path,
            record(0, "stdout", "F", "short"),
            record(1, "stdout", "F", "x" * 250),
            record(2, "stdout", "F", "tail"),
        )
        chunks = [c async for c in read_log(log_path, LogOptions(), chunk_bytes=100)]

        assert b"".join(chunks) == b"short\n" + b"x" * 250 + b"\ntail\n"
        assert all(len(c) <= 100 for c in chunks)
        assert chunks[0] == b"short\n"


@pytest.mark.usefixtures("watch_mode")
class TestFollow:
    async def test_existing_then_new_lines_until_stopped(self, log_path: Path) -> None:
        append(log_path, record(0, "stdout", "F", "existing"))
        follower = Follower(log_path, LogOptions(follow=True))
        await follower.has(b"existing\n")

        append(log_path, record(1, "stderr", "F", "new"))
        await follower.has(b"new\n")
        assert not follower.task.done()

        # Written just before the stop: still delivered.
        append(log_path, record(2, "stdout", "F", "last words"))
        assert await follower.stop() == b"existing\nnew\nlast words\n"

    async def test_waits_for_a_file_that_does_not_exist_yet(self, log_path: Path) -> None:
        follower = Follower(log_path, LogOptions(follow=True, tail_lines=0))
        await asyncio.sleep(3 * logs.POLL_INTERVAL)
        assert not follower.task.done()

        append(log_path, record(0, "stdout", "F", "hello"))
        await follower.has(b"hello\n")
        assert await follower.stop() == b"hello\n"

    async def test_tail_then_follow(self, log_path: Path) -> None:
        append(log_path, *(record(i, "stdout", "F", f"l{i}") for i in range(5)))
        follower = Follower(log_path, LogOptions(follow=True, tail_lines=2, timestamps=True))
        await follower.has(b"l4\n")
        append(log_path, record(9, "stdout", "F", "l9"))
        got = await follower.stop()
        assert got == f"{stamp(3)} l3\n{stamp(4)} l4\n{stamp(9)} l9\n".encode()

    async def test_a_huge_line_arrives_while_it_is_written(self, log_path: Path) -> None:
        follower = Follower(log_path, LogOptions(follow=True), chunk_bytes=4096)
        append(log_path, record(0, "stdout", "P", "x" * 16384))
        await follower.has(b"x" * 16384)

        append(log_path, record(1, "stdout", "F", "end"))
        got = await follower.stop()
        assert got == b"x" * 16384 + b"end\n"
        assert all(len(c) <= 4096 for c in follower.chunks)

    async def test_a_replaced_file_is_finished_then_the_new_one_read(self, log_path: Path) -> None:
        append(log_path, record(0, "stdout", "F", "old 1"))
        follower = Follower(log_path, LogOptions(follow=True))
        await follower.has(b"old 1\n")

        # The old writer's last line lands just before the rename.
        append(log_path, record(1, "stdout", "F", "old 2"))
        rotate(log_path)
        await asyncio.sleep(2 * logs.POLL_INTERVAL)
        append(log_path, record(2, "stdout", "F", "new 1"))
        await follower.has(b"new 1\n")

        append(log_path, record(3, "stdout", "F", "new 2"))
        assert await follower.stop() == b"old 1\nold 2\nnew 1\nnew 2\n"

    async def test_replacement_at_once_with_content(self, log_path: Path) -> None:
        append(log_path, record(0, "stdout", "P", "unfinished"))
        follower = Follower(log_path, LogOptions(follow=True))
        await follower.has(b"unfinished")

        new = log_path.with_name("new.log")
        append(new, record(1, "stdout", "F", "fresh"))
        new.replace(log_path)
        await follower.has(b"fresh\n")
        assert await follower.stop() == b"unfinished\nfresh\n"

    async def test_many_followers_share_one_watcher(self, log_path: Path) -> None:
        append(log_path, record(0, "stdout", "F", "start"))
        # Like the process driver: one stop event per agent, shared by its followers.
        agent_deleted = asyncio.Event()
        followers = [
            Follower(log_path, LogOptions(follow=True), stopped=agent_deleted) for _ in range(500)
        ]
        for follower in followers:
            await follower.has(b"start\n")
        assert len(logs._watches) == 1

        append(log_path, record(1, "stdout", "F", "for everyone"))
        for follower in followers:
            await follower.has(b"for everyone\n")
        append(log_path, record(2, "stdout", "F", "last"))
        agent_deleted.set()
        for follower in followers:
            assert await follower.stop() == b"start\nfor everyone\nlast\n"
        assert logs._watches == {}

    async def test_a_reader_that_does_not_read_does_not_hold_back_others(
        self, log_path: Path
    ) -> None:
        stalled = read_log(log_path, LogOptions(follow=True), chunk_bytes=1024)
        try:
            lines_file(log_path, 10)
            first = await anext(stalled)
            assert first.startswith(b"line-0\n")

            expected = lines_file(log_path, 5000)
            reader = Follower(log_path, LogOptions(follow=True))
            await reader.has(expected[-1])
            await reader.stop()
        finally:
            await stalled.aclose()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux")
class TestEvents:
    """With inotify, followers learn of changes from events, not from polling."""

    async def test_new_lines_arrive_by_event(
        self, log_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        events_only(monkeypatch)
        append(log_path, record(0, "stdout", "F", "existing"))
        follower = Follower(log_path, LogOptions(follow=True))
        await follower.has(b"existing\n")
        for i in range(1, 4):
            append(log_path, record(i, "stdout", "F", f"new {i}"))
            await follower.has(f"new {i}\n".encode())
        assert await follower.stop() == b"existing\nnew 1\nnew 2\nnew 3\n"

    async def test_creation_restart_and_replacement_arrive_by_event(
        self, log_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        events_only(monkeypatch)
        follower = Follower(log_path, LogOptions(follow=True))
        append(log_path, record(0, "stdout", "F", "first run"))
        await follower.has(b"first run\n")

        # A restart: the log becomes the previous one, the new run starts a new file.
        append(log_path, record(1, "stdout", "P", "last words"))
        os.replace(log_path, log_path.with_name("previous.log"))
        append(log_path, record(2, "stdout", "F", "second run"))
        await follower.has(b"second run\n")

        new = log_path.with_name("new.log")
        append(new, record(3, "stdout", "F", "replaced at once"))
        new.replace(log_path)
        await follower.has(b"replaced at once\n")
        append(log_path, record(4, "stdout", "F", "and written to"))
        await follower.has(b"and written to\n")
        assert await follower.stop() == (
            b"first run\nlast words\nsecond run\nreplaced at once\nand written to\n"
        )

    async def test_a_directory_created_later(self, tmp_path: Path) -> None:
        log_path = tmp_path / "agent" / "current.log"
        follower = Follower(log_path, LogOptions(follow=True))
        log_path.parent.mkdir()
        append(log_path, record(0, "stdout", "F", "hello"))
        await follower.has(b"hello\n")
        # From then on events tell of changes; polling is only the safety net.
        assert logs._watches[asyncio.get_running_loop(), log_path].evented
        append(log_path, record(1, "stdout", "F", "again"))
        assert await follower.stop() == b"hello\nagain\n"

    async def test_a_file_system_without_events_is_polled(
        self, log_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # What a network file system does with writes made on another host.
        monkeypatch.setattr(inotify.Watcher, "_dispatch", lambda self, data: None)
        monkeypatch.setattr(logs, "SAFETY_POLL_INTERVAL", 0.05)
        append(log_path, record(0, "stdout", "F", "start"))
        follower = Follower(log_path, LogOptions(follow=True))
        await follower.has(b"start\n")
        watch = logs._watches[asyncio.get_running_loop(), log_path]
        assert watch.evented

        for i in range(logs.MISSES_BEFORE_POLLING):
            append(log_path, record(i + 1, "stdout", "F", f"unannounced {i}"))
            await follower.has(f"unannounced {i}\n".encode())
        assert not watch.evented
        append(log_path, record(9, "stdout", "F", "polled"))
        await follower.has(b"polled\n")
        await follower.stop()

    async def test_a_burst_comes_in_few_chunks(self, log_path: Path) -> None:
        append(log_path, record(0, "stdout", "F", "start"))
        follower = Follower(log_path, LogOptions(follow=True))
        await follower.has(b"start\n")

        expected = lines_file(log_path, 10_000)
        await follower.has(expected[-1])
        burst = follower.chunks[1:]
        assert b"".join(burst) == b"".join(expected)
        assert len(burst) <= 10
        await follower.stop()

    async def test_one_write_costs_each_follower_one_read(
        self, log_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        events_only(monkeypatch)
        append(log_path, record(0, "stdout", "F", "start"))
        agent_deleted = asyncio.Event()
        followers = [
            Follower(log_path, LogOptions(follow=True), stopped=agent_deleted) for _ in range(200)
        ]
        for follower in followers:
            await follower.has(b"start\n")
        # One descriptor, two kernel watches (the file and its directory) for them all.
        assert sorted(inotify_fds().values()) == [2]

        reads = 0
        real_pread = logs._pread

        def counting_pread(fd: int, size: int, offset: int, path: Path) -> bytes:
            nonlocal reads
            reads += 1
            return real_pread(fd, size, offset, path)

        monkeypatch.setattr(logs, "_pread", counting_pread)
        append(log_path, record(1, "stdout", "F", "news"))
        for follower in followers:
            await follower.has(b"news\n")
        assert reads == len(followers)

        agent_deleted.set()
        for follower in followers:
            assert await follower.stop() == b"start\nnews\n"
        assert sorted(inotify_fds().values()) == [0]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class TestRelease:
    async def test_cancelled_followers_release_files_watchers_and_tasks(
        self, log_path: Path
    ) -> None:
        append(log_path, *(record(i, "stdout", "F", f"l{i}") for i in range(3)))
        await inotify.close_idle()
        fds, tasks = open_fds(), len(asyncio.all_tasks())

        for i in range(200):
            follower = Follower(log_path, LogOptions(follow=True), chunk_bytes=4)
            if i % 2:
                # Blocked waiting for news.
                await follower.has(b"l2\n")
            follower.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower.task

        assert logs._watches == {}
        # Kernel watches go with the last follower; the idle descriptor a little later.
        assert sum(inotify_fds().values()) == 0
        await inotify.close_idle()
        assert open_fds() == fds
        assert len(asyncio.all_tasks()) == tasks

    async def test_closed_iterators_release_their_file(self, log_path: Path) -> None:
        lines_file(log_path, 1000)
        await inotify.close_idle()
        fds = open_fds()
        for _ in range(200):
            iterator = read_log(log_path, LogOptions(follow=True), chunk_bytes=64)
            await anext(iterator)
            await iterator.aclose()
        assert logs._watches == {}
        await inotify.close_idle()
        assert open_fds() == fds


class TestTailText:
    def test_last_lines_as_text(self, log_path: Path) -> None:
        lines_file(log_path, 100)
        append(log_path, record(1, "stderr", "F", "fatal: caf\u00e9".encode()))
        assert tail_text(log_path, 3) == "line-98\nline-99\nfatal: caf\u00e9\n"
        assert tail_text(log_path.with_name("missing.log")) == ""

    def test_at_most_max_chars(self, log_path: Path) -> None:
        lines_file(log_path, 1000)
        whole = "".join(f"line-{i}\n" for i in range(980, 1000))
        assert tail_text(log_path, 20) == whole
        assert tail_text(log_path, 20, max_chars=30) == whole[-30:]


@pytest.fixture
def shim_runner(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def run(*command: str) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-I", "-S", shim.__file__, "--log-dir", str(tmp_path), "--"]
        proc = subprocess.Popen(
            [*argv, *command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        started.append(proc)
        return proc

    yield run

    for proc in started:
        if group_members(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=DEADLINE)


async def wait_process(proc: subprocess.Popen[bytes]) -> int:
    return await asyncio.to_thread(proc.wait, DEADLINE)


class TestWithTheShim:
    async def test_follow_a_huge_line_while_the_agent_writes_it(
        self, tmp_path: Path, shim_runner: Callable[..., subprocess.Popen[bytes]]
    ) -> None:
        log_path = tmp_path / shim.LOG_FILE
        size = 5 * 1024 * 1024
        follower = Follower(log_path, LogOptions(follow=True))
        script = (
            "import sys, time\n"
            "print('hello', flush=True)\n"
            f"sys.stderr.write('x' * {size})\n"
            "sys.stderr.flush()\n"
            "time.sleep(60)\n"
        )
        proc = shim_runner(sys.executable, "-c", script)

        # The agent is still writing its line: all but the last record is already out.
        await follower.wait_until(
            lambda: len(follower.data) >= size - shim.MAX_RECORD_CONTENT, "most of the line"
        )
        assert proc.poll() is None
        assert b"\n" not in follower.data[6:]

        os.kill(proc.pid, signal.SIGTERM)
        assert await wait_process(proc) == 128 + signal.SIGTERM
        got = await follower.stop()
        assert got == b"hello\n" + b"x" * size + b"\n"
        assert max(len(c) for c in follower.chunks) <= logs.DEFAULT_CHUNK_BYTES

    async def test_tail_of_a_failed_agent(
        self, tmp_path: Path, shim_runner: Callable[..., subprocess.Popen[bytes]]
    ) -> None:
        proc = shim_runner("sh", "-c", "seq 1 50; echo 'boom: no config' >&2; exit 1")
        assert await wait_process(proc) == 1
        assert tail_text(tmp_path / shim.LOG_FILE, 3) == "49\n50\nboom: no config\n"
