"""The client commands of ``agentapi-proxy``: create, list, get, delete and logs.

They speak gRPC to a running control plane, so a person needs neither curl
nor grpcurl. The address is ``--address``, else the setting
``client.address``, else ``gateway.control_plane``; the API key is
``--api-key``, else ``client.api_key`` (``AGENTAPI_CLIENT_API_KEY``), and is
sent as ``x-api-key`` metadata. The key is never printed.

Output follows kubectl: results on stdout (ids, tables, JSON, log bytes),
progress and errors on stderr, one line ``agentapi-proxy: CODE: details`` per
failed call. Exit codes: 0 success, 1 a call or the agent failed, 2 wrong
usage or settings, 130 interrupted with Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TextIO

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from agentapi_proxy import errors, status
from agentapi_proxy.settings import ENV_PREFIX, SettingsError, load_settings, unknown_env_names
from agentapi_proxy.v1 import agent_service_pb2 as pb
from agentapi_proxy.v1 import agent_service_pb2_grpc as pb_grpc

PROG: Final = "agentapi-proxy"
COMMANDS: Final = frozenset({"create", "list", "get", "delete", "logs"})

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130

DEFAULT_WAIT_SECONDS: Final = 60.0
API_KEY_METADATA: Final = "x-api-key"
CLIENT_ENV_PREFIX: Final = ENV_PREFIX + "CLIENT_"

_ADDRESS = re.compile(r".+:\d{1,5}")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|h|m|s)")
_STATE_PREFIX = "AGENT_STATE_"
_CODE_TO_ERROR: Final = {code: cls for cls, code in status.CODES.items()}
# Seconds between redraws of the spinner on a terminal.
_SPIN_INTERVAL = 0.1


# --- the command line --------------------------------------------------------


def add_commands(
    parser: argparse.ArgumentParser,
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Add the global client options to ``parser`` and the client subcommands to ``commands``.

    ``--address`` and ``--api-key`` are accepted before and after the
    subcommand; :func:`run` handles the parsed namespace of any command in
    :data:`COMMANDS`.
    """
    _add_connection_options(parser, default=None)
    connection = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand that is not given the option keeps the value given before it.
    _add_connection_options(connection, default=argparse.SUPPRESS)
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument(
        "-o",
        "--output",
        choices=("table", "json"),
        default="table",
        help="table (default) or proto3 JSON with the proto field names",
    )

    create = commands.add_parser(
        "create",
        parents=[connection],
        help="create an agent and wait until it is ready",
        description="Create an agent in SESSION, print its id on stdout, then show its "
        "progress on stderr until it is ready. Exits 1 if it fails or the wait times out "
        "(the agent is left as it is).",
    )
    create.add_argument("session", metavar="SESSION", help="session the agent belongs to")
    create.add_argument("--id", dest="agent_id", default="", help="agent id (default: generated)")
    create.add_argument(
        "--env",
        metavar="K=V",
        type=_key_value,
        action="append",
        default=[],
        help="environment variable for the agent (repeatable)",
    )
    create.add_argument(
        "--label",
        metavar="K=V",
        type=_key_value,
        action="append",
        default=[],
        help="label of the agent (repeatable)",
    )
    create.add_argument("--no-wait", action="store_true", help="return once the agent is created")
    create.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive_seconds,
        default=DEFAULT_WAIT_SECONDS,
        help=f"how long to wait for the agent to be ready (default {DEFAULT_WAIT_SECONDS:g})",
    )

    listing = commands.add_parser(
        "list", parents=[connection, output], help="list agents", description="List agents."
    )
    listing.add_argument("--session", default="", help="only the agents of this session")

    get = commands.add_parser(
        "get", parents=[connection, output], help="show one agent", description="Show one agent."
    )
    get.add_argument("agent_id", metavar="ID")

    delete = commands.add_parser(
        "delete",
        parents=[connection],
        help="delete agents",
        description="Stop agents and remove everything they own. Every id is tried; "
        "exits 1 if any of them failed.",
    )
    delete.add_argument("agent_ids", metavar="ID", nargs="+")

    logs = commands.add_parser(
        "logs",
        parents=[connection],
        help="print an agent's log",
        description="Print an agent's log with the options of kubectl logs.",
    )
    logs.add_argument("agent_id", metavar="ID")
    logs.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new lines until the agent goes"
    )
    logs.add_argument(
        "--tail", metavar="N", type=int, default=-1, help="only the last N lines (-1: all)"
    )
    since = logs.add_mutually_exclusive_group()
    since.add_argument(
        "--since",
        metavar="DURATION",
        type=_duration,
        help="only lines newer than this, e.g. 30s, 5m, 2h, 1h30m",
    )
    since.add_argument(
        "--since-time",
        metavar="RFC3339",
        type=_rfc3339,
        help="only lines at or after this time, e.g. 2026-01-02T15:04:05Z",
    )
    logs.add_argument("--timestamps", action="store_true", help="prefix each line with its time")
    logs.add_argument(
        "-p", "--previous", action="store_true", help="the log of the agent's previous run"
    )
    logs.add_argument(
        "--limit-bytes", metavar="N", type=_positive_int, help="stop after N bytes of log"
    )


def _add_connection_options(parser: argparse.ArgumentParser, *, default: Any) -> None:
    parser.add_argument(
        "--address",
        metavar="HOST:PORT",
        type=_address,
        default=default,
        help="control plane to talk to (default: setting client.address, else "
        "gateway.control_plane)",
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        default=default,
        help="API key (default: setting client.api_key; prefer AGENTAPI_CLIENT_API_KEY, "
        "since command lines are visible to other users)",
    )


def reject_connection_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with a usage error if a server command was given a client-only option."""
    given = [
        flag
        for flag, name in (("--address", "address"), ("--api-key", "api_key"))
        if getattr(args, name, None) is not None
    ]
    if given:
        verb = "apply" if len(given) > 1 else "applies"
        parser.error(f"{' and '.join(given)} only {verb} to {', '.join(sorted(COMMANDS))}")


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected K=V, got {text!r}")
    return key, value


def _address(text: str) -> str:
    if not _ADDRESS.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return seconds


def _positive_int(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return number


def _duration(text: str) -> timedelta:
    """A Go-style duration such as ``90s``, ``5m`` or ``1h30m`` (what kubectl accepts)."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = list(_DURATION_PART.finditer(text))
    if not parts or "".join(part[0] for part in parts) != text:
        raise argparse.ArgumentTypeError(f"expected a duration such as 30s, 5m or 2h, got {text!r}")
    seconds = sum(float(part[1]) * units[part[2]] for part in parts)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive duration, got {text!r}")
    return timedelta(seconds=seconds)


def _rfc3339(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"expected an RFC 3339 time with an offset, e.g. 2026-01-02T15:04:05Z, got {text!r}"
        )
    return moment


# --- running a command -------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run the client command parsed into ``args``; returns the process exit code.

    Never raises for a failed call, an unreachable control plane or Ctrl-C:
    each ends as a message on stderr and an exit code.
    """
    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        _error(str(exc))
        return EXIT_USAGE
    for name in unknown_env_names():
        if name.upper().startswith(CLIENT_ENV_PREFIX):
            _error(f"warning: environment variable {name} names no setting and is ignored")

    address = args.address or settings.client.address or settings.gateway.control_plane
    api_key = args.api_key or settings.client.api_key
    try:
        return asyncio.run(_run(args, address=address, api_key=api_key))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (``| head``); keep the interpreter's final flush quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
    except errors.AgentApiError as exc:
        _error(exc.message)
        return EXIT_FAILED


async def _run(args: argparse.Namespace, *, address: str, api_key: str) -> int:
    metadata = ((API_KEY_METADATA, api_key),) if api_key else ()
    async with grpc.aio.insecure_channel(address) as channel:
        client = _Client(channel, address=address, metadata=metadata)
        return await _HANDLERS[args.command](client, args)


class _Client:
    """The stub with the caller's metadata; turns failed calls into the project's errors."""

    def __init__(
        self, channel: grpc.aio.Channel, *, address: str, metadata: tuple[tuple[str, str], ...]
    ) -> None:
        self.address = address
        self.metadata = metadata
        self._channel = channel
        self.stub = pb_grpc.AgentServiceStub(channel)  # type: ignore[no-untyped-call]

    @contextlib.contextmanager
    def calling(self) -> Iterator[None]:
        """Raise the failure of a call inside the block as an AgentApiError.

        Its message is the line a person sees, e.g. ``NOT_FOUND: agent 'x' not found``.
        """
        try:
            yield
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc

    def _error(self, exc: grpc.aio.AioRpcError) -> errors.AgentApiError:
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE and self._unreachable():
            return errors.Unavailable(
                f"cannot reach the control plane at {self.address} ({details}); is it "
                "running? Point to it with --address or AGENTAPI_CLIENT_ADDRESS"
            )
        message = f"{code.name}: {details}"
        if code == grpc.StatusCode.UNAUTHENTICATED:
            message += " (give an API key with AGENTAPI_CLIENT_API_KEY or --api-key)"
        return _CODE_TO_ERROR.get(code, errors.Internal)(message)

    def _unreachable(self) -> bool:
        # A server that answered UNAVAILABLE itself (shutting down) leaves the channel connected.
        return self._channel.get_state(try_to_connect=False) != grpc.ChannelConnectivity.READY

    @contextlib.contextmanager
    def streaming(self, call: grpc.aio.Call) -> Iterator[None]:
        """Like :meth:`calling`, and cancel the streaming ``call`` however the block is left.

        Cancelling a finished call does nothing, so leaving early never leaks the stream.
        """
        try:
            with self.calling():
                yield
        finally:
            call.cancel()


# --- create ------------------------------------------------------------------


async def _create(client: _Client, args: argparse.Namespace) -> int:
    request = pb.CreateAgentRequest(
        session_id=args.session, agent_id=args.agent_id, env=dict(args.env), labels=dict(args.label)
    )
    with client.calling():
        response = await client.stub.CreateAgent(request, metadata=client.metadata)
    agent = response.agent
    # The id first, so a script gets it even when the wait below fails.
    print(agent.agent_id, flush=True)
    if args.no_wait:
        return EXIT_OK

    progress = _Progress(sys.stderr, agent.agent_id)
    if not response.created:
        progress.note("already exists")
    progress.show(agent)
    with progress:
        try:
            async with asyncio.timeout(args.timeout):
                final = await _wait_ready(client, agent.agent_id, progress=progress)
        except TimeoutError:
            last = progress.agent
            progress.done(last)
            raise errors.DeadlineExceeded(
                f"agent {last.agent_id!r} is still {state_name(last.state)} after "
                f"{args.timeout:g}s" + (f": {last.message}" if last.message else "")
            ) from None

    if final.state == pb.AGENT_STATE_DELETED:
        raise errors.FailedPrecondition(f"agent {final.agent_id!r} was deleted before it was ready")
    if final.state == pb.AGENT_STATE_FAILED:
        why = ": ".join(part for part in (final.reason, final.message) if part)
        raise errors.FailedPrecondition(
            f"agent {final.agent_id!r} failed" + (f": {why}" if why else "")
        )
    return EXIT_OK


_FINAL_STATES: Final = frozenset(
    {pb.AGENT_STATE_READY, pb.AGENT_STATE_FAILED, pb.AGENT_STATE_DELETED}
)


async def _wait_ready(client: _Client, agent_id: str, *, progress: _Progress) -> pb.Agent:
    """Follow the agent until it is READY, FAILED or DELETED; returns it in that state.

    May wait forever: the caller bounds it.
    """
    call = client.stub.WatchAgent(pb.WatchAgentRequest(agent_id=agent_id), metadata=client.metadata)
    with client.streaming(call):
        async for update in call:
            agent: pb.Agent = update.agent
            if agent.state in _FINAL_STATES:
                progress.done(agent)
                return agent
            progress.show(agent)
    raise errors.Unavailable(
        f"the control plane ended the watch of agent {agent_id!r} before it was ready"
    )


class _Progress:
    """Shows an agent's way to READY on a stream.

    On a terminal one line is redrawn with a spinner; elsewhere every change
    of state is one plain line, so logs and pipes stay readable.
    """

    def __init__(self, out: TextIO, agent_id: str) -> None:
        self._out = out
        self._agent_id = agent_id
        self._tty = out.isatty()
        fancy = _can_encode(out, "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏✓✗…")
        self._frames = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏" if fancy else "|/-\\"
        self._marks = ("✓", "✗") if fancy else ("+", "x")
        self._ellipsis = "…" if fancy else "..."
        self._started = time.monotonic()
        self._last: tuple[int, str] | None = None
        # The agent as last reported.
        self.agent = pb.Agent(agent_id=agent_id)
        self._label = ""
        self._spinner: asyncio.Task[None] | None = None

    def __enter__(self) -> _Progress:
        if self._tty:
            self._spinner = asyncio.get_running_loop().create_task(self._spin())
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._spinner is not None:
            self._spinner.cancel()
        if self._tty and self._label:
            # Interrupted or failed mid-line: leave the cursor on a fresh line.
            self._write("\n")
            self._label = ""

    def note(self, text: str) -> None:
        self._line(f"agent {self._agent_id} {text}")

    def show(self, agent: pb.Agent) -> None:
        """Report ``agent`` if its state or reason changed since the last report."""
        self.agent = agent
        key = (agent.state, agent.reason)
        if key == self._last:
            return
        self._last = key
        label = f"agent {agent.agent_id} {state_name(agent.state)}"
        if agent.reason and agent.state != pb.AGENT_STATE_READY:
            label += f" ({agent.reason})"
        if self._tty:
            self._label = label
            self._draw()
        else:
            self._line(label)

    def done(self, agent: pb.Agent) -> None:
        """Print the last state of ``agent`` and, if it failed, the end of its log."""
        self.agent = agent
        ok = agent.state == pb.AGENT_STATE_READY
        if self._tty:
            mark = self._marks[0] if ok else self._marks[1]
            self._write(f"\r\x1b[K{mark} agent {agent.agent_id} {state_name(agent.state)}\n")
            self._label = ""
        else:
            self.show(agent)
        if agent.state == pb.AGENT_STATE_FAILED and agent.log_tail:
            self._line("  last lines of its log:")
            for line in agent.log_tail.rstrip("\n").splitlines():
                self._line(f"    {line}")

    async def _spin(self) -> None:
        while True:
            await asyncio.sleep(_SPIN_INTERVAL)
            self._draw()

    def _draw(self) -> None:
        if not self._label:
            return
        elapsed = time.monotonic() - self._started
        frame = self._frames[int(elapsed / _SPIN_INTERVAL) % len(self._frames)]
        self._write(f"\r\x1b[K{frame} {self._label}{self._ellipsis} {elapsed:.0f}s")

    def _line(self, text: str) -> None:
        if self._tty and self._label:
            self._write("\r\x1b[K")
        self._write(text + "\n")
        if self._tty:
            self._draw()

    def _write(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()


def _can_encode(out: TextIO, text: str) -> bool:
    try:
        text.encode(out.encoding or "ascii")
    except (LookupError, UnicodeEncodeError):
        return False
    return True


# --- list, get, delete -------------------------------------------------------


async def _list(client: _Client, args: argparse.Namespace) -> int:
    # Every page, so that the table is the whole listing however many agents there are.
    response = pb.ListAgentsResponse()
    request = pb.ListAgentsRequest(session_id=args.session)
    with client.calling():
        while True:
            page = await client.stub.ListAgents(request, metadata=client.metadata)
            response.agents.extend(page.agents)
            if not page.next_page_token:
                break
            request.page_token = page.next_page_token
    if args.output == "json":
        _print_json(response)
    elif not response.agents:
        where = f" in session {args.session}" if args.session else ""
        print(f"No agents found{where}.", file=sys.stderr)
    else:
        _print_table(response.agents)
    return EXIT_OK


async def _get(client: _Client, args: argparse.Namespace) -> int:
    with client.calling():
        response = await client.stub.GetAgent(
            pb.GetAgentRequest(agent_id=args.agent_id), metadata=client.metadata
        )
    if args.output == "json":
        _print_json(response.agent)
    else:
        _print_table([response.agent])
    return EXIT_OK


async def _delete(client: _Client, args: argparse.Namespace) -> int:
    code = EXIT_OK
    for agent_id in args.agent_ids:
        try:
            with client.calling():
                await client.stub.DeleteAgent(
                    pb.DeleteAgentRequest(agent_id=agent_id), metadata=client.metadata
                )
        except errors.Unavailable:
            # Unreachable: every further id would fail the same way.
            raise
        except errors.AgentApiError as exc:
            _error(exc.message)
            code = EXIT_FAILED
            continue
        print(f"agent {agent_id} deleted", flush=True)
    return code


TABLE_COLUMNS: Final = ("ID", "SESSION", "STATE", "AGE", "ADDRESS", "REASON")


def table_rows(agents: Sequence[pb.Agent], *, now: datetime) -> list[tuple[str, ...]]:
    """The cells of the agents table (header first); empty cells read ``<none>``."""
    rows: list[tuple[str, ...]] = [TABLE_COLUMNS]
    for agent in agents:
        age = (
            human_age(now - agent.create_time.ToDatetime(tzinfo=UTC))
            if agent.HasField("create_time")
            else "<unknown>"
        )
        cells = (
            agent.agent_id,
            agent.session_id,
            state_name(agent.state),
            age,
            agent.address,
            agent.reason,
        )
        rows.append(tuple(cell or "<none>" for cell in cells))
    return rows


def _print_table(agents: Sequence[pb.Agent]) -> None:
    rows = table_rows(agents, now=datetime.now(UTC))
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        print("   ".join(cells).rstrip())
    sys.stdout.flush()


def _print_json(message: Message) -> None:
    # The same shape as the REST gateway's answers: proto field names, every field printed.
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    print(json.dumps(data, indent=2), flush=True)


def state_name(state: int) -> str:
    """``AGENT_STATE_READY`` -> ``ready``; unknown numbers stay visible."""
    try:
        name: str = pb.AgentState.Name(state)
    except ValueError:
        return f"state-{state}"
    return name.removeprefix(_STATE_PREFIX).lower()


def human_age(age: timedelta) -> str:
    """A short age as kubectl shows it: 45s, 3m12s, 17m, 5h3m, 20h, 3d4h, 12d, 2y."""
    seconds = max(0, int(age.total_seconds()))
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 120:
        return f"{seconds}s"
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if hours < 3:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if days < 2:
        return f"{hours}h"
    if days < 8:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    if days < 365 * 2:
        return f"{days}d"
    return f"{days // 365}y"


# --- logs --------------------------------------------------------------------


async def _logs(client: _Client, args: argparse.Namespace) -> int:
    request = pb.StreamLogsRequest(
        agent_id=args.agent_id,
        follow=args.follow,
        timestamps=args.timestamps,
        previous=args.previous,
    )
    if args.tail >= 0:
        request.tail_lines = args.tail
    if args.since is not None:
        request.since.FromTimedelta(args.since)
    if args.since_time is not None:
        request.since_time.FromDatetime(args.since_time.astimezone(UTC))
    if args.limit_bytes is not None:
        request.limit_bytes = args.limit_bytes

    out = sys.stdout.buffer
    call = client.stub.StreamLogs(request, metadata=client.metadata)
    with client.streaming(call):
        async for message in call:
            if message.data:
                out.write(message.data)
                out.flush()
            if message.HasField("end") and message.end.reason:
                end = message.end
                why = end.reason + (f": {end.message}" if end.message else "")
                _error(f"log stream ended: {why}")
    return EXIT_OK


_HANDLERS: Final[dict[str, Callable[[_Client, argparse.Namespace], Awaitable[int]]]] = {
    "create": _create,
    "list": _list,
    "get": _get,
    "delete": _delete,
    "logs": _logs,
}


def _error(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)
