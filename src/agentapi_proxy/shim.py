"""Runs one agent and writes its stdout and stderr to a log file (the role of conmon).

Run as a script, never imported for its work::

    python -I -S shim.py --log-dir DIR -- COMMAND [ARG ...]

The control plane starts one shim per agent in a new session, so the shim
leads the agent's process group and outlives the control plane (even a
``kill -9`` of it). It therefore imports only small standard-library modules:
it runs with ``-S`` (no site-packages) and once per agent, so it must stay tiny.

What it promises:

- The agent runs as its child in the same process group, with stdin from
  ``/dev/null``, stdout and stderr on two pipes, and the shim's cwd and env.
- ``DIR/current.log`` receives the output in the CRI log format the kubelet
  reads, one record per line::

      2026-12-04T16:00:00.123456789Z stdout F a full line
      2026-12-04T16:00:00.123456789Z stderr P the first 16 KiB of a longer line

  A line longer than :data:`MAX_RECORD_CONTENT` becomes ``P`` records and a
  final ``F`` record; a stream that ends without a newline ends with an ``F``
  record too. Records are appended as each read returns; only the last piece
  of an unfinished line (at most 16 KiB per stream) waits for its newline or
  for the end of the stream, so it can land after lines of the other stream.
- SIGTERM, SIGINT and SIGHUP sent to the shim are passed on to the agent as
  SIGTERM; the shim keeps writing output until the agent exits.
- When the agent has exited, output still arriving (from descendants that keep
  the pipes open) is written for at most :data:`DRAIN_AFTER_EXIT` seconds.
  Then ``DIR/exit.json`` is written atomically::

      {"exit_code": 3, "signal": null, "finished_at": "2026-12-04T16:00:01.000000000Z"}

  and the shim exits with the agent's code (128 + N when a signal N killed it).
- An agent that cannot be started (command not found, not executable) gets a
  ``shim:`` line on stderr in the log and exit code 127 or 126, like a shell.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import sys
import time

LOG_FILE = "current.log"
EXIT_FILE = "exit.json"
# The kubelet's container runtimes split lines at 16 KiB as well.
MAX_RECORD_CONTENT = 16 * 1024
DRAIN_AFTER_EXIT = 0.5

_READ_SIZE = 64 * 1024
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_USAGE = "usage: shim.py --log-dir DIR -- COMMAND [ARG ...]\n"


def format_timestamp(time_ns: int) -> str:
    """RFC 3339 UTC time with nine fraction digits, e.g. ``2026-12-04T16:00:00.123456789Z``."""
    seconds, nanos = divmod(time_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos:09d}Z"


class _Stream:
    """Cuts one pipe's bytes into CRI records."""

    def __init__(self, name: bytes) -> None:
        self.name = name
        # Start of an unfinished line; never longer than MAX_RECORD_CONTENT.
        self.pending = b""

    def records(self, data: bytes, stamp: bytes, out: list[bytes]) -> None:
        buf = self.pending + data if self.pending else data
        start = 0
        while True:
            newline = buf.find(b"\n", start)
            if newline < 0:
                break
            start = self._cut(buf, start, newline, stamp, out)
            out.append(self._record(stamp, b"F", buf[start:newline]))
            start = newline + 1

        # Keep a final piece of at most MAX_RECORD_CONTENT, so that the record
        # ending the line is never empty unless the line is.
        start = self._cut(buf, start, len(buf), stamp, out)
        self.pending = buf[start:]

    def finish(self, stamp: bytes, out: list[bytes]) -> None:
        """The stream ended: an unfinished line becomes a full record."""
        if self.pending:
            out.append(self._record(stamp, b"F", self.pending))
            self.pending = b""

    def _cut(self, buf: bytes, start: int, end: int, stamp: bytes, out: list[bytes]) -> int:
        while end - start > MAX_RECORD_CONTENT:
            out.append(self._record(stamp, b"P", buf[start : start + MAX_RECORD_CONTENT]))
            start += MAX_RECORD_CONTENT
        return start

    def _record(self, stamp: bytes, tag: bytes, content: bytes) -> bytes:
        return b"%s %s %s %s\n" % (stamp, self.name, tag, content)


class _LogWriter:
    def __init__(self, path: str) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        self._fd = os.open(path, flags, 0o640)
        self._failed = False

    def write(self, records: list[bytes]) -> None:
        """Appends records; on a write error (disk full) they are lost, the agent keeps running."""
        if not records:
            return
        view = memoryview(b"".join(records))
        try:
            while view:
                view = view[os.write(self._fd, view) :]
            self._failed = False
        except OSError as exc:
            # Report once per run of failures; stderr is the control plane's shim.err.
            if not self._failed:
                sys.stderr.write(f"shim: cannot write the log, output is lost: {exc}\n")
                sys.stderr.flush()
            self._failed = True


def _parse_args(argv: list[str]) -> tuple[str, list[str]] | None:
    if len(argv) < 4 or argv[0] != "--log-dir" or argv[2] != "--":
        return None
    return argv[1], argv[3:]


def _ensure_std_fds() -> None:
    # With 0-2 closed, os.pipe() could return them and dup2 onto the same
    # number would leave close-on-exec set: the agent would lose its stdout.
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)


def _write_exit(log_dir: str, exit_code: int | None, signum: int | None) -> None:
    def number(value: int | None) -> str:
        return "null" if value is None else str(value)

    # Written by hand: the json module would import re, which this process avoids.
    finished_at = format_timestamp(time.time_ns())
    text = (
        f'{{"exit_code": {number(exit_code)}, "signal": {number(signum)}, '
        f'"finished_at": "{finished_at}"}}\n'
    )
    final = os.path.join(log_dir, EXIT_FILE)
    tmp = final + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)


def _stamp() -> bytes:
    return format_timestamp(time.time_ns()).encode()


def _note_signal(signum: int, frame: object) -> None:
    # The wakeup fd carries the signal number to the poll loop; nothing to do here.
    pass


def run(log_dir: str, command: list[str]) -> int:
    """Runs ``command`` under supervision; returns the exit code for the shim."""
    _ensure_std_fds()
    os.makedirs(log_dir, exist_ok=True)
    writer = _LogWriter(os.path.join(log_dir, LOG_FILE))
    try:
        os.unlink(os.path.join(log_dir, EXIT_FILE))
    except FileNotFoundError:
        pass

    # Handlers go in before the agent starts so no early signal is missed;
    # the wakeup fd turns signals into poll events.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    for signum in (*_FORWARDED, signal.SIGCHLD):
        signal.signal(signum, _note_signal)

    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        pid = os.posix_spawnp(
            command[0],
            command,
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, devnull, 0),
                (os.POSIX_SPAWN_DUP2, out_w, 1),
                (os.POSIX_SPAWN_DUP2, err_w, 2),
            ],
            # Python ignores SIGPIPE and SIGXFSZ; the agent gets the defaults.
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, *_FORWARDED, signal.SIGCHLD),
            setsigmask=(),
        )
    except OSError as exc:
        code = 126 if exc.errno in (errno.EACCES, errno.ENOEXEC, errno.EISDIR) else 127
        message = f"shim: cannot start {command[0]!r}: {exc.strerror or exc}"
        writer.write([b"%s stderr F %s\n" % (_stamp(), message.encode(errors="replace"))])
        _write_exit(log_dir, code, None)
        return code
    finally:
        for fd in (out_w, err_w, devnull):
            os.close(fd)

    status = _supervise(pid, {out_r: _Stream(b"stdout"), err_r: _Stream(b"stderr")}, wake_r, writer)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        _write_exit(log_dir, None, -code)
        return 128 - code
    _write_exit(log_dir, code, None)
    return code


def _supervise(pid: int, streams: dict[int, _Stream], wake_r: int, writer: _LogWriter) -> int:
    """Copies output until the agent has exited and its pipes are drained; returns its status."""
    poller = select.poll()
    for fd in (*streams, wake_r):
        poller.register(fd, select.POLLIN)
    status: int | None = None
    deadline = 0.0

    while status is None or streams:
        timeout_ms: float | None = None
        if status is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            timeout_ms = left * 1000
        events = poller.poll(timeout_ms)

        stamp = _stamp()
        records: list[bytes] = []
        child_changed = False
        for fd, _ in events:
            if fd == wake_r:
                for signum in _drain_wakeup(wake_r):
                    if signum == signal.SIGCHLD:
                        child_changed = True
                    elif status is None:
                        _forward_term(pid)
                continue
            stream = streams[fd]
            data = os.read(fd, _READ_SIZE)
            if data:
                stream.records(data, stamp, records)
            else:
                stream.finish(stamp, records)
                poller.unregister(fd)
                os.close(fd)
                del streams[fd]
        writer.write(records)

        if status is None and (child_changed or not streams):
            reaped, raw = os.waitpid(pid, os.WNOHANG)
            if reaped == pid:
                status = raw
                deadline = time.monotonic() + DRAIN_AFTER_EXIT

    # Descendants may hold the pipes open for ever: what they write later is not waited for.
    records = []
    stamp = _stamp()
    for fd, stream in streams.items():
        stream.finish(stamp, records)
        os.close(fd)
    writer.write(records)
    assert status is not None
    return status


def _drain_wakeup(wake_r: int) -> bytes:
    try:
        return os.read(wake_r, 256)
    except BlockingIOError:
        return b""


def _forward_term(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def main(argv: list[str]) -> int:
    parsed = _parse_args(argv)
    if parsed is None:
        sys.stderr.write(_USAGE)
        return 2
    return run(*parsed)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
