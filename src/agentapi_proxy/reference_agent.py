"""The reference agent: a small server that speaks the agentapi HTTP API.

It lets the whole system run on a machine with nothing else installed. It is
started per agent by the process driver::

    python -m agentapi_proxy.reference_agent --port PORT [--host 127.0.0.1]
        [--allowed-hosts LIST]

and answers every user message by echoing it back, the way a coding agent
would answer: the agent message grows in a few steps (one ``message_update``
with the same id per step) while the status is ``running``, then the status
returns to ``stable``. The wire format follows ``docs/agentapi-http.md``.

Where the real agentapi leaves room, this server decides as follows:

- ``POST /message`` with type ``user`` while the agent is ``running`` answers
  409 with agentapi's own wording ("message can only be sent when the agent is
  waiting for user input"); the real server sends the same detail with a 500.
  Only one message is answered at a time.
- Type ``raw`` is keystrokes for the terminal in agentapi: it is written to
  stdout, never stored in the history, changes no status and is accepted at
  any time.
- Malformed JSON answers 400; a well-formed body with a missing or wrong
  ``content``/``type`` answers 422 "validation failed" with one entry per
  problem in ``errors`` (huma's style); empty content answers 400. Every error
  body is a problem document with ``title``, ``status``, ``detail`` and
  ``errors`` (always a list here; huma omits it when empty).
- Requests whose ``Host`` is not allowed answer 400 with agentapi's detail
  ("Invalid host header. Allowed hosts: ..."), as a problem document rather than
  agentapi's plain text. ``/health`` and ``/ready`` (which agentapi does not
  have) skip the check so that probes sending a pod IP as Host still work; they
  reveal nothing about the conversation.
- Uploads are stored under ``./uploads/<first 16 hex of sha256>/<basename>``
  (the working directory at start-up); files over 10 MiB answer 413.
- An SSE subscriber whose queue (``--sse-queue-size`` events) fills up is
  dropped: its connection is aborted at once, so neither the agent nor other
  subscribers ever wait for it. A client that reconnects gets the rebuild
  events again and so a consistent view (agentapi closes slow subscribers too).
- The history starts empty; message ids count from 0.

Every received message and every answer is logged to stdout (line-buffered by
the logging handler), which is what ends up in the control plane's per-agent
log. SIGTERM or SIGINT ends open SSE streams and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import re
import signal
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path, PurePosixPath
from typing import Literal, NotRequired, TypedDict
from urllib.parse import urlsplit

from aiohttp import BodyPartReader, web
from aiohttp.typedefs import Handler

from agentapi_proxy.errors import AgentApiError, InvalidArgument, Unavailable

logger = logging.getLogger(__name__)

Role = Literal["user", "agent"]
Status = Literal["running", "stable"]

DEFAULT_PORT = 3284
DEFAULT_ALLOWED_HOSTS = ("localhost", "127.0.0.1", "[::1]")
ALLOWED_HOSTS_ENV = "AGENTAPI_ALLOWED_HOSTS"
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
BUSY_DETAIL = "message can only be sent when the agent is waiting for user input"

# Steps in which an answer grows; each step is one message_update event.
_ANSWER_STEPS = 4
_KEEPALIVE_CHUNK = b": keepalive\n\n"
# Routes outside agentapi's API that probes call; they skip the host check.
_PROBE_PATHS = frozenset({"/health", "/ready"})
# Longest piece of a message written to the log; a line per message, not per megabyte.
_LOG_PREVIEW_CHARS = 200


class ProblemItem(TypedDict):
    message: str
    location: str
    value: NotRequired[object]


class MessageJson(TypedDict):
    id: int
    content: str
    role: Role
    time: str


class HttpProblem(AgentApiError):
    """A request this server answers with a problem document of the given HTTP status."""

    def __init__(self, status: int, detail: str, *, errors: Sequence[ProblemItem] = ()) -> None:
        super().__init__(detail)
        self.status = status
        self.errors = list(errors)


@dataclass(frozen=True)
class Options:
    """How one reference agent runs; built from the command line by :func:`parse_options`."""

    port: int = DEFAULT_PORT
    host: str = "127.0.0.1"
    # None allows every Host; otherwise lower-case host names without port or brackets.
    allowed_hosts: frozenset[str] | None = frozenset({"localhost", "127.0.0.1", "::1"})
    agent_type: str = "custom"
    step_delay: float = 0.03
    sse_keepalive: float = 15.0
    sse_queue_size: int = 1024


def _hostname(value: str) -> str | None:
    """The lower-case host name in ``host[:port]``, or None when it is not a plain host."""
    if not value or any(char in value for char in "/?#@\\") or any(c.isspace() for c in value):
        return None
    try:
        parts = urlsplit("http://" + value)
        # Reading .port validates it; a Host with a bad port is rejected like agentapi does.
        _ = parts.port
    except ValueError:
        return None
    return parts.hostname or None


def parse_allowed_hosts(raw: str) -> frozenset[str] | None:
    """Parse an allowed-hosts list (commas or whitespace between entries).

    Returns None when ``*`` is among the entries (every Host allowed). Raises
    :class:`InvalidArgument` for an empty list or an entry with a scheme, a port
    or anything else than a host name.
    """
    items = [item for item in re.split(r"[\s,]+", raw) if item]
    if not items:
        raise InvalidArgument("allowed hosts: the list must not be empty")
    if "*" in items:
        return None

    hosts = set()
    for item in items:
        if "://" in item:
            raise InvalidArgument(f"allowed hosts: {item!r} must not include a scheme")
        hostname = _hostname(item)
        if hostname is None:
            raise InvalidArgument(f"allowed hosts: {item!r} is not a valid host")
        if urlsplit("http://" + item).port is not None:
            raise InvalidArgument(f"allowed hosts: {item!r} must not include a port")
        hosts.add(hostname)
    return frozenset(hosts)


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535, got {text}")
    return value


def parse_options(argv: Sequence[str] | None = None) -> Options:
    """Build :class:`Options` from ``argv`` and ``AGENTAPI_ALLOWED_HOSTS``.

    ``--allowed-hosts`` wins over the environment variable, which wins over the
    default (localhost, 127.0.0.1, [::1]). Exits 2 on a malformed flag; raises
    :class:`InvalidArgument` for a bad allowed-hosts list.
    """
    parser = argparse.ArgumentParser(
        prog="python -m agentapi_proxy.reference_agent",
        description="Echoing agent that speaks the agentapi HTTP API.",
    )
    parser.add_argument("--port", type=_port, default=DEFAULT_PORT, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--allowed-hosts",
        default=None,
        help=f"Host header names accepted (comma separated, * for all); env {ALLOWED_HOSTS_ENV}",
    )
    parser.add_argument("--agent-type", default="custom", help="reported as agent_type")
    parser.add_argument(
        "--step-delay",
        type=_non_negative_float,
        default=0.03,
        help="seconds between the growth steps of an answer",
    )
    parser.add_argument(
        "--sse-keepalive",
        type=_positive_float,
        default=15.0,
        help="seconds of silence after which an SSE comment is sent",
    )
    parser.add_argument(
        "--sse-queue-size",
        type=_positive_int,
        default=1024,
        help="events queued per SSE subscriber before it is dropped as too slow",
    )
    args = parser.parse_args(argv)

    raw_hosts = args.allowed_hosts
    if raw_hosts is None:
        raw_hosts = os.environ.get(ALLOWED_HOSTS_ENV) or ",".join(DEFAULT_ALLOWED_HOSTS)
    return Options(
        port=args.port,
        host=args.host,
        allowed_hosts=parse_allowed_hosts(raw_hosts),
        agent_type=args.agent_type,
        step_delay=args.step_delay,
        sse_keepalive=args.sse_keepalive,
        sse_queue_size=args.sse_queue_size,
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _preview(text: str) -> str:
    if len(text) <= _LOG_PREVIEW_CHARS:
        return repr(text)
    return f"{text[:_LOG_PREVIEW_CHARS]!r}... ({len(text)} chars)"


def _sse_chunk(event: str, data: object) -> bytes:
    # json.dumps escapes newlines, so the data always fits on one SSE line.
    payload = json.dumps(data, separators=(",", ":"))
    return f"event: {event}\ndata: {payload}\n\n".encode()


@dataclass
class _Message:
    id: int
    role: Role
    content: str
    time: str

    def as_json(self) -> MessageJson:
        return {"id": self.id, "content": self.content, "role": self.role, "time": self.time}

    def as_event(self) -> bytes:
        return _sse_chunk(
            "message_update",
            {"id": self.id, "message": self.content, "role": self.role, "time": self.time},
        )


class Subscriber:
    """One SSE stream's bounded queue of encoded events."""

    def __init__(self, *, limit: int, on_overflow: Callable[[], None]) -> None:
        self._pending: deque[bytes] = deque()
        self._limit = limit
        self._on_overflow = on_overflow
        self._wakeup = asyncio.Event()
        self._closed = False

    def offer(self, chunk: bytes) -> bool:
        """Queue ``chunk`` without waiting.

        Returns False when the subscriber is closed or its queue is full; a full
        queue closes it, drops what it held and calls ``on_overflow``.
        """
        if self._closed:
            return False
        if len(self._pending) >= self._limit:
            self._pending.clear()
            self.close()
            self._on_overflow()
            return False
        self._pending.append(chunk)
        self._wakeup.set()
        return True

    def close(self) -> None:
        """Let the stream end once what is queued has been taken. Idempotent."""
        self._closed = True
        self._wakeup.set()

    async def next_chunk(self) -> bytes | None:
        """Wait for the next queued chunk; None once closed and drained.

        Safe to cancel: a chunk is only taken off the queue when it is returned.
        """
        while not self._pending:
            if self._closed:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._pending.popleft()


class Conversation:
    """The agent's messages and status, and the fan-out of their changes.

    Runs on the event loop only. No method awaits, so a new subscriber's
    rebuild events and its queue never miss or repeat an event.
    """

    def __init__(self, *, agent_type: str, queue_size: int) -> None:
        self.agent_type = agent_type
        self._queue_size = queue_size
        self._messages: list[_Message] = []
        self._status: Status = "stable"
        self._subscribers: set[Subscriber] = set()

    @property
    def status(self) -> Status:
        return self._status

    def messages(self) -> list[MessageJson]:
        return [message.as_json() for message in self._messages]

    def add_message(self, role: Role, content: str) -> _Message:
        message = _Message(id=len(self._messages), role=role, content=content, time=_now())
        self._messages.append(message)
        self._publish(message.as_event())
        return message

    def grow_message(self, message: _Message, content: str) -> None:
        message.content = content
        self._publish(message.as_event())

    def set_status(self, status: Status) -> None:
        if status == self._status:
            return
        self._status = status
        self._publish(self._status_event())

    def subscribe(self, *, on_overflow: Callable[[], None]) -> tuple[Subscriber, list[bytes]]:
        """Register a subscriber; also return the events that rebuild the current state."""
        rebuild = [message.as_event() for message in self._messages]
        rebuild.append(self._status_event())
        subscriber = Subscriber(limit=self._queue_size, on_overflow=on_overflow)
        self._subscribers.add(subscriber)
        return subscriber, rebuild

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """Forget ``subscriber``. Idempotent."""
        self._subscribers.discard(subscriber)
        subscriber.close()

    def close_subscribers(self) -> None:
        """End every stream after what it has queued (used at shutdown)."""
        for subscriber in self._subscribers:
            subscriber.close()
        self._subscribers.clear()

    def _status_event(self) -> bytes:
        return _sse_chunk("status_change", {"status": self._status, "agent_type": self.agent_type})

    def _publish(self, chunk: bytes) -> None:
        for subscriber in list(self._subscribers):
            if not subscriber.offer(chunk):
                self._subscribers.discard(subscriber)
                logger.warning(
                    "dropped a slow SSE subscriber: its queue of %d events was full",
                    self._queue_size,
                )


def _problem_response(
    status: int, detail: str, *, errors: Sequence[ProblemItem] = ()
) -> web.Response:
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body = {"title": title, "status": status, "detail": detail, "errors": list(errors)}
    return web.json_response(body, status=status, content_type="application/problem+json")


@web.middleware
async def _problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place where failures become problem documents."""
    try:
        return await handler(request)
    except HttpProblem as problem:
        return _problem_response(problem.status, problem.message, errors=problem.errors)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _problem_response(exc.status, exc.reason)
    except Exception:
        logger.exception("unexpected failure answering %s %s", request.method, request.path)
        return _problem_response(500, "internal error")


def _validation_problem(errors: Sequence[ProblemItem]) -> HttpProblem:
    return HttpProblem(422, "validation failed", errors=errors)


def _parse_message_request(body: object) -> tuple[str, Literal["user", "raw"]]:
    """The ``content`` and ``type`` of a POST /message body; raises a 422 problem."""
    if not isinstance(body, dict):
        raise _validation_problem(
            [{"message": "expected object", "location": "body", "value": body}]
        )

    errors: list[ProblemItem] = []
    content = body.get("content")
    if "content" not in body:
        errors.append(
            {"message": "expected required property content to be present", "location": "body"}
        )
    elif not isinstance(content, str):
        errors.append({"message": "expected string", "location": "body.content", "value": content})
    kind = body.get("type")
    if "type" not in body:
        errors.append(
            {"message": "expected required property type to be present", "location": "body"}
        )
    elif kind not in ("user", "raw"):
        errors.append(
            {
                "message": 'expected value to be one of "user, raw"',
                "location": "body.type",
                "value": kind,
            }
        )
    if errors or not isinstance(content, str):
        raise _validation_problem(errors)
    return content, "user" if kind == "user" else "raw"


def _store_upload(upload_dir: Path, *, filename: str, data: bytes) -> Path:
    """Write ``data`` as ``upload_dir/<digest>/<basename of filename>``; blocking."""
    name = PurePosixPath(filename.replace("\\", "/")).name
    if name in ("", ".", ".."):
        name = "upload"
    target_dir = upload_dir / hashlib.sha256(data).hexdigest()[:16]
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / name
        target.write_bytes(data)
    except OSError as exc:
        raise HttpProblem(500, f"failed to store the upload: {exc.strerror}") from exc
    return target.resolve()


class ReferenceAgent:
    """The HTTP face of one echoing agent; :meth:`create_app` builds its aiohttp app."""

    def __init__(self, options: Options, *, upload_dir: Path) -> None:
        self._options = options
        self._upload_dir = upload_dir
        self._conversation = Conversation(
            agent_type=options.agent_type, queue_size=options.sse_queue_size
        )
        self._answers: set[asyncio.Task[None]] = set()
        self._shutting_down = False

    def create_app(self) -> web.Application:
        app = web.Application(
            middlewares=[_problem_middleware, self._host_middleware],
            # Large messages and uploads are the agent's business (K07), not a transport limit.
            client_max_size=MAX_UPLOAD_BYTES + 1024 * 1024,
        )
        app.router.add_get("/status", self._handle_status)
        app.router.add_get("/messages", self._handle_messages)
        app.router.add_post("/message", self._handle_message)
        app.router.add_post("/upload", self._handle_upload)
        app.router.add_get("/events", self._handle_events)
        app.router.add_get("/health", self._handle_health)
        app.router.add_get("/ready", self._handle_ready)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        return app

    @web.middleware
    async def _host_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        allowed = self._options.allowed_hosts
        if allowed is None or request.path in _PROBE_PATHS:
            return await handler(request)

        # request.host would fall back to the local name when Host is missing.
        hostname = _hostname(request.headers.get("Host", ""))
        if hostname is None or hostname not in allowed:
            shown = ", ".join(sorted(allowed))
            raise HttpProblem(400, f"Invalid host header. Allowed hosts: {shown}")
        return await handler(request)

    async def _handle_status(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "agent_type": self._options.agent_type,
                "status": self._conversation.status,
                "transport": "pty",
            }
        )

    async def _handle_messages(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"messages": self._conversation.messages()})

    async def _handle_message(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise HttpProblem(400, f"request body is not valid JSON: {exc}") from exc
        content, kind = _parse_message_request(body)

        if kind == "raw":
            logger.info("received raw input %s", _preview(content))
            return web.json_response({"ok": True})

        text = content.strip()
        if not text:
            raise HttpProblem(400, "message must not be empty")
        if self._conversation.status != "stable":
            raise HttpProblem(409, BUSY_DETAIL)

        message = self._conversation.add_message("user", text)
        self._conversation.set_status("running")
        logger.info("received message %d: %s", message.id, _preview(text))
        task = asyncio.create_task(self._answer(text))
        self._answers.add(task)
        task.add_done_callback(self._answers.discard)
        return web.json_response({"ok": True})

    async def _answer(self, text: str) -> None:
        """Echo ``text`` as an agent message that grows in steps, then go stable."""
        reply = f"echo: {text}"
        cuts = [len(reply) * step // _ANSWER_STEPS for step in range(1, _ANSWER_STEPS + 1)]
        delay = self._options.step_delay

        await asyncio.sleep(delay)
        message = self._conversation.add_message("agent", reply[: cuts[0]])
        for cut in cuts[1:]:
            await asyncio.sleep(delay)
            self._conversation.grow_message(message, reply[:cut])
        self._conversation.set_status("stable")
        logger.info("answered with message %d: %s", message.id, _preview(reply))

    async def _handle_upload(self, request: web.Request) -> web.StreamResponse:
        if request.content_type != "multipart/form-data":
            raise HttpProblem(400, "expected a multipart/form-data body with a 'file' field")

        try:
            reader = await request.multipart()
            async for part in reader:
                if not isinstance(part, BodyPartReader) or part.name != "file":
                    continue
                data = await self._read_upload(part)
                path = await asyncio.to_thread(
                    _store_upload, self._upload_dir, filename=part.filename or "", data=data
                )
                logger.info("stored upload %s (%d bytes)", path, len(data))
                return web.json_response({"ok": True, "filePath": str(path)})
        except ValueError as exc:
            raise HttpProblem(400, f"malformed multipart body: {exc}") from exc

        raise _validation_problem(
            [{"message": "expected required property file to be present", "location": "body"}]
        )

    @staticmethod
    async def _read_upload(part: BodyPartReader) -> bytes:
        data = bytearray()
        while chunk := await part.read_chunk(64 * 1024):
            data += chunk
            if len(data) > MAX_UPLOAD_BYTES:
                raise HttpProblem(413, "file size exceeds 10MB limit")
        return bytes(data)

    async def _handle_events(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport

        def abort() -> None:
            # A slow reader holds the writer in drain(); aborting frees it at once.
            if transport is not None:
                transport.abort()

        subscriber, rebuild = self._conversation.subscribe(on_overflow=abort)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache, no-store, must-revalidate",
                "X-Accel-Buffering": "no",
            }
        )
        try:
            await response.prepare(request)
            for chunk in rebuild:
                await response.write(chunk)
            while True:
                try:
                    async with asyncio.timeout(self._options.sse_keepalive):
                        chunk_or_end = await subscriber.next_chunk()
                except TimeoutError:
                    await response.write(_KEEPALIVE_CHUNK)
                    continue
                if chunk_or_end is None:
                    break
                await response.write(chunk_or_end)
        except ConnectionResetError:
            logger.debug("SSE subscriber went away")
        finally:
            self._conversation.unsubscribe(subscriber)
        return response

    async def _handle_health(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"ok": True})

    async def _handle_ready(self, request: web.Request) -> web.StreamResponse:
        if self._shutting_down:
            raise HttpProblem(503, "shutting down")
        return web.json_response({"ok": True})

    async def _on_shutdown(self, app: web.Application) -> None:
        self._shutting_down = True
        self._conversation.close_subscribers()

    async def _on_cleanup(self, app: web.Application) -> None:
        for task in self._answers:
            task.cancel()
        await asyncio.gather(*self._answers, return_exceptions=True)


async def serve(options: Options) -> None:
    """Serve until SIGTERM or SIGINT, then close every stream and return.

    Raises :class:`Unavailable` when the address cannot be bound.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[str] = []

    def on_signal(signum: signal.Signals) -> None:
        received.append(signum.name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    agent = ReferenceAgent(options, upload_dir=Path.cwd() / "uploads")
    runner = web.AppRunner(
        agent.create_app(),
        handle_signals=False,
        access_log=None,
        handler_cancellation=True,
        # Backstop only: streams are ended in on_shutdown; this bounds a stuck write.
        shutdown_timeout=2.0,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, options.host, options.port)
        try:
            await site.start()
        except OSError as exc:
            raise Unavailable(
                f"cannot listen on {options.host}:{options.port}: {exc.strerror}"
            ) from exc

        port = runner.addresses[0][1] if runner.addresses else options.port
        hosts = "*" if options.allowed_hosts is None else ",".join(sorted(options.allowed_hosts))
        logger.info(
            "reference agent listening on http://%s:%d pid=%d agent_id=%s session_id=%s "
            "agent_type=%s allowed_hosts=%s",
            options.host,
            port,
            os.getpid(),
            os.environ.get("AGENT_ID", ""),
            os.environ.get("SESSION_ID", ""),
            options.agent_type,
            hosts,
        )
        await stop.wait()
        logger.info("received %s, shutting down", received[0] if received else "stop")
    finally:
        await runner.cleanup()
    logger.info("reference agent stopped")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the reference agent; returns the process exit code (0 after SIGTERM)."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stdout,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    try:
        options = parse_options(argv)
        asyncio.run(serve(options))
    except AgentApiError as exc:
        logger.error("%s", exc.message)
        return 2 if isinstance(exc, InvalidArgument) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
