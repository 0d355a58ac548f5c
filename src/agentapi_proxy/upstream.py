"""A lean HTTP/1.1 client for the hop from a proxy to an agent's server.

Both proxies of agent traffic, the gateway's direct path and the control
plane's relay (:mod:`agentapi_proxy.traffic`), send one kind of traffic to
agents: a request whose head and headers have already been checked
(:mod:`agentapi_proxy.http_rules`), then a response relayed back byte for
byte. A general client such as aiohttp's does much more per request (URL
objects, header merging, cookie and auth handling), which was a third of the
direct path's CPU time. This client does only what the hop needs, on
:class:`asyncio.Protocol` connections kept alive per agent address. It
speaks plain ``http://`` only: agents behind TLS or the Kubernetes API
server's pod proxy need a general client.

Responses are parsed strictly, because a framing disagreement between the
agent and the proxy is a request-smuggling or response-splitting hole: a
response is refused (:class:`AgentResponseInvalid`) for a malformed status
line, a header line that is not ``token ":" value`` (obs-fold included), a
bare CR or LF, control characters, a head over MAX_HEAD_BYTES, a
Content-Length that is not one decimal number, a Transfer-Encoding other than
a single ``chunked``, both Content-Length and Transfer-Encoding, a malformed
chunk, or bytes the agent sends when no request is waiting. Bodies end by
Content-Length, by chunked framing, or (neither given) when the agent
closes; HEAD, 1xx, 204 and 304 responses have none. Interim 1xx responses
(but 101) are skipped.

A connection goes back to the pool only after a whole request was sent and
a whole response read, when both sides keep it alive (HTTP/1.1 without
``Connection: close``) and nothing followed the response. Any other ending
closes it. A pooled connection that the agent closed between requests is
retried once on a new connection, only when nothing of the response arrived
and the request can be sent again: an idempotent method whose body, if any,
was in hand.

Bodies flow in both directions with backpressure: reading from the agent
pauses while more than HIGH_WATER_BYTES wait for the client, and a streamed
request body waits while the agent's socket buffer is full.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass
from typing import Final, cast
from urllib.parse import urlsplit

from agentapi_proxy.errors import InvalidArgument, Unavailable

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS: Final = 10.0
# An idle keep-alive connection older than this is closed instead of reused: the
# agent may be about to close it, and a request racing that close could be lost.
IDLE_SECONDS: Final = 15.0
# Idle connections kept per agent address; more are closed when they come back.
MAX_IDLE_PER_ORIGIN: Final = 256
# Largest response head (status line and headers), and largest chunk-size line or trailer section.
MAX_HEAD_BYTES: Final = 64 * 1024
MAX_CHUNK_LINE_BYTES: Final = 4 * 1024
# Parsed heads remembered, and the largest head remembered.
MAX_REMEMBERED_HEADS: Final = 256
MAX_REMEMBERED_HEAD_BYTES: Final = 2048
# Reading from the agent pauses above this many bytes not yet taken by the client.
HIGH_WATER_BYTES: Final = 256 * 1024
LOW_WATER_BYTES: Final = 64 * 1024
# Requests that may be sent twice (RFC 9110 section 9.2.2).
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})

_TOKEN_CHARS = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
# Field values: visible characters, space, tab and obs-text (as decoded below); no controls.
_VALUE_CHARS = r"[\t\x20-\x7e\x80-\U0010ffff]"
# The whole head in one match: status line, then "name:value" lines, then the empty line.
# A line that starts with whitespace (obs-fold), a space before the colon, a bare CR or
# LF, or a control character fails the match.
_HEAD = re.compile(
    rf"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: {_VALUE_CHARS}*)?\r\n"
    rf"((?:{_TOKEN_CHARS}+:{_VALUE_CHARS}*\r\n)*)\r\n"
)
_CHUNK_LINE = re.compile(
    rf"([0-9A-Fa-f]{{1,15}})[ \t]*(?:;[ \t]*{_TOKEN_CHARS}+(?:[ \t]*=[ \t]*"
    rf'(?:{_TOKEN_CHARS}+|"(?:[\t\x20\x21\x23-\x5b\x5d-\x7e]|\\[\t\x20-\x7e])*"))?[ \t]*)*'
)
# The response header fields that decide how the body is framed and the connection's fate.
_FRAMING_FIELDS = frozenset({"content-length", "transfer-encoding", "connection"})
_TRAILERS = re.compile(rf"(?:{_TOKEN_CHARS}+:{_VALUE_CHARS}*\r\n)*\r\n")
_DIGITS = re.compile(r"[0-9]{1,18}")

# Parser states.
_HEADS: Final = 0
_LENGTH: Final = 1
_CHUNK_SIZE: Final = 2
_CHUNK_DATA: Final = 3
_CHUNK_END: Final = 4
_TRAILER: Final = 5
_UNTIL_CLOSE: Final = 6
_DONE: Final = 7


@dataclass(frozen=True, slots=True)
class _Head:
    """A final response head as parsed, and what it says about framing."""

    status: int
    headers: tuple[tuple[str, str], ...]
    content_length: int | None
    chunked: bool
    keep_alive: bool


def _parse_head(raw: bytes) -> _Head | None:
    """The head ``raw`` (ending in the empty line); None for an interim (1xx) response.

    Raises AgentResponseInvalid for anything HTTP/1.1 does not allow, or
    that would leave the body's end ambiguous.
    """
    match = _HEAD.fullmatch(raw.decode("utf-8", "surrogateescape"))
    if match is None:
        raise AgentResponseInvalid("a malformed response head")
    status = int(match[2])
    if status > 599:
        raise AgentResponseInvalid(f"an invalid status {status}")
    if status < 200:
        if status == 101:
            raise AgentResponseInvalid("a protocol switch that was not asked for")
        return None
    headers = []
    framing = []
    for line in match[3].split("\r\n")[:-1]:
        name, _, value = line.partition(":")
        value = value.strip(" \t")
        headers.append((name, value))
        lowered = name.lower()
        if lowered in _FRAMING_FIELDS:
            framing.append((lowered, value))
    lengths: set[str] = set()
    codings: list[str] = []
    keep_alive = match[1] == "1"
    for name, value in framing:
        parts = [part.strip(" \t").lower() for part in value.split(",")]
        if name == "content-length":
            lengths.update(parts)
        elif name == "transfer-encoding":
            codings += parts
        elif "close" in parts:
            keep_alive = False
    if lengths and (len(lengths) > 1 or not _DIGITS.fullmatch(next(iter(lengths)))):
        raise AgentResponseInvalid(f"Content-Length {sorted(lengths)!r} is not one number")
    if codings and (codings != ["chunked"] or lengths or match[1] == "0"):
        raise AgentResponseInvalid(
            f"Transfer-Encoding {', '.join(codings)!r} is not a single 'chunked' "
            "without Content-Length"
        )
    return _Head(
        status=status,
        headers=tuple(headers),
        content_length=int(next(iter(lengths))) if lengths else None,
        chunked=bool(codings),
        keep_alive=keep_alive,
    )


class AgentUnreachable(Unavailable):
    """The agent could not be reached, or closed the connection before its response."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="AgentUnreachable")


class AgentResponseInvalid(Unavailable):
    """The agent's response broke HTTP/1.1's framing rules, or broke off mid-body."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="AgentResponseInvalid")


class _StaleConnection(Exception):
    """A reused connection ended before any byte of the response arrived."""


# Compared by identity: the pool makes one per base URL, and hashing three fields on
# every request showed in profiles.
@dataclass(frozen=True, slots=True, eq=False)
class Origin:
    """Where an agent listens: ``http://host:port`` plus a path prefix for every target."""

    host: str
    port: int
    prefix: str

    @staticmethod
    def parse(base_url: str) -> Origin | None:
        """The origin of an ``http://`` base URL; None for any other scheme or a malformed one."""
        try:
            parts = urlsplit(base_url)
            port = parts.port or 80
        except ValueError:
            return None
        if parts.scheme != "http" or not parts.hostname or parts.query or parts.fragment:
            return None
        if parts.username is not None or parts.password is not None:
            return None
        return Origin(host=parts.hostname, port=port, prefix=parts.path.rstrip("/"))


class UpstreamResponse:
    """One response from an agent: status and headers, then the body as it arrives.

    Call :meth:`close` when done with it (also after an error): a response
    not read to its end closes its connection, never returning it to the pool.
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_connection",
        "_eof",
        "_error",
        "_sender",
        "_waiter",
        "content_length",
        "headers",
        "status",
    )

    def __init__(self, connection: _Connection) -> None:
        self.status = 0
        # As the agent sent them, names and values decoded as UTF-8 (surrogateescape).
        self.headers: tuple[tuple[str, str], ...] = ()
        # The declared body length, None for chunked or until-close bodies.
        self.content_length: int | None = None
        self._connection: _Connection | None = connection
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._eof = False
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._sender: asyncio.Task[None] | None = None

    @property
    def complete(self) -> bool:
        """Whether the whole body has arrived (it may still wait to be read)."""
        return self._eof and self._error is None

    @property
    def buffered(self) -> int:
        """Body bytes that arrived and were not read yet."""
        return self._buffered

    async def read_all(self) -> bytes:
        """The rest of the body in one piece; only for bodies known to be small.

        Raises AgentResponseInvalid when the body breaks off.
        """
        while not self._eof:
            await self._wait()
        self._raise_error()
        body = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return body

    async def read_chunk(self, limit: int) -> bytes:
        """The next at most ``limit`` body bytes as soon as any are there; b"" at the end.

        Raises AgentResponseInvalid when the body breaks off.
        """
        while not self._chunks:
            if self._eof:
                self._raise_error()
                return b""
            await self._wait()
        chunk = self._chunks.popleft()
        if len(chunk) > limit:
            self._chunks.appendleft(chunk[limit:])
            chunk = chunk[:limit]
        self._buffered -= len(chunk)
        connection = self._connection
        if connection is not None and connection.paused and self._buffered <= LOW_WATER_BYTES:
            connection.resume_reading()
        return chunk

    def close(self) -> None:
        """Let go of the response; a connection still receiving it is closed."""
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()
        connection = self._connection
        self._connection = None
        if connection is not None and connection.response is self:
            connection.abort()

    # --- fed by the connection ---------------------------------------------------------

    def _feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        self._wake()

    def _finish(self, error: Exception | None = None) -> None:
        if not self._eof:
            self._eof = True
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def _wait(self) -> None:
        connection = self._connection
        if connection is not None and connection.paused:
            # The reader wants more than is buffered: backpressure has done its job.
            connection.resume_reading()
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None

    def _raise_error(self) -> None:
        if self._error is not None:
            raise AgentResponseInvalid(f"the agent's response broke off: {self._error}")


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an agent, carrying one exchange at a time."""

    def __init__(self, pool: UpstreamPool, origin: Origin) -> None:
        self._pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.paused = False
        # Exchanges sent on this connection so far (0: fresh).
        self.uses = 0
        self.idle_since = 0.0
        self.response: UpstreamResponse | None = None
        self._head: asyncio.Future[UpstreamResponse] | None = None
        self._head_request = False
        self._reusable = True
        self._request_sent = False
        self._received = False
        self._state = _DONE
        self._remaining = 0
        self._rest = b""
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though uvloop's does not subclass asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.response is None:
            # Nothing was asked: whatever this is, the connection is out of step.
            logger.info("agent at %s:%d sent bytes unasked", self.origin.host, self.origin.port)
            self.abort()
            return
        self._received = True
        if self._rest:
            data = self._rest + data
            self._rest = b""
        try:
            self._parse(data)
        except AgentResponseInvalid as exc:
            self._fail(exc)

    def eof_received(self) -> bool:
        self._ended(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended(exc)
        self.closed = True
        self.transport = None
        self._pool._forget(self)
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_exception(ConnectionResetError("the agent closed the connection"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    # --- the exchange --------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Whether another exchange may start on this connection."""
        return self._reusable and not self.closed and self.transport is not None

    def resume_reading(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def send(
        self,
        head: bytes,
        body: bytes | AsyncIterator[bytes] | None,
        *,
        chunked: bool,
        head_only: bool,
    ) -> tuple[UpstreamResponse, asyncio.Future[UpstreamResponse]]:
        """Start an exchange: the response, and a future set when its head has arrived."""
        assert self.transport is not None and self.response is None
        self.uses += 1
        response = UpstreamResponse(self)
        # The pool's loop: asyncio.get_running_loop() costs a getpid() system call.
        head_waiter: asyncio.Future[UpstreamResponse] = self._pool.loop.create_future()
        self.response = response
        self._head = head_waiter
        self._head_request = head_only
        self._received = False
        self._state = _HEADS
        if body is None or isinstance(body, bytes):
            self.transport.write(head + body if body else head)
            self._request_sent = True
        else:
            self.transport.write(head)
            self._request_sent = False
            response._sender = asyncio.create_task(self._send_body(body, chunked=chunked))
        return response, head_waiter

    async def _send_body(self, chunks: AsyncIterator[bytes], *, chunked: bool) -> None:
        try:
            while True:
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    # The client's body broke off: the agent must never see it as complete.
                    self._body_failed(exc)
                    return
                if self.transport is None:
                    # The agent closed the connection; the response side reports it.
                    return
                if not chunk:
                    continue
                if chunked:
                    self.transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                else:
                    self.transport.write(chunk)
                if self._write_paused:
                    self._drain = self._pool.loop.create_future()
                    try:
                        await self._drain
                    except ConnectionError:
                        return
                    finally:
                        self._drain = None
        finally:
            close = getattr(chunks, "aclose", None)
            if close is not None:
                await close()
        if self.transport is None:
            return
        if chunked:
            self.transport.write(b"0\r\n\r\n")
        self._request_sent = True
        if self._state == _DONE and self.response is not None:
            self._completed()

    def _body_failed(self, exc: Exception) -> None:
        head = self._head
        self._head = None
        if head is not None and not head.done():
            head.set_exception(InvalidArgument(f"the request body broke off: {exc}"))
        self.abort()

    def abort(self) -> None:
        """Close the connection at once; any exchange on it fails."""
        self._reusable = False
        transport = self.transport
        if transport is not None:
            transport.abort()
        self._ended(ConnectionAbortedError("the connection was closed by the proxy"))

    # --- parsing -------------------------------------------------------------------------

    def _parse(self, data: bytes) -> None:
        response = self.response
        assert response is not None
        pos = 0
        size = len(data)
        while pos < size:
            state = self._state
            if state == _LENGTH:
                take = min(self._remaining, size - pos)
                response._feed(data if take == size else data[pos : pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _DONE
            elif state == _HEADS:
                end = data.find(b"\r\n\r\n", pos)
                if end < 0:
                    if size - pos > MAX_HEAD_BYTES:
                        raise AgentResponseInvalid("the response head is too large")
                    if b"\n" in data[pos:].replace(b"\r\n", b""):
                        # Refused now: a head ended by bare LFs would never be complete.
                        raise AgentResponseInvalid("the response head has bare LF line ends")
                    break
                if end + 4 - pos > MAX_HEAD_BYTES:
                    raise AgentResponseInvalid("the response head is too large")
                self._start_body(data[pos : end + 4])
                pos = end + 4
            elif state == _CHUNK_DATA:
                take = min(self._remaining, size - pos)
                response._feed(data if take == size else data[pos : pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _CHUNK_END
            elif state == _CHUNK_SIZE:
                end = data.find(b"\r\n", pos, pos + MAX_CHUNK_LINE_BYTES)
                if end < 0:
                    if size - pos >= MAX_CHUNK_LINE_BYTES:
                        raise AgentResponseInvalid("a chunk-size line is too long")
                    break
                line = _CHUNK_LINE.fullmatch(data[pos:end].decode("latin-1"))
                if line is None:
                    raise AgentResponseInvalid("a malformed chunk-size line")
                self._remaining = int(line[1], 16)
                self._state = _CHUNK_DATA if self._remaining else _TRAILER
                pos = end + 2
            elif state == _CHUNK_END:
                if size - pos < 2:
                    break
                if data[pos : pos + 2] != b"\r\n":
                    raise AgentResponseInvalid("a chunk does not end with CRLF")
                pos += 2
                self._state = _CHUNK_SIZE
            elif state == _TRAILER:
                if data.startswith(b"\r\n", pos):
                    end = pos
                else:
                    end = data.find(b"\r\n\r\n", pos, pos + MAX_HEAD_BYTES)
                    if end < 0:
                        if size - pos >= MAX_HEAD_BYTES:
                            raise AgentResponseInvalid("the trailer section is too large")
                        break
                    end += 2
                # Trailer fields are checked and dropped, as aiohttp's client did.
                if not _TRAILERS.fullmatch(data[pos : end + 2].decode("utf-8", "surrogateescape")):
                    raise AgentResponseInvalid("a malformed trailer section")
                pos = end + 2
                self._state = _DONE
            elif state == _UNTIL_CLOSE:
                response._feed(data if pos == 0 else data[pos:])
                pos = size
            else:
                # _DONE: the response is whole, yet the agent sent more.
                self._reusable = False
                logger.info(
                    "agent at %s:%d sent bytes after its response",
                    self.origin.host,
                    self.origin.port,
                )
                break
            if self._state == _DONE:
                self._completed()
                if self.response is None:
                    # Released to the pool: anything after the response is checked there.
                    if pos < size:
                        self.abort()
                    return
                break
        if pos < size and self._state != _DONE:
            self._rest = data[pos:]
        if (
            self.response is not None
            and response._buffered > HIGH_WATER_BYTES
            and not self.paused
            and self.transport is not None
        ):
            self.paused = True
            self.transport.pause_reading()

    def _start_body(self, raw: bytes) -> None:
        """Take one response head and choose how its body is framed."""
        head = self._pool._head_of(raw)
        if head is None:
            # An interim response: the final one follows.
            return
        response = self.response
        assert response is not None
        response.status = head.status
        response.headers = head.headers
        if not head.keep_alive:
            self._reusable = False
        if self._head_request or head.status in (204, 304):
            self._state = _DONE
        elif head.chunked:
            self._state = _CHUNK_SIZE
        elif head.content_length is not None:
            response.content_length = self._remaining = head.content_length
            self._state = _LENGTH if self._remaining else _DONE
        else:
            self._reusable = False
            self._state = _UNTIL_CLOSE
        head_waiter = self._head
        self._head = None
        if head_waiter is not None and not head_waiter.done():
            head_waiter.set_result(response)

    def _completed(self) -> None:
        """The response is whole: hand over its end; reuse the connection when it is clean."""
        response = self.response
        assert response is not None
        response._finish()
        if not self._request_sent:
            # Answered before the request body was all sent: the agent's reading of the
            # rest of it is unknown, so the connection cannot carry another exchange.
            self._reusable = False
            return
        self.response = None
        response._connection = None
        self.resume_reading()
        if self._reusable and self.transport is not None:
            self._pool._release(self)
        else:
            self.abort()

    def _ended(self, exc: Exception | None) -> None:
        """The connection ended (closed by either side): settle the exchange on it."""
        self._reusable = False
        response = self.response
        if response is None:
            return
        self.response = None
        response._connection = None
        head = self._head
        self._head = None
        if head is not None and not head.done():
            if self._received:
                head.set_exception(AgentResponseInvalid("the connection closed inside the head"))
            elif self.uses > 1:
                head.set_exception(_StaleConnection())
            else:
                reason = f": {exc}" if exc is not None else ""
                head.set_exception(
                    AgentUnreachable(f"the agent closed the connection without answering{reason}")
                )
        if self._state == _UNTIL_CLOSE:
            response._finish()
        elif self._state != _DONE:
            response._finish(exc or ConnectionResetError("the agent closed the connection"))
        self._state = _DONE

    def _fail(self, exc: AgentResponseInvalid) -> None:
        head = self._head
        self._head = None
        if head is not None and not head.done():
            head.set_exception(exc)
        response = self.response
        if response is not None:
            response._finish(exc)
        self.abort()


class UpstreamPool:
    """Keep-alive connections to agents, by address; one exchange per connection at a time.

    Create it inside the running event loop; close it with :meth:`close`.
    Not thread-safe.
    """

    def __init__(self) -> None:
        self._idle: dict[Origin, list[_Connection]] = {}
        self._all: set[_Connection] = set()
        self._origins: dict[tuple[str, Hashable], Origin | None] = {}
        self._closed = False
        self._sweeper: asyncio.TimerHandle | None = None
        # Parsed response heads by their bytes: an agent repeats its heads (Date changes
        # once a second), and parsing is the client's largest cost per request.
        self._heads: dict[bytes, _Head | None] = {}
        self.loop = asyncio.get_running_loop()

    def origin(self, base_url: str, *, partition: Hashable = "") -> Origin | None:
        """The parsed ``base_url`` (cached); None when this client cannot reach it.

        Connections are pooled per origin, and origins of different
        ``partition`` values never share one: an agent that answers late
        (after its response, unasked) would have that answer read as the
        response to the next request on the connection, so callers who must
        not see each other's responses get partitions of their own.
        """
        key = (base_url, partition)
        try:
            return self._origins[key]
        except KeyError:
            pass
        if len(self._origins) > 10_000:
            self._origins.clear()
        origin = self._origins[key] = Origin.parse(base_url)
        return origin

    async def request(
        self,
        origin: Origin,
        method: str,
        target: str,
        *,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> UpstreamResponse:
        """Send one request and return the response once its head has arrived.

        ``method``, ``target`` and ``headers`` must already be valid HTTP
        (:func:`agentapi_proxy.http_rules.check_headers` and friends); a line
        break in any of them is refused with InvalidArgument all the same.
        ``headers`` carry the framing of ``body``: a Content-Length when the
        body is bytes or declared, else the body is sent chunked (a
        Transfer-Encoding header is added here). Raises AgentUnreachable,
        AgentResponseInvalid, or InvalidArgument when a streamed body from
        the client breaks off.
        """
        chunked = body is not None and not isinstance(body, bytes)
        if chunked and any(name.lower() == "content-length" for name, _ in headers):
            chunked = False
        lines = [f"{method} {origin.prefix}{target} HTTP/1.1\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in headers]
        if chunked:
            lines.append("Transfer-Encoding: chunked\r\n")
        lines.append("\r\n")
        text = "".join(lines)
        if text.count("\n") != len(lines) or text.count("\r") != len(lines):
            raise InvalidArgument("a line break inside the request line or a header")
        head = text.encode("utf-8")
        head_only = method == "HEAD"
        replayable = not chunked and method in IDEMPOTENT_METHODS
        if body is not None and not isinstance(body, bytes):
            replayable = False
        connection = self._idle_connection(origin)
        if connection is None:
            connection = await self._connect(origin)
        try:
            return await self._exchange(
                connection, head, body, chunked=chunked, head_only=head_only
            )
        except _StaleConnection:
            if not replayable:
                raise AgentUnreachable(
                    "the agent closed a kept-alive connection as the request went out"
                ) from None
        connection = await self._connect(origin)
        try:
            return await self._exchange(
                connection, head, body, chunked=chunked, head_only=head_only
            )
        except _StaleConnection:
            raise AgentUnreachable("the agent closed the connection without answering") from None

    async def _exchange(
        self,
        connection: _Connection,
        head: bytes,
        body: bytes | AsyncIterator[bytes] | None,
        *,
        chunked: bool,
        head_only: bool,
    ) -> UpstreamResponse:
        response, head_waiter = connection.send(head, body, chunked=chunked, head_only=head_only)
        try:
            return await head_waiter
        except BaseException:
            response.close()
            if head_waiter.done() and not head_waiter.cancelled():
                # Retrieved: closing may have failed it after the await had ended.
                head_waiter.exception()
            raise

    def _idle_connection(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        oldest_allowed = time.monotonic() - IDLE_SECONDS
        while idle:
            connection = idle.pop()
            if connection.usable and connection.idle_since >= oldest_allowed:
                return connection
            connection.abort()
        return None

    async def _connect(self, origin: Origin) -> _Connection:
        if self._closed:
            raise AgentUnreachable("the HTTP client is closed")
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                _, connection = await self.loop.create_connection(
                    lambda: _Connection(self, origin), origin.host, origin.port
                )
        except TimeoutError as exc:
            raise AgentUnreachable(
                f"no connection to {origin.host}:{origin.port} within {CONNECT_TIMEOUT_SECONDS:g}s"
            ) from exc
        except OSError as exc:
            detail = exc.strerror or type(exc).__name__
            raise AgentUnreachable(
                f"no connection to {origin.host}:{origin.port} ({detail})"
            ) from exc
        self._all.add(connection)
        return connection

    def _head_of(self, raw: bytes) -> _Head | None:
        """:func:`_parse_head`, remembered for small heads."""
        try:
            return self._heads[raw]
        except KeyError:
            pass
        head = _parse_head(raw)
        if len(raw) <= MAX_REMEMBERED_HEAD_BYTES:
            if len(self._heads) >= MAX_REMEMBERED_HEADS:
                self._heads.clear()
            self._heads[raw] = head
        return head

    def _release(self, connection: _Connection) -> None:
        idle = self._idle.setdefault(connection.origin, [])
        if self._closed or len(idle) >= MAX_IDLE_PER_ORIGIN:
            connection.abort()
            return
        connection.idle_since = time.monotonic()
        idle.append(connection)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(IDLE_SECONDS, self._sweep)

    def _sweep(self) -> None:
        """Close idle connections past IDLE_SECONDS, so no agent socket is held forever."""
        self._sweeper = None
        oldest_allowed = time.monotonic() - IDLE_SECONDS
        for origin, idle in list(self._idle.items()):
            kept = [c for c in idle if c.usable and c.idle_since >= oldest_allowed]
            for connection in idle:
                if connection not in kept:
                    connection.abort()
            if kept:
                self._idle[origin] = kept
            else:
                del self._idle[origin]
        if self._idle and not self._closed:
            self._sweeper = self.loop.call_later(IDLE_SECONDS, self._sweep)

    def _forget(self, connection: _Connection) -> None:
        self._all.discard(connection)

    async def close(self) -> None:
        """Close every connection, idle or busy; exchanges still running fail."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for connection in list(self._all):
            connection.abort()
        self._all.clear()
        self._idle.clear()
        # Let the transports run their close callbacks before the loop may end.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0)
