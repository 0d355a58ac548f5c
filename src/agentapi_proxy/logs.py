"""Reads agent logs written in the CRI log format, with the options of ``kubectl logs``.

A log file holds one record per line (see :mod:`agentapi_proxy.shim`, which
writes them)::

    2026-12-04T16:00:00.123456789Z stdout F a full line
    2026-12-04T16:00:00.123456789Z stderr P the first 16 KiB of a longer line

Output lines. An output line is a run of records of one stream in which every
record but the last is ``P``; its text is the records' contents joined, plus
``"\\n"`` when the run ends with ``F``, and its timestamp is that of its first
record. A run can also end because a record of the other stream comes next
(the agent wrote a line longer than 16 KiB in several writes while writing to
the other stream): the line is then shown broken there, with ``"\\n"``, so that
no amount of one stream is ever held back for the other. A run left open at the
end of a log ends the output without ``"\\n"``.

Following. Every follower of a file reads from its own offset at its own pace,
so a slow one holds at most about two chunks and never delays the others or
the agent. Followers of one path share one :class:`_Watch`, which wakes them
when the file changes or is replaced; each woken follower reads all that is
there, so lines written in a burst go out in few chunks. On Linux the watch
learns of changes from inotify (:mod:`agentapi_proxy.inotify`, one descriptor
per event loop): a watch on the file for writes, and one on its directory for
the file being created, replaced or removed. It also stats the path every
:data:`SAFETY_POLL_INTERVAL` seconds, and every :data:`POLL_INTERVAL` seconds
where inotify cannot tell it everything (no inotify, watch limit reached,
directory missing, or a file system seen changing without events). One more
task per ``stopped`` event wakes the followers when it is set. Reads are
bounded (:data:`READ_SIZE`) and made on the event loop: they hit a local file
that was just written, so the page cache answers them in microseconds, and a
thread hop per read would cost more than the read with hundreds of followers.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import os
import re
from collections.abc import AsyncGenerator, Generator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from agentapi_proxy import inotify
from agentapi_proxy.errors import Internal, InvalidArgument
from agentapi_proxy.model import LogOptions
from agentapi_proxy.shim import MAX_RECORD_CONTENT, format_timestamp

__all__ = [
    "MAX_RECORD_CONTENT",
    "POLL_INTERVAL",
    "READ_SIZE",
    "SAFETY_POLL_INTERVAL",
    "LogRecord",
    "format_timestamp",
    "parse_record",
    "parse_timestamp",
    "read_log",
    "tail_text",
]

logger = logging.getLogger(__name__)

# Without events, one stat() per followed file per interval: the write-to-reader latency.
POLL_INTERVAL = 0.02
# With events, still one stat() per followed file per interval, so that an event
# lost anyhow (a queue overflow, a file system that delivers none for writes made
# on another host, a kernel quirk) delays a follower by this much, never for ever.
SAFETY_POLL_INTERVAL = 1.0
# Polls that saw a change no event told of, with no event in between, before the
# watch stops trusting events; one such poll can be a write caught half-way.
MISSES_BEFORE_POLLING = 2
READ_SIZE = 64 * 1024
DEFAULT_CHUNK_BYTES = 64 * 1024
# A record line longer than this is not one we or a container runtime wrote;
# it is skipped so that a corrupt file cannot make a reader buffer without bound.
MAX_RECORD_LINE = 4 * MAX_RECORD_CONTENT

_STREAMS = (b"stdout", b"stderr")
_TIMESTAMP = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})"
    r"(?:\.(\d{1,9})\d*)?"
    r"(?:[Zz]|([+-])(\d{2}):(\d{2}))"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One line of a CRI log file."""

    timestamp: str
    stream: str
    partial: bool
    content: bytes

    @property
    def time_ns(self) -> int:
        return parse_timestamp(self.timestamp)


def parse_timestamp(text: str | bytes) -> int:
    """Nanoseconds since the epoch of an RFC 3339 time (any number of fraction digits).

    Raises InvalidArgument when ``text`` is not such a time.
    """
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    match = _TIMESTAMP.fullmatch(text)
    if match is None:
        raise InvalidArgument(f"not an RFC 3339 timestamp: {text!r}")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction, sign, offset_hours, offset_minutes = match.groups()[6:]
    try:
        # timegm accepts days and hours out of range; datetime validates them.
        datetime(year, month, day, hour, minute, min(second, 59))
    except ValueError as exc:
        raise InvalidArgument(f"not an RFC 3339 timestamp: {text!r}") from exc
    seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    if sign is not None:
        offset = int(offset_hours) * 3600 + int(offset_minutes) * 60
        seconds -= offset if sign == "+" else -offset
    nanos = int(fraction.ljust(9, "0")) if fraction else 0
    return seconds * 1_000_000_000 + nanos


def _datetime_ns(when: datetime) -> int:
    # A naive time is taken as UTC, like the rest of the control plane's times.
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delta = when - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def _split_record(line: bytes) -> tuple[bytes, bytes, bool, bytes] | None:
    """(timestamp, stream, partial, content) of a record line, or None if it is malformed."""
    parts = line.split(b" ", 3)
    if len(parts) < 3 or parts[1] not in _STREAMS:
        return None
    tag = parts[2].split(b":", 1)[0]
    if tag not in (b"F", b"P"):
        return None
    return parts[0], parts[1], tag == b"P", parts[3] if len(parts) == 4 else b""


def parse_record(line: bytes) -> LogRecord:
    """Parses one record line (with or without its ``"\\n"``). Raises InvalidArgument."""
    parts = _split_record(line.removesuffix(b"\n"))
    if parts is None:
        raise InvalidArgument(f"not a CRI log record: {line[:100]!r}")
    timestamp, stream, partial, content = parts
    parse_timestamp(timestamp)
    return LogRecord(timestamp.decode("ascii"), stream.decode("ascii"), partial, content)


class _LineAssembler:
    """Turns record lines into output bytes (see the module docstring for what a line is)."""

    def __init__(self, *, timestamps: bool, since_ns: int | None) -> None:
        self.out = bytearray()
        self.malformed = 0
        self._timestamps = timestamps
        self._since_ns = since_ns
        # The stream whose line is open (its last record was P), else None.
        self._open: bytes | None = None
        self._skipping = False

    def feed(self, line: bytes) -> None:
        parts = _split_record(line)
        if parts is None:
            self.malformed += 1
            return
        timestamp, stream, partial, content = parts

        if self._open != stream:
            self.end_line()
            self._skipping = False
            if self._since_ns is not None:
                try:
                    self._skipping = parse_timestamp(timestamp) < self._since_ns
                except InvalidArgument:
                    self.malformed += 1
                    return
            if self._timestamps and not self._skipping:
                self.out += timestamp
                self.out += b" "

        if not self._skipping:
            self.out += content
            if not partial:
                self.out += b"\n"
        self._open = stream if partial else None

    def end_line(self) -> None:
        """Breaks a line left open (the other stream or another file comes next)."""
        if self._open is not None and not self._skipping:
            self.out += b"\n"
        self._open = None


class _Cursor:
    """An open log file, the offset read up to, and the unfinished record after it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        stat = os.fstat(fd)
        self.identity = (stat.st_dev, stat.st_ino)
        self.offset = 0
        self._carry = b""
        self._discarding = False

    @classmethod
    def open(cls, path: Path) -> _Cursor | None:
        """The open file, or None when it does not exist. Raises Internal."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise Internal(f"cannot open log {path}: {exc.strerror}") from exc
        try:
            return cls(path, fd)
        except BaseException:
            os.close(fd)
            raise

    def size(self) -> int:
        try:
            return os.fstat(self.fd).st_size
        except OSError as exc:
            raise Internal(f"cannot read log {self.path}: {exc.strerror}") from exc

    def read_into(self, assembler: _LineAssembler) -> bool:
        """Feeds the complete records of the next block; False once at the end of the file.

        A block shorter than :data:`READ_SIZE` is the end: that is what a short
        read of a regular file means, and it spares every follower an empty
        read per wake-up.
        """
        data = _pread(self.fd, READ_SIZE, self.offset, self.path)
        more = len(data) == READ_SIZE
        if not data:
            return False
        self.offset += len(data)

        if self._discarding:
            newline = data.find(b"\n")
            if newline < 0:
                return more
            data = data[newline + 1 :]
            self._discarding = False
        buf = self._carry + data if self._carry else data
        last = buf.rfind(b"\n")
        if last >= 0:
            for line in buf[:last].split(b"\n"):
                assembler.feed(line)
        self._carry = buf[last + 1 :]

        if len(self._carry) > MAX_RECORD_LINE:
            assembler.malformed += 1
            self._carry = b""
            self._discarding = True
        return more

    def close(self) -> None:
        os.close(self.fd)


def _pread(fd: int, size: int, offset: int, path: Path) -> bytes:
    try:
        return os.pread(fd, size, offset)
    except OSError as exc:
        raise Internal(f"cannot read log {path}: {exc.strerror}") from exc


def _lines_backwards(
    fd: int, end: int, path: Path
) -> Generator[tuple[int, bytes] | None, None, None]:
    """(offset, line) of each complete line before ``end``, last first.

    Yields None after each block read, a point to let others run. Bytes after
    the last newline (a record being written) and overlong lines are skipped.
    """
    pos = end
    head = b""  # bytes [pos, ...) of a line whose start is in an earlier block
    seen_newline = False
    overlong = False
    while pos > 0:
        size = min(READ_SIZE, pos)
        pos -= size
        data = _pread(fd, size, pos, path)
        if len(data) != size:
            raise Internal(f"log {path} shrank while being read")
        if not overlong and head:
            data += head

        stop = len(data)
        while (newline := data.rfind(b"\n", 0, stop)) >= 0:
            if not seen_newline:
                seen_newline = True
            elif overlong:
                overlong = False
            else:
                yield pos + newline + 1, data[newline + 1 : stop]
            stop = newline
        head = data[:stop] if seen_newline and not overlong else b""
        if len(head) > MAX_RECORD_LINE:
            overlong = True
            head = b""
        yield None
    if seen_newline and not overlong:
        yield 0, head


def _tail_start(fd: int, end: int, lines: int, path: Path) -> Generator[None, None, int]:
    """Offset of the first record of the last ``lines`` output lines before ``end``."""
    count = 0
    # The record after the one being looked at: (offset, stream), or None.
    later: tuple[int, bytes] | None = None
    for item in _lines_backwards(fd, end, path):
        if item is None:
            yield
            continue
        offset, line = item
        parts = _split_record(line)
        if parts is None:
            continue
        if lines <= 0:
            return offset + len(line) + 1
        _, stream, partial, _ = parts

        # The later record starts an output line unless this one is P of its stream.
        if later is not None and not (partial and stream == later[1]):
            count += 1
            if count == lines:
                return later[0]
        later = offset, stream
    return 0


def _run_to_end(steps: Generator[None, None, _T]) -> _T:
    while True:
        try:
            next(steps)
        except StopIteration as done:
            result: _T = done.value
            return result


async def _run_cooperatively(steps: Generator[None, None, _T]) -> _T:
    while True:
        try:
            next(steps)
        except StopIteration as done:
            result: _T = done.value
            return result
        await asyncio.sleep(0)


class _Output:
    """Output bytes cut into chunks of whole lines, up to a byte limit."""

    def __init__(self, buf: bytearray, *, chunk_bytes: int, limit: int | None) -> None:
        self.buf = buf
        self.exhausted = limit == 0
        self._chunk_bytes = chunk_bytes
        self._left = limit

    def chunks(self, *, flush: bool) -> Iterator[bytes]:
        """Full chunks; with ``flush`` also the rest. Sets ``exhausted`` at the limit."""
        buf = self.buf
        while buf and not self.exhausted and (flush or len(buf) >= self._chunk_bytes):
            size = self._chunk_bytes
            if len(buf) > size:
                newline = buf.rfind(b"\n", 0, size)
                if newline >= 0:
                    size = newline + 1
            chunk = bytes(buf[:size])
            del buf[:size]
            if self._left is not None:
                if len(chunk) >= self._left:
                    chunk = chunk[: self._left]
                    self.exhausted = True
                self._left -= len(chunk)
            yield chunk


@dataclass(eq=False)
class _Follower:
    stopped: asyncio.Event | None
    wake: asyncio.Event = field(default_factory=asyncio.Event)


_FILE_EVENTS = inotify.IN_MODIFY | inotify.IN_ATTRIB | inotify.IN_MOVE_SELF | inotify.IN_DELETE_SELF
_DIRECTORY_EVENTS = (
    inotify.IN_CREATE
    | inotify.IN_MOVED_TO
    | inotify.IN_MOVED_FROM
    | inotify.IN_DELETE
    | inotify.IN_MOVE_SELF
    | inotify.IN_DELETE_SELF
    | inotify.IN_ONLYDIR
)


class _Watch:
    """Watches one path while it has followers and wakes them when it changes or they stop.

    Followers usually share their ``stopped`` event (one per agent), so one
    task per distinct event waits for it, instead of one per follower.
    """

    def __init__(self, key: tuple[asyncio.AbstractEventLoop, Path]) -> None:
        self.key = key
        self.path = key[1]
        self.followers: set[_Follower] = set()
        # (device, inode) of the path at the last look; None when missing.
        self.identity: tuple[int, int] | None = None
        self._state: tuple[int, int, int, int] | None = None
        self._stop_waits: dict[asyncio.Event, tuple[asyncio.Task[None], int]] = {}
        self._file_events: inotify.Subscription | None = None
        self._directory_events: inotify.Subscription | None = None
        # Whether some event came since the last poll, and polls since that saw a change.
        self._noticed = False
        self._misses = 0
        self._closed = False
        self._refresh()
        self._task = asyncio.create_task(self._poll(), name=f"log-watch {self.path}")

    def add(self, follower: _Follower) -> None:
        self.followers.add(follower)
        stopped = follower.stopped
        if stopped is not None:
            task, users = self._stop_waits.get(stopped) or (None, 0)
            if task is None:
                task = asyncio.create_task(self._wake_on(stopped), name=f"log-stop {self.path}")
            self._stop_waits[stopped] = task, users + 1

    def remove(self, follower: _Follower) -> None:
        self.followers.discard(follower)
        stopped = follower.stopped
        if stopped is not None:
            task, users = self._stop_waits[stopped]
            if users == 1:
                task.cancel()
                del self._stop_waits[stopped]
            else:
                self._stop_waits[stopped] = task, users - 1
        if not self.followers:
            self._close()

    @property
    def evented(self) -> bool:
        """Whether events tell of every change, so that polling is only a safety net."""
        if self._misses >= MISSES_BEFORE_POLLING:
            return False
        directory = self._directory_events
        if directory is None or not directory.active:
            return False
        file = self._file_events
        return self.identity is None or (file is not None and file.active)

    def _close(self) -> None:
        self._closed = True
        self._task.cancel()
        for subscription in (self._file_events, self._directory_events):
            if subscription is not None:
                subscription.cancel()
        self._file_events = self._directory_events = None

    def _look(self) -> tuple[int, int, int, int] | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            # Missing, or unreadable for now: followers find out when they open it.
            self.identity = None
            return None
        self.identity = (stat.st_dev, stat.st_ino)
        return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns

    def _refresh(self) -> None:
        """Points the watches at what the path and its directory name now, then looks.

        The kernel watches inodes: after the file or the directory was replaced,
        a new watch is needed for the new one. Watching comes before looking, so
        that a change after the look cannot go without an event. The new
        subscriptions are made before the old ones are cancelled, so a kernel
        watch still in use is kept, not removed and added again.
        """
        if self._closed:
            return
        directory = inotify.subscribe(
            self.path.parent, _DIRECTORY_EVENTS, self._on_directory_event, name=self.path.name
        )
        file = inotify.subscribe(self.path, _FILE_EVENTS, self._on_file_event)
        for old in (self._directory_events, self._file_events):
            if old is not None:
                old.cancel()
        self._directory_events, self._file_events = directory, file
        self._state = self._look()

    def _on_file_event(self, mask: int) -> None:
        self._noticed = True
        if mask & ~inotify.IN_MODIFY:
            # Moved, deleted, unmounted, or events were lost: the path may name another file.
            self._refresh()
        self._wake_all()

    def _on_directory_event(self, mask: int) -> None:
        self._noticed = True
        self._refresh()
        self._wake_all()

    def _wake_all(self) -> None:
        for follower in self.followers:
            follower.wake.set()

    async def _poll(self) -> None:
        while True:
            evented = self.evented
            await asyncio.sleep(SAFETY_POLL_INTERVAL if evented else POLL_INTERVAL)
            if evented:
                # An event may be queued but not yet read: it is not a missed one.
                inotify.read_pending()
            noticed, self._noticed = self._noticed, False
            if noticed:
                self._misses = 0

            identity = self.identity
            state = self._look()
            if state == self._state:
                continue
            self._state = state
            if evented and noticed and self.identity == identity:
                # Events told of this change and the followers were woken then.
                continue
            if evented and not noticed:
                self._misses += 1
                if self._misses == MISSES_BEFORE_POLLING:
                    logger.info("no file events for %s, polling it instead", self.path)
            self._refresh()
            self._wake_all()

    async def _wake_on(self, stopped: asyncio.Event) -> None:
        await stopped.wait()
        for follower in self.followers:
            if follower.stopped is stopped:
                follower.wake.set()


_watches: dict[tuple[asyncio.AbstractEventLoop, Path], _Watch] = {}


def _follow(path: Path, stopped: asyncio.Event | None) -> tuple[_Watch, _Follower]:
    key = asyncio.get_running_loop(), path
    watch = _watches.get(key)
    if watch is None:
        watch = _watches[key] = _Watch(key)
    follower = _Follower(stopped)
    watch.add(follower)
    return watch, follower


def _unfollow(watch: _Watch, follower: _Follower) -> None:
    watch.remove(follower)
    if not watch.followers and _watches.get(watch.key) is watch:
        del _watches[watch.key]


def _replaced(cursor: _Cursor, watch: _Watch) -> bool:
    """Whether the path now names another file than the one the cursor reads."""
    if watch.identity == cursor.identity:
        return False
    # The watcher's look may predate our open: ask the file system.
    try:
        stat = os.stat(cursor.path)
    except FileNotFoundError:
        return True
    except OSError as exc:
        raise Internal(f"cannot read log {cursor.path}: {exc.strerror}") from exc
    return (stat.st_dev, stat.st_ino) != cursor.identity


async def read_log(
    path: Path,
    options: LogOptions,
    *,
    stopped: asyncio.Event | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> AsyncGenerator[bytes, None]:
    """Yields the output of the log at ``path`` as ``kubectl logs`` would show it.

    Chunks hold whole lines, at most ``chunk_bytes`` each; only a line longer
    than that is split over several chunks. ``options.previous`` is the caller's
    business (it picks the file). A negative ``tail_lines`` means all lines.

    Without ``follow``: what the file holds now, then the end; nothing when the
    file does not exist. With ``follow``: waits for the file if needed, yields
    records as they are written, moves on to a new file when the path is
    replaced (after finishing the old one), and returns once ``stopped`` is set
    and what the file held then has been yielded. Stops after exactly
    ``limit_bytes`` bytes in any case.

    Closing or cancelling the iterator releases its file and its watcher.
    Raises InvalidArgument for bad arguments and Internal when the file cannot
    be read.
    """
    if chunk_bytes <= 0:
        raise InvalidArgument(f"chunk_bytes must be positive, not {chunk_bytes}")
    if options.limit_bytes is not None and options.limit_bytes < 0:
        raise InvalidArgument(f"limit_bytes must not be negative, not {options.limit_bytes}")
    since_ns = None if options.since_time is None else _datetime_ns(options.since_time)
    assembler = _LineAssembler(timestamps=options.timestamps, since_ns=since_ns)
    output = _Output(assembler.out, chunk_bytes=chunk_bytes, limit=options.limit_bytes)
    if output.exhausted:
        return

    cursor: _Cursor | None = None
    following: tuple[_Watch, _Follower] | None = None
    replaced = False
    try:
        cursor = _Cursor.open(path)
        if cursor is None and not options.follow:
            return
        if cursor is not None and options.tail_lines is not None and options.tail_lines >= 0:
            steps = _tail_start(cursor.fd, cursor.size(), options.tail_lines, path)
            cursor.offset = await _run_cooperatively(steps)
        if options.follow:
            following = _follow(path, stopped)

        while True:
            if following is not None:
                following[1].wake.clear()
            # Looked at before reading, so the last pass reads all written before the stop.
            last_pass = stopped is not None and stopped.is_set()
            if cursor is None:
                cursor = _Cursor.open(path)

            if cursor is not None:
                while True:
                    more = cursor.read_into(assembler)
                    for chunk in output.chunks(flush=False):
                        yield chunk
                    if output.exhausted:
                        return
                    if not more:
                        break
                    # Catching up on a large file: let the other followers have a turn.
                    await asyncio.sleep(0)

                if replaced:
                    assembler.end_line()
                    cursor.close()
                    cursor, replaced = None, False
                    continue
                if following is not None and _replaced(cursor, following[0]):
                    # One more pass first: the old file may have grown since our last read.
                    replaced = True
                    continue

            for chunk in output.chunks(flush=True):
                yield chunk
            if output.exhausted or following is None or last_pass:
                return
            await following[1].wake.wait()
    finally:
        if cursor is not None:
            cursor.close()
        if following is not None:
            _unfollow(*following)
        if assembler.malformed:
            logger.warning("skipped %s malformed records in %s", assembler.malformed, path)


def tail_text(path: Path, lines: int = 20, *, max_chars: int = 8 * 1024) -> str:
    """The last ``lines`` output lines of the log as text, at most its last ``max_chars``.

    Returns "" when the file does not exist. Blocks on file reads; raises Internal.
    """
    cursor = _Cursor.open(path)
    if cursor is None:
        return ""
    try:
        assembler = _LineAssembler(timestamps=False, since_ns=None)
        cursor.offset = _run_to_end(_tail_start(cursor.fd, cursor.size(), lines, path))
        # Bytes, not characters, are bounded while reading; 4 per character covers UTF-8.
        keep = 4 * max_chars
        while cursor.read_into(assembler):
            if len(assembler.out) > 2 * keep:
                del assembler.out[:-keep]
    finally:
        cursor.close()
    return bytes(assembler.out[-4 * max_chars :]).decode("utf-8", "replace")[-max_chars:]
