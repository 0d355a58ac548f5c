"""The gRPC AgentService: checks requests, calls the driver, maps errors.

Every failure leaves through :func:`agentapi_proxy.status.abort`; nothing
else in the project turns an error into a gRPC status.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc

from agentapi_proxy import errors, metrics, status
from agentapi_proxy.auth import Authenticator, Permission, Principal
from agentapi_proxy.drivers.base import Driver
from agentapi_proxy.ids import (
    new_agent_id,
    validate_agent_id,
    validate_env_name,
    validate_session_id,
)
from agentapi_proxy.model import AgentInfo, AgentSpec, LogOptions, State, StreamEnd
from agentapi_proxy.paging import page_of, page_query
from agentapi_proxy.settings import ServerSettings
from agentapi_proxy.traffic import ResponsePart, TrafficRelay
from agentapi_proxy.tunnel import TunnelSession
from agentapi_proxy.v1 import agent_service_pb2 as pb
from agentapi_proxy.v1 import agent_service_pb2_grpc as pb_grpc
from agentapi_proxy.wire import STATE_FROM_PB, agent_to_pb

logger = logging.getLogger(__name__)

# The caller of the RPC being served; set by the wrappers before the method runs.
_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal")

Context = grpc.aio.ServicerContext[Any, Any]
Response = TypeVar("Response")

DEFAULT_WAIT = timedelta(seconds=60)
MAX_WAIT = timedelta(seconds=600)
# The longest a gateway may act on one GrantAgentAccess answer: how soon a deleted
# agent or a revoked key is noticed on the direct path at the latest.
GRANT_LIFETIME = timedelta(seconds=10)
# The method label of one exchange of a TunnelHTTP stream in the RPC metrics: each counts
# like a ProxyHTTP call; the stream itself counts as "TunnelHTTP".
TUNNEL_EXCHANGE = "TunnelHTTP.exchange"
# Looked up once: labels() costs a lock and a dict lookup on every exchange otherwise.
_OPEN_EXCHANGES = metrics.OPEN_STREAMS.labels(TUNNEL_EXCHANGE)
_EXCHANGE_LATENCY_OK = metrics.RPC_LATENCY.labels(TUNNEL_EXCHANGE, "OK")
# How much of a failed stream's remaining requests are read before its status is sent.
DRAIN_SECONDS = 1.0
DRAIN_BYTES = 256 * 1024
MAX_ENV_ENTRIES = 128
MAX_ENV_VALUE_BYTES = 32 * 1024
# Labels travel in every Agent message: they are bounded so that a ListAgents page stays small.
MAX_LABELS = 32
MAX_ENV_TOTAL_BYTES = 64 * 1024
_LABEL_KEY = re.compile(
    r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
)
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")


def _code_of(exc: BaseException) -> str:
    if isinstance(exc, errors.AgentApiError):
        return status.code_for(exc).name
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    return "INTERNAL"


async def _fail(context: Context, exc: Exception, method: str) -> None:
    """Turn any exception into the call's status; re-raises an abort already under way."""
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    if not isinstance(exc, errors.AgentApiError):
        logger.error("%s failed", method, exc_info=exc)
        exc = errors.Internal(
            f"internal error in {method} ({type(exc).__name__}); see the control plane log"
        )
    await status.abort(context, exc)


@contextlib.asynccontextmanager
async def _served(
    method: str,
    context: Context,
    *,
    authenticator: Authenticator,
    before_failing: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[None]:
    """Authenticate the caller, map any failure to a status, and record the outcome.

    ``before_failing`` runs before a failure's status is sent.
    """
    started = time.perf_counter()
    code = "OK"
    try:
        _principal.set(authenticator.principal(context.invocation_metadata() or ()))
        yield
    except grpc.aio.AbortError:
        raise
    except Exception as exc:
        code = _code_of(exc)
        if before_failing is not None:
            await before_failing()
        await _fail(context, exc, method)
        raise
    except BaseException as exc:
        code = _code_of(exc)
        raise
    finally:
        # A caller hanging up (CANCELLED) is how streams normally end, not an error.
        if code not in {"OK", "CANCELLED"}:
            metrics.RPC_ERRORS.labels(method, code).inc()
        metrics.RPC_LATENCY.labels(method, code).observe(time.perf_counter() - started)


def _unary(
    method: Callable[[AgentService, Any, Context], Awaitable[Response]],
) -> Callable[[AgentService, Any, Context], Awaitable[Response]]:
    @functools.wraps(method)
    async def wrapper(self: AgentService, request: Any, context: Context) -> Response:
        async with _served(method.__name__, context, authenticator=self._authenticator):
            return await method(self, request, context)
        raise AssertionError("unreachable: _served re-raises every failure")

    return wrapper


def _streaming(
    method: Callable[[AgentService, Any, Context], AsyncIterator[Response]],
) -> Callable[[AgentService, Any, Context], AsyncIterator[Response]]:
    @functools.wraps(method)
    async def wrapper(
        self: AgentService, request: Any, context: Context
    ) -> AsyncIterator[Response]:
        open_streams = metrics.OPEN_STREAMS.labels(method.__name__)
        open_streams.inc()
        answered = False

        async def let_the_caller_finish() -> None:
            if not answered and isinstance(request, AsyncIterator):
                await _drain_briefly(request)

        try:
            async with _served(
                method.__name__,
                context,
                authenticator=self._authenticator,
                before_failing=let_the_caller_finish,
            ):
                with self._stream_slot():
                    async for item in method(self, request, context):
                        answered = True
                        yield item
        finally:
            open_streams.dec()

    return wrapper


async def _drain_briefly(requests: AsyncIterator[Any]) -> None:
    """Read what the caller is still sending, within DRAIN_SECONDS and DRAIN_BYTES.

    A grpc.aio client whose write fails after the call ended reports
    INTERNAL instead of the status the server sent (grpc/grpc#36066); a
    caller that finished writing before the status goes out sees the real one.
    """
    read = 0
    with contextlib.suppress(Exception, TimeoutError):
        async with asyncio.timeout(DRAIN_SECONDS):
            async for message in requests:
                read += message.ByteSize()
                if read > DRAIN_BYTES:
                    return


class AgentService(pb_grpc.AgentServiceServicer):
    def __init__(
        self,
        driver: Driver,
        relay: TrafficRelay,
        *,
        authenticator: Authenticator,
        limits: ServerSettings,
    ) -> None:
        self._driver = driver
        self._relay = relay
        self._authenticator = authenticator
        self._limits = limits
        self._shutting_down = False
        self._streams_total = 0
        self._streams_by_user: collections.Counter[str] = collections.Counter()

    def begin_shutdown(self) -> None:
        """Open follow streams end with UNAVAILABLE instead of a clean end."""
        self._shutting_down = True

    @contextlib.contextmanager
    def _stream_slot(self) -> Iterator[None]:
        """Hold one of the caller's open-stream slots; ResourceExhausted when none is left.

        Each open stream holds a file descriptor or a connection, so one user
        must not be able to starve everyone else of them.
        """
        user = _principal.get().user_id
        if self._streams_total >= self._limits.max_streams:
            raise errors.ResourceExhausted(
                f"the control plane has {self._streams_total} streams open, its limit "
                "(server.max_streams); close some and retry"
            )
        if self._streams_by_user[user] >= self._limits.max_streams_per_user:
            raise errors.ResourceExhausted(
                f"you have {self._streams_by_user[user]} streams open, the limit per user "
                "(server.max_streams_per_user); close some and retry"
            )
        self._streams_total += 1
        self._streams_by_user[user] += 1
        try:
            yield
        finally:
            self._streams_total -= 1
            self._streams_by_user[user] -= 1
            if not self._streams_by_user[user]:
                del self._streams_by_user[user]

    def _check_not_shutting_down(self) -> None:
        if self._shutting_down:
            raise errors.Unavailable("the control plane is shutting down; retry shortly")

    async def _visible(
        self, agent_id: str, permission: Permission, *, session_id: str = ""
    ) -> AgentInfo:
        """The agent, if the caller holds ``permission`` and may see it; else NotFound.

        Agents of other users answer NOT_FOUND, exactly like missing ones, so
        their ids are not disclosed.
        """
        principal = _principal.get()
        principal.require(permission)
        info = await self._driver.get(validate_agent_id(agent_id))
        if not principal.may_see(info.spec.owner) or (
            session_id and info.spec.session_id != session_id
        ):
            where = f" in session {session_id!r}" if session_id else ""
            raise errors.NotFound(f"agent {agent_id!r} not found{where}")
        return info

    @_unary
    async def CreateAgent(
        self, request: pb.CreateAgentRequest, context: Context
    ) -> pb.CreateAgentResponse:
        self._check_not_shutting_down()
        principal = _principal.get()
        principal.require(Permission.CREATE)
        session_id = validate_session_id(request.session_id)
        agent_id = validate_agent_id(request.agent_id) if request.agent_id else new_agent_id()
        if len(request.env) > MAX_ENV_ENTRIES:
            raise errors.InvalidArgument(f"at most {MAX_ENV_ENTRIES} environment variables")
        if sum(len(k) + len(v.encode()) for k, v in request.env.items()) > MAX_ENV_TOTAL_BYTES:
            raise errors.InvalidArgument(
                f"the environment must stay under {MAX_ENV_TOTAL_BYTES} bytes in all"
            )
        for name, value in request.env.items():
            validate_env_name(name)
            if len(value.encode()) > MAX_ENV_VALUE_BYTES or "\x00" in value:
                raise errors.InvalidArgument(
                    f"environment variable {name} must be under {MAX_ENV_VALUE_BYTES} bytes "
                    "without NUL characters"
                )
        if len(request.labels) > MAX_LABELS:
            raise errors.InvalidArgument(f"at most {MAX_LABELS} labels")
        for key, value in request.labels.items():
            if len(key.split("/")[-1]) > 63 or not _LABEL_KEY.fullmatch(key):
                raise errors.InvalidArgument(
                    f"label key {key[:80]!r} is not a valid Kubernetes label key"
                )
            if len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
                raise errors.InvalidArgument(
                    f"label value {value[:80]!r} for {key!r} is not a valid Kubernetes label value"
                )
        spec = AgentSpec(
            agent_id=agent_id,
            session_id=session_id,
            owner=principal.user_id,
            env=dict(request.env),
            labels=dict(request.labels),
        )
        try:
            info, created = await self._driver.create(spec)
        except errors.AlreadyExists:
            # Ids are global; another user's agent is "taken", with nothing more said.
            existing = await self._driver.get(agent_id)
            if not principal.may_see(existing.spec.owner):
                raise errors.AlreadyExists(
                    f"agent id {agent_id!r} is taken; choose another id"
                ) from None
            raise
        return pb.CreateAgentResponse(agent=agent_to_pb(info), created=created)

    @_unary
    async def GetAgent(self, request: pb.GetAgentRequest, context: Context) -> pb.GetAgentResponse:
        info = await self._visible(
            request.agent_id, Permission.ACCESS, session_id=request.session_id
        )
        return pb.GetAgentResponse(agent=agent_to_pb(info))

    @_unary
    async def ListAgents(
        self, request: pb.ListAgentsRequest, context: Context
    ) -> pb.ListAgentsResponse:
        principal = _principal.get()
        principal.require(Permission.LIST)
        session_id = validate_session_id(request.session_id) if request.session_id else None
        query = page_query(request)
        agents = await self._driver.list_agents(session_id)
        visible = (agent_to_pb(info) for info in agents if principal.may_see(info.spec.owner))
        return page_of(visible, query, session_id=request.session_id)

    @_unary
    async def DeleteAgent(
        self, request: pb.DeleteAgentRequest, context: Context
    ) -> pb.DeleteAgentResponse:
        await self._visible(request.agent_id, Permission.DELETE, session_id=request.session_id)
        info = await self._driver.delete(request.agent_id)
        return pb.DeleteAgentResponse(agent=agent_to_pb(info))

    @_unary
    async def WaitAgent(
        self, request: pb.WaitAgentRequest, context: Context
    ) -> pb.WaitAgentResponse:
        agent_id = (await self._visible(request.agent_id, Permission.ACCESS)).agent_id
        wanted = STATE_FROM_PB.get(request.state, State.READY)
        if request.state not in (pb.AGENT_STATE_UNSPECIFIED, *STATE_FROM_PB):
            raise errors.InvalidArgument(f"unknown state {request.state}")
        timeout = request.timeout.ToTimedelta() if request.HasField("timeout") else DEFAULT_WAIT
        if not timedelta(0) <= timeout <= MAX_WAIT:
            raise errors.InvalidArgument(f"timeout must be between 0s and {MAX_WAIT.seconds}s")

        async def wait() -> pb.WaitAgentResponse:
            async for info in self._driver.watch(agent_id):
                if info.state is wanted:
                    return pb.WaitAgentResponse(agent=agent_to_pb(info))
                if info.state is State.FAILED:
                    raise errors.FailedPrecondition(
                        f"agent {agent_id!r} failed ({info.reason}): {info.message}",
                        reason=info.reason,
                    )
                if info.state is State.DELETED:
                    raise errors.NotFound(f"agent {agent_id!r} was deleted while waiting")
            raise errors.Unavailable("the control plane is shutting down; retry shortly")

        try:
            return await asyncio.wait_for(wait(), timeout.total_seconds())
        except TimeoutError:
            info = await self._driver.get(agent_id)
            raise errors.DeadlineExceeded(
                f"agent {agent_id!r} is still {info.state.value} after "
                f"{timeout.total_seconds():g}s" + (f": {info.message}" if info.message else "")
            ) from None

    @_streaming
    async def WatchAgent(
        self, request: pb.WatchAgentRequest, context: Context
    ) -> AsyncIterator[pb.WatchAgentResponse]:
        agent_id = (await self._visible(request.agent_id, Permission.ACCESS)).agent_id
        # Tells the gateway the call was accepted before the first change arrives.
        await context.send_initial_metadata(())
        last = None
        async for info in self._driver.watch(agent_id):
            last = info
            yield pb.WatchAgentResponse(agent=agent_to_pb(info))
        if last is None or last.state is not State.DELETED:
            self._check_not_shutting_down()

    @_streaming
    async def StreamLogs(
        self, request: pb.StreamLogsRequest, context: Context
    ) -> AsyncIterator[pb.StreamLogsResponse]:
        agent_id = (await self._visible(request.agent_id, Permission.ACCESS)).agent_id
        if request.HasField("since") and request.HasField("since_time"):
            raise errors.InvalidArgument("give at most one of since and since_time")
        since_time = None
        if request.HasField("since"):
            since = request.since.ToTimedelta()
            if since <= timedelta(0):
                raise errors.InvalidArgument("since must be a positive duration")
            try:
                since_time = datetime.now(UTC) - since
            except OverflowError:
                # Reaches back before year 1: every line is newer, so there is no bound.
                since_time = None
        elif request.HasField("since_time"):
            since_time = request.since_time.ToDatetime(tzinfo=UTC)
        if request.HasField("limit_bytes") and request.limit_bytes <= 0:
            raise errors.InvalidArgument("limit_bytes must be positive")
        options = LogOptions(
            follow=request.follow,
            tail_lines=request.tail_lines
            if request.HasField("tail_lines") and request.tail_lines >= 0
            else None,
            since_time=since_time,
            timestamps=request.timestamps,
            previous=request.previous,
            limit_bytes=request.limit_bytes if request.HasField("limit_bytes") else None,
        )
        chunks = await self._driver.logs(agent_id, options)
        # A quiet agent may print nothing for long: answer "accepted" right away.
        await context.send_initial_metadata(())
        async for item in chunks:
            if isinstance(item, StreamEnd):
                yield pb.StreamLogsResponse(
                    end=pb.StreamEnd(reason=item.reason, message=item.message)
                )
                return
            yield pb.StreamLogsResponse(data=item)
        if options.follow:
            self._check_not_shutting_down()

    @_streaming
    async def ProxyHTTP(
        self, request_iterator: AsyncIterator[pb.ProxyHTTPRequest], context: Context
    ) -> AsyncIterator[pb.ProxyHTTPResponse]:
        async def authorize(agent_id: str) -> None:
            await self._visible(agent_id, Permission.ACCESS)

        caller = _principal.get().user_id
        async for message in self._relay.relay(
            request_iterator, authorize=authorize, caller=caller
        ):
            yield message

    @_streaming
    async def TunnelHTTP(
        self, request_iterator: AsyncIterator[pb.TunnelHTTPRequest], context: Context
    ) -> AsyncIterator[pb.TunnelHTTPResponse]:
        """The gateway's stream of many exchanges (:mod:`agentapi_proxy.tunnel`).

        The caller that opens it must authenticate, but gets nothing by it:
        each exchange is checked on its own credentials by
        :meth:`_tunnel_exchange`. The stream holds one stream slot of its
        opener's, so nobody can open tunnels without end; each exchange holds
        one of its own caller's.
        """
        self._check_not_shutting_down()
        # Tells the gateway the stream was accepted before any exchange is sent.
        await context.send_initial_metadata(())
        session = TunnelSession(self._tunnel_exchange, accepting=lambda: not self._shutting_down)
        async for message in session.serve(request_iterator):
            yield message

    async def _tunnel_exchange(
        self, start: pb.TunnelExchangeStart
    ) -> AsyncGenerator[ResponsePart, None]:
        """One tunnel exchange, authenticated, authorized and counted as a ProxyHTTP call is.

        Runs in a task of its own, so the principal set here is this
        exchange's alone. Raises the project's errors.
        """
        started = time.perf_counter()
        code = "OK"
        _OPEN_EXCHANGES.inc()
        try:
            credentials = [(h.name, h.value) for h in start.credentials]
            _principal.set(self._authenticator.principal(credentials))

            async def authorize(agent_id: str) -> None:
                await self._visible(agent_id, Permission.ACCESS)

            with self._stream_slot():
                async for part in self._relay.exchange(
                    start.head,
                    body=start.body,
                    end_of_body=True,
                    authorize=authorize,
                    caller=_principal.get().user_id,
                ):
                    yield part
        except BaseException as exc:
            code = _code_of(exc)
            raise
        finally:
            _OPEN_EXCHANGES.dec()
            if code not in {"OK", "CANCELLED"}:
                metrics.RPC_ERRORS.labels(TUNNEL_EXCHANGE, code).inc()
            latency = _EXCHANGE_LATENCY_OK if code == "OK" else None
            latency = latency or metrics.RPC_LATENCY.labels(TUNNEL_EXCHANGE, code)
            latency.observe(time.perf_counter() - started)

    @_unary
    async def GrantAgentAccess(
        self, request: pb.GrantAgentAccessRequest, context: Context
    ) -> pb.GrantAgentAccessResponse:
        agent_id = (await self._visible(request.agent_id, Permission.ACCESS)).agent_id
        endpoint = await self._driver.endpoint(agent_id)
        response = pb.GrantAgentAccessResponse()
        response.expire_time.FromDatetime(datetime.now(UTC) + GRANT_LIFETIME)
        # Headers (the API server's bearer token) and TLS settings are the control
        # plane's own credentials: such an agent is reached through ProxyHTTP only.
        if not endpoint.headers and endpoint.ssl is None:
            response.base_url = endpoint.base_url
            response.host = endpoint.host
        return response
