"""The HTTP gateway: routes from the proto, transcoding, errors, and the streaming proxy.

The pure parts are checked directly. The live parts run the real gateway
against a small grpc.aio AgentService on 127.0.0.1 port 0 that answers
from scripts (no control plane, no agents), so the gateway's own behaviour
is what is checked: status mapping, NDJSON streams, chunked proxying.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from grpc_health.v1 import health, health_pb2_grpc

from agentapi_gateway.app import AGENT_SERVICE, run_gateway
from agentapi_gateway.errors import (
    HTTP_STATUS,
    ErrorStatus,
    error_response,
    http_status,
    status_from_project_error,
)
from agentapi_gateway.headers import (
    agent_request_headers,
    client_response_headers,
    credential_metadata,
    end_to_end,
)
from agentapi_gateway.proxy import CHUNK_BYTES, agent_path
from agentapi_gateway.routes import HttpBinding, parse_template, service_bindings
from agentapi_gateway.transcode import build_request
from agentapi_proxy import errors
from agentapi_proxy.settings import GatewaySettings
from agentapi_proxy.v1 import agent_service_pb2 as pb
from agentapi_proxy.v1 import agent_service_pb2_grpc as pb_grpc

# Hang guard for every network step; generous because machines are noisy.
DEADLINE = 30.0


# --- the route table comes from the proto ---------------------------------------------------


def test_route_table_is_exactly_the_protos_bindings() -> None:
    table = {
        (b.rpc_name, b.http_method, b.path.template, b.body)
        for b in service_bindings(AGENT_SERVICE)
    }
    assert table == {
        ("CreateAgent", "POST", "/sessions/{session_id}/agents", "*"),
        ("GetAgent", "GET", "/agents/{agent_id}", ""),
        ("GetAgent", "GET", "/sessions/{session_id}/agents/{agent_id}", ""),
        ("ListAgents", "GET", "/agents", ""),
        ("ListAgents", "GET", "/sessions/{session_id}/agents", ""),
        ("DeleteAgent", "DELETE", "/agents/{agent_id}", ""),
        ("DeleteAgent", "DELETE", "/sessions/{session_id}/agents/{agent_id}", ""),
        ("WaitAgent", "POST", "/agents/{agent_id}:wait", "*"),
        ("WatchAgent", "GET", "/agents/{agent_id}/watch", ""),
        ("StreamLogs", "GET", "/agents/{agent_id}/logs", ""),
        ("ProxyHTTP", "*", "/agents/{agent_id}/proxy/**", ""),
        ("GrantAgentAccess", "POST", "/agents/{agent_id}:grantAccess", "*"),
    }


@pytest.mark.parametrize(
    ("template", "aiohttp_path"),
    [
        ("/sessions/{session_id}/agents", "/sessions/{session_id}/agents"),
        ("/agents/{agent_id}:wait", "/agents/{agent_id}:wait"),
        ("/agents/{agent_id}/proxy/**", "/agents/{agent_id}/proxy{_segment1:(?:/.*)?}"),
        ("/v1/{name=shelves/*/books/*}:get", "/v1/{name:shelves/[^/]+/books/[^/]+}:get"),
        ("/{parent.id}/items", "/{parent__id}/items"),
        ("/files/{path=**}", "/files{path:(?:/.*)?}"),
    ],
)
def test_template_becomes_an_aiohttp_path(template: str, aiohttp_path: str) -> None:
    assert parse_template(template).aiohttp_path == aiohttp_path


@pytest.mark.parametrize(
    "template", ["agents", "/agents/{id", "/a/**/b", "/a/{x=**}:verb", "/a//b", "/a/{1x}"]
)
def test_malformed_template_is_refused(template: str) -> None:
    with pytest.raises(ValueError, match="template"):
        parse_template(template)


def _marker(binding: HttpBinding) -> Any:
    async def handler(request: web.Request) -> web.Response:
        raise AssertionError("routing only")

    handler.binding = binding  # type: ignore[attr-defined]
    return handler


@pytest.fixture
def router() -> web.UrlDispatcher:
    """The gateway's paths in an aiohttp router, each handler tagged with its binding."""
    dispatcher = web.UrlDispatcher()
    resources: dict[str, web.Resource] = {}
    for binding in service_bindings(AGENT_SERVICE):
        path = binding.path.aiohttp_path
        resource = resources.setdefault(path, dispatcher.add_resource(path))
        resource.add_route(binding.http_method, _marker(binding))
    return dispatcher


@pytest.mark.parametrize(
    ("method", "url", "rpc", "values"),
    [
        ("POST", "/sessions/my-session/agents", "CreateAgent", {"session_id": "my-session"}),
        ("GET", "/sessions/my-session/agents", "ListAgents", {"session_id": "my-session"}),
        ("POST", "/agents/a1:wait", "WaitAgent", {"agent_id": "a1"}),
        ("GET", "/agents/a1", "GetAgent", {"agent_id": "a1"}),
        ("DELETE", "/sessions/s/agents/a1", "DeleteAgent", {"session_id": "s", "agent_id": "a1"}),
        ("GET", "/agents/a1/logs", "StreamLogs", {"agent_id": "a1"}),
        ("PATCH", "/agents/a1/proxy/x/y", "ProxyHTTP", {"agent_id": "a1"}),
        ("GET", "/agents/a1/proxy", "ProxyHTTP", {"agent_id": "a1"}),
    ],
)
async def test_requests_reach_the_bound_rpc(
    router: web.UrlDispatcher, method: str, url: str, rpc: str, values: dict[str, str]
) -> None:
    match = await router.resolve(make_mocked_request(method, url))
    binding: HttpBinding = match.handler.binding  # type: ignore[attr-defined]
    assert binding.rpc_name == rpc
    assert binding.path.field_values(dict(match)) == values


@pytest.mark.parametrize(
    ("method", "url", "status"),
    [
        ("POST", "/agents/a1", 405),
        ("POST", "/agents/a1:waitx", 405),
        ("GET", "/agents/a1/proxyx", 404),
        ("GET", "/sessions/s/agents/a1/extra", 404),
    ],
)
async def test_near_misses_are_not_routed(
    router: web.UrlDispatcher, method: str, url: str, status: int
) -> None:
    match = await router.resolve(make_mocked_request(method, url))
    assert match.http_exception is not None
    assert match.http_exception.status == status


# --- query, path and body become the request message ----------------------------------------


def test_query_values_are_converted_by_field_type() -> None:
    request = build_request(
        pb.StreamLogsRequest,
        path_values={"agent_id": "a1"},
        query=[
            ("follow", ""),
            ("tailLines", "10"),
            ("since", "90s"),
            ("timestamps", "true"),
            ("previous", "0"),
            ("limit_bytes", "4096"),
        ],
    )
    expected = pb.StreamLogsRequest(
        agent_id="a1", follow=True, tail_lines=10, timestamps=True, limit_bytes=4096
    )
    expected.since.FromSeconds(90)
    assert request == expected


def test_list_paging_comes_from_the_query() -> None:
    request = build_request(
        pb.ListAgentsRequest,
        path_values={},
        query=[("pageSize", "50"), ("page_token", "abc")],
    )
    assert request == pb.ListAgentsRequest(page_size=50, page_token="abc")


def test_timestamp_and_enum_by_name() -> None:
    logs = build_request(
        pb.StreamLogsRequest,
        path_values={"agent_id": "a1"},
        query=[("since_time", "2024-05-01T10:00:00Z")],
    )
    assert logs.since_time.ToJsonString() == "2024-05-01T10:00:00Z"
    wait = build_request(
        pb.WaitAgentRequest,
        path_values={"agent_id": "a1"},
        query=[("state", "AGENT_STATE_READY")],
        body={"timeout": "30s"},
        body_field="*",
    )
    assert wait.state == pb.AGENT_STATE_READY
    assert wait.timeout.seconds == 30


@pytest.mark.parametrize(
    ("query", "body", "complaint"),
    [
        ([("nope", "1")], None, "unknown query parameter 'nope'"),
        ([("tail_lines", "ten")], None, "tail_lines"),
        ([("follow", "maybe")], None, "not a boolean"),
        ([("since", "30 parsecs")], None, "since"),
        ([("since", "banana")], None, "'banana' is not a duration; write it like 300s"),
        ([("limit_bytes", "abc")], None, "'limit_bytes' = 'abc' is not a whole number"),
        ([("tail_lines", "1"), ("tail_lines", "2")], None, "2 times"),
        ([("agent_id", "other")], None, "path already sets"),
    ],
)
def test_bad_query_is_invalid_argument(
    query: list[tuple[str, str]], body: Any, complaint: str
) -> None:
    with pytest.raises(errors.InvalidArgument, match=complaint):
        build_request(pb.StreamLogsRequest, path_values={"agent_id": "a1"}, query=query)


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        (
            {"sessionId": "s", "colour": "red"},
            "unknown field .colour.; this request takes session_id, agent_id",
        ),
        ({"env": "not-a-map"}, "env"),
        (["a", "list"], "JSON object"),
        ({"session_id": "other"}, "disagree"),
    ],
)
def test_bad_body_is_invalid_argument(body: Any, complaint: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=complaint):
        build_request(
            pb.CreateAgentRequest,
            path_values={"session_id": "s"},
            body=body,
            body_field="*",
        )


def test_body_and_path_that_agree_are_merged() -> None:
    request = build_request(
        pb.CreateAgentRequest,
        path_values={"session_id": "s"},
        body={"session_id": "s", "agentId": "a1", "env": {"MODE": "x"}},
        body_field="*",
    )
    assert request == pb.CreateAgentRequest(session_id="s", agent_id="a1", env={"MODE": "x"})


# --- headers --------------------------------------------------------------------------------


def test_hop_by_hop_and_connection_named_headers_are_dropped() -> None:
    headers = [
        ("Connection", "keep-alive, X-Trace-Hop"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("TE", "trailers"),
        ("Trailer", "Expires"),
        ("Upgrade", "websocket"),
        ("Proxy-Authorization", "Basic x"),
        ("X-Trace-Hop", "1"),
        ("Content-Type", "text/plain"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
    ]
    assert end_to_end(headers) == [
        ("Content-Type", "text/plain"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
    ]


def test_credentials_and_host_stay_at_the_gateway() -> None:
    sent = agent_request_headers(
        [
            ("Host", "gw.example:8080"),
            ("Authorization", "Bearer secret"),
            ("X-API-Key", "k"),
            ("Expect", "100-continue"),
            ("Content-Length", "12"),
            ("X-Forwarded-For", "10.0.0.1"),
            ("Accept", "text/event-stream"),
        ],
        client_address="127.0.0.1",
        scheme="http",
    )
    assert sent == [
        ("Content-Length", "12"),
        ("Accept", "text/event-stream"),
        ("X-Forwarded-For", "10.0.0.1, 127.0.0.1"),
        ("X-Forwarded-Host", "gw.example:8080"),
        ("X-Forwarded-Proto", "http"),
    ]
    assert credential_metadata([("Authorization", "Bearer secret"), ("X-Api-Key", "k")]) == (
        ("authorization", "Bearer secret"),
        ("x-api-key", "k"),
    )


def test_response_content_length_passes_only_when_trustworthy() -> None:
    assert client_response_headers([("Content-Length", "42")])["Content-Length"] == "42"
    assert "Content-Length" not in client_response_headers([("Content-Length", "4x")])
    assert "Content-Length" not in client_response_headers(
        [("Content-Length", "1"), ("Content-Length", "2")]
    )


@pytest.mark.parametrize(
    ("target", "path"),
    [
        ("/agents/a1/proxy", "/"),
        ("/agents/a1/proxy/", "/"),
        ("/agents/a1/proxy/files/a%20b%2Fc?x=1", "/files/a%20b%2Fc"),
        ("/agents/a1/proxy/events", "/events"),
    ],
)
def test_agent_path_is_the_raw_tail(target: str, path: str) -> None:
    assert agent_path(target, tail_index=3) == path


@pytest.mark.parametrize(
    "target",
    [
        "http://evil.example/agents/a1/proxy/x",
        "/agents/a1/proxy/../../admin",
        "/agents/a1/proxy/%2e%2e/admin",
        "/agents/a1/proxy/%252e%252e/admin",
        "/agents/a1/proxy//evil.example/x",
        "/agents/a1/proxy/a\\b",
    ],
)
def test_agent_path_refuses_escapes(target: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        agent_path(target, tail_index=3)


# --- gRPC status to HTTP status -------------------------------------------------------------


def test_status_table() -> None:
    code = grpc.StatusCode
    assert {c.name: HTTP_STATUS[c] for c in code} == {
        "OK": 200,
        "CANCELLED": 499,
        "UNKNOWN": 500,
        "INVALID_ARGUMENT": 400,
        "DEADLINE_EXCEEDED": 504,
        "NOT_FOUND": 404,
        "ALREADY_EXISTS": 409,
        "PERMISSION_DENIED": 403,
        "RESOURCE_EXHAUSTED": 429,
        "FAILED_PRECONDITION": 409,
        "ABORTED": 409,
        "OUT_OF_RANGE": 400,
        "UNIMPLEMENTED": 501,
        "INTERNAL": 500,
        "UNAVAILABLE": 503,
        "DATA_LOSS": 500,
        "UNAUTHENTICATED": 401,
    }
    assert http_status(code.RESOURCE_EXHAUSTED, detail="port range full") == 429
    assert http_status(code.RESOURCE_EXHAUSTED, detail="Received message larger than max") == 413


def test_error_body_and_retry_after() -> None:
    response = error_response(
        status_from_project_error(errors.Unavailable("API server down", retry_after=2.5))
    )
    assert response.status == 503
    assert response.headers["Retry-After"] == "3"
    assert response.text is not None
    assert json.loads(response.text) == {
        "error": {"code": 503, "status": "UNAVAILABLE", "message": "API server down"}
    }
    record = ErrorStatus(grpc.StatusCode.NOT_FOUND, "gone").stream_record()
    assert record == {"error": {"code": 5, "status": "NOT_FOUND", "message": "gone"}}


# --- live: the gateway against a scripted AgentService --------------------------------------


@dataclass
class ScriptedService(pb_grpc.AgentServiceServicer):
    """Answers from fixed scripts and remembers what it was sent."""

    metadata: list[dict[str, str]] = field(default_factory=list)
    heads: list[pb.HTTPRequestHead] = field(default_factory=list)
    body_chunk_sizes: list[int] = field(default_factory=list)
    second_event: asyncio.Event = field(default_factory=asyncio.Event)
    events_cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    def _remember(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.metadata.append({k: str(v) for k, v in context.invocation_metadata() or ()})

    async def CreateAgent(
        self, request: pb.CreateAgentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CreateAgentResponse:
        self._remember(context)
        agent = pb.Agent(
            agent_id=request.agent_id or "generated-1",
            session_id=request.session_id,
            state=pb.AGENT_STATE_STARTING,
            env=dict(request.env),
        )
        return pb.CreateAgentResponse(agent=agent, created=True)

    async def GetAgent(
        self, request: pb.GetAgentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetAgentResponse:
        if request.agent_id == "busy":
            context.set_trailing_metadata((("retry-after", "7"),))
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the cluster is busy")
        if request.agent_id != "a1":
            await context.abort(grpc.StatusCode.NOT_FOUND, f"agent {request.agent_id} not found")
        return pb.GetAgentResponse(agent=pb.Agent(agent_id="a1", state=pb.AGENT_STATE_READY))

    async def WaitAgent(
        self, request: pb.WaitAgentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.WaitAgentResponse:
        if request.agent_id == "failed":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the agent failed")
        # Echoes what it understood, so the test sees the transcoding.
        agent = pb.Agent(
            agent_id=request.agent_id, state=request.state, message=request.timeout.ToJsonString()
        )
        return pb.WaitAgentResponse(agent=agent)

    async def StreamLogs(
        self, request: pb.StreamLogsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.StreamLogsResponse]:
        if request.agent_id == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "agent missing not found")
        yield pb.StreamLogsResponse(data=b"line 1\n")
        yield pb.StreamLogsResponse(data=b"line 2 without newline")
        if request.agent_id == "deleted-midway":
            await context.abort(grpc.StatusCode.NOT_FOUND, "agent was deleted")
        yield pb.StreamLogsResponse(end=pb.StreamEnd(reason="LimitReached"))

    async def ProxyHTTP(
        self,
        request_iterator: AsyncIterator[pb.ProxyHTTPRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.ProxyHTTPResponse]:
        self._remember(context)
        first = await anext(request_iterator)
        head = first.head
        self.heads.append(head)
        if head.agent_id == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "agent missing not found")

        def response_head(status: int, *headers: tuple[str, str]) -> pb.ProxyHTTPResponse:
            pairs = [pb.HTTPHeader(name=n, value=v) for n, v in headers]
            return pb.ProxyHTTPResponse(head=pb.HTTPResponseHead(status=status, headers=pairs))

        if head.path == "/echo":
            yield response_head(201, ("Content-Type", "application/octet-stream"))
            async for message in request_iterator:
                self.body_chunk_sizes.append(len(message.body))
                yield pb.ProxyHTTPResponse(body=message.body)
        elif head.path == "/big":
            size = 6 * 1024 * 1024
            yield response_head(200, ("Content-Length", str(size)), ("Connection", "close"))
            for offset in range(0, size, CHUNK_BYTES):
                yield pb.ProxyHTTPResponse(body=_pattern(offset, CHUNK_BYTES))
        elif head.path == "/events":
            yield response_head(200, ("Content-Type", "text/event-stream"))
            yield pb.ProxyHTTPResponse(body=b"event: status_change\ndata: 1\n\n")
            # The second event waits until the client has seen the first: a
            # buffering gateway would hang here until the hang guard fires.
            try:
                await self.second_event.wait()
            except asyncio.CancelledError:
                self.events_cancelled.set()
                raise
            yield pb.ProxyHTTPResponse(body=b"event: status_change\ndata: 2\n\n")
        elif head.path == "/broken":
            yield response_head(200, ("Content-Type", "text/plain"))
            yield pb.ProxyHTTPResponse(body=b"partial")
            await context.abort(grpc.StatusCode.UNAVAILABLE, "agent went away")
        else:
            yield response_head(404)


def _pattern(offset: int, size: int) -> bytes:
    return bytes((offset + i) % 251 for i in range(size))


async def _pieces(data: bytes, size: int) -> AsyncIterator[bytes]:
    """A request body the client sends chunked, as a browser upload would."""
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]


@dataclass
class Live:
    url: str
    service: ScriptedService
    session: aiohttp.ClientSession


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port that refuses connections: bound but not listening, held for the test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def _start_gateway(
    control_plane: str, *, shutdown_timeout: float = 2.0
) -> tuple[web.AppRunner, str]:
    settings = GatewaySettings(
        listen="127.0.0.1:0", control_plane=control_plane, max_json_body_bytes=1024
    )
    runner = await run_gateway(settings, shutdown_timeout=shutdown_timeout)
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


@dataclass
class Scripted:
    service: ScriptedService
    target: str


@pytest.fixture
async def scripted() -> AsyncIterator[Scripted]:
    """The scripted AgentService (with gRPC health) on 127.0.0.1, port 0."""
    service = ScriptedService()
    server = grpc.aio.server()
    pb_grpc.add_AgentServiceServicer_to_server(service, server)  # type: ignore[no-untyped-call]
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)  # type: ignore[attr-defined]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield Scripted(service, f"127.0.0.1:{port}")
    finally:
        service.second_event.set()
        await server.stop(None)


@pytest.fixture
async def live(scripted: Scripted) -> AsyncIterator[Live]:
    runner, url = await _start_gateway(scripted.target)
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
    try:
        yield Live(url, scripted.service, session)
    finally:
        await session.close()
        await runner.cleanup()


async def _json(response: aiohttp.ClientResponse) -> Any:
    return json.loads(await response.read())


async def test_post_without_body_creates_an_agent_with_a_generated_id(live: Live) -> None:
    async with asyncio.timeout(DEADLINE):
        async with live.session.post(
            f"{live.url}/sessions/my-session/agents",
            headers={"Authorization": "Bearer t0k", "X-API-Key": "k1"},
        ) as response:
            assert response.status == 200
            body = await _json(response)
    assert body["created"] is True
    assert body["agent"]["agent_id"] == "generated-1"
    assert body["agent"]["session_id"] == "my-session"
    assert body["agent"]["state"] == "AGENT_STATE_STARTING"
    assert live.service.metadata[-1]["authorization"] == "Bearer t0k"
    assert live.service.metadata[-1]["x-api-key"] == "k1"


async def test_wait_with_verb_and_typed_body(live: Live) -> None:
    async with asyncio.timeout(DEADLINE):
        async with live.session.post(
            f"{live.url}/agents/a1:wait", json={"state": "AGENT_STATE_READY", "timeout": "30s"}
        ) as response:
            assert response.status == 200
            agent = (await _json(response))["agent"]
        async with live.session.post(f"{live.url}/agents/failed:wait") as failed:
            assert failed.status == 409
            assert (await _json(failed))["error"]["status"] == "FAILED_PRECONDITION"
    assert agent["agent_id"] == "a1"
    assert agent["state"] == "AGENT_STATE_READY"
    assert agent["message"] == "30s"


@pytest.mark.parametrize(
    ("path", "status", "grpc_status"),
    [("/agents/nope", 404, "NOT_FOUND"), ("/agents/busy", 503, "UNAVAILABLE")],
)
async def test_grpc_errors_become_http_errors(
    live: Live, path: str, status: int, grpc_status: str
) -> None:
    async with asyncio.timeout(DEADLINE):
        async with live.session.get(live.url + path) as response:
            body = await _json(response)
            headers = response.headers
    assert response.status == status
    assert body["error"]["code"] == status
    assert body["error"]["status"] == grpc_status
    assert "Traceback" not in body["error"]["message"]
    if status == 503:
        # The control plane's retry-after metadata becomes the header.
        assert headers["Retry-After"] == "7"


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b'{"colour": "red"}', 400),
        (b"{not json", 400),
        (b'{"env": {"K": "' + b"v" * 2000 + b'"}}', 413),
    ],
)
async def test_bad_bodies_are_refused_before_the_control_plane(
    live: Live, data: bytes, status: int
) -> None:
    async with asyncio.timeout(DEADLINE):
        async with live.session.post(
            f"{live.url}/sessions/s/agents",
            data=data,
            headers={"Content-Type": "application/json"},
        ) as response:
            body = await _json(response)
    assert response.status == status
    assert body["error"]["code"] == status
    assert live.service.metadata == []


async def test_unknown_route_is_a_json_404(live: Live) -> None:
    async with asyncio.timeout(DEADLINE):
        async with live.session.get(f"{live.url}/no/such/route") as response:
            body = await _json(response)
    assert response.status == 404
    assert body["error"] == {
        "code": 404,
        "status": "NOT_FOUND",
        "message": "no route matches GET /no/such/route",
    }


async def test_log_stream_error_before_first_message_is_a_real_status(live: Live) -> None:
    async with asyncio.timeout(DEADLINE):
        async with live.session.get(f"{live.url}/agents/missing/logs?follow=true") as response:
            body = await _json(response)
    assert response.status == 404
    assert body["error"]["message"] == "agent missing not found"


async def test_log_stream_error_after_start_is_a_final_record(live: Live) -> None:
    async with asyncio.timeout(DEADLINE):
        async with live.session.get(f"{live.url}/agents/deleted-midway/logs") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("application/x-ndjson")
            assert "Content-Length" not in response.headers
            lines = [json.loads(line) for line in (await response.read()).splitlines()]
    assert [line.get("result", {}).get("data") for line in lines[:2]] == [
        "bGluZSAxCg==",
        "bGluZSAyIHdpdGhvdXQgbmV3bGluZQ==",
    ]
    assert lines[2] == {"error": {"code": 5, "status": "NOT_FOUND", "message": "agent was deleted"}}
    assert len(lines) == 3


async def test_log_stream_as_text(live: Live) -> None:
    async with asyncio.timeout(DEADLINE):
        async with live.session.get(
            f"{live.url}/agents/deleted-midway/logs", headers={"Accept": "text/plain"}
        ) as failed:
            failed_text = await failed.text()
        async with live.session.get(f"{live.url}/agents/a1/logs?format=text") as ended:
            ended_text = await ended.text()
    assert failed_text == "line 1\nline 2 without newline\nerror: NOT_FOUND: agent was deleted\n"
    assert ended_text == "line 1\nline 2 without newline\nend: LimitReached\n"


async def test_proxy_forwards_raw_path_query_and_end_to_end_headers(live: Live) -> None:
    async with asyncio.timeout(DEADLINE):
        async with live.session.get(
            f"{live.url}/agents/a1/proxy/files/a%20b%3F?x=%20y&z",
            headers={
                "Authorization": "Bearer t0k",
                "X-API-Key": "k1",
                "Connection": "X-Hop",
                "X-Hop": "1",
                "X-End": "2",
            },
        ) as response:
            assert response.status == 404
    head = live.service.heads[-1]
    sent = {h.name.lower(): h.value for h in head.headers}
    assert (head.agent_id, head.method, head.path, head.query) == (
        "a1",
        "GET",
        "/files/a%20b%3F",
        "x=%20y&z",
    )
    assert sent["x-end"] == "2"
    assert not {"x-hop", "connection", "authorization", "x-api-key", "host"} & set(sent)
    assert live.service.metadata[-1]["authorization"] == "Bearer t0k"


async def test_proxy_sse_events_arrive_one_by_one(live: Live) -> None:
    async with asyncio.timeout(DEADLINE):
        async with live.session.get(f"{live.url}/agents/a1/proxy/events") as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "text/event-stream"
            assert response.headers["X-Accel-Buffering"] == "no"
            assert "Content-Length" not in response.headers
            assert "Content-Encoding" not in response.headers
            first = await response.content.readuntil(b"\n\n")
            assert first == b"event: status_change\ndata: 1\n\n"
            live.service.second_event.set()
            second = await response.content.readuntil(b"\n\n")
            assert second == b"event: status_change\ndata: 2\n\n"


async def test_client_leaving_a_proxied_stream_cancels_its_call(live: Live) -> None:
    async with asyncio.timeout(DEADLINE):
        async with live.session.get(f"{live.url}/agents/a1/proxy/events") as response:
            await response.content.readuntil(b"\n\n")
            response.close()
        # Without the cancellation the agent side would wait for ever.
        await live.service.events_cancelled.wait()


async def test_shutdown_ends_open_streams_instead_of_waiting(scripted: Scripted) -> None:
    # A shutdown timeout far beyond the hang guard: only cancelling the stream can pass.
    runner, url = await _start_gateway(scripted.target, shutdown_timeout=60.0)
    cleaned = False
    try:
        async with aiohttp.ClientSession() as session, asyncio.timeout(DEADLINE):
            async with session.get(f"{url}/agents/a1/proxy/events") as response:
                await response.content.readuntil(b"\n\n")
                await runner.cleanup()
                cleaned = True
                with pytest.raises(aiohttp.ClientPayloadError):
                    await response.read()
            await scripted.service.events_cancelled.wait()
    finally:
        if not cleaned:
            await runner.cleanup()


async def test_proxy_streams_5_mib_up_and_6_mib_down_in_chunks(live: Live) -> None:
    upload = _pattern(7, 5 * 1024 * 1024)
    async with asyncio.timeout(DEADLINE):
        async with live.session.post(
            f"{live.url}/agents/a1/proxy/echo", data=_pieces(upload, 256 * 1024)
        ) as echo:
            assert echo.status == 201
            echoed = await echo.read()
        async with live.session.get(f"{live.url}/agents/a1/proxy/big") as big:
            assert big.headers["Content-Length"] == str(6 * 1024 * 1024)
            # The agent's "Connection: close" is about its own connection, not the client's.
            assert big.headers.get("Connection") != "close"
            digest = hashlib.sha256()
            async for chunk in big.content.iter_chunked(CHUNK_BYTES):
                digest.update(chunk)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(upload).digest()
    assert max(live.service.body_chunk_sizes) <= CHUNK_BYTES
    assert sum(live.service.body_chunk_sizes) == len(upload)
    assert digest.digest() == hashlib.sha256(_pattern(0, 6 * 1024 * 1024)).digest()


async def test_proxy_error_before_head_is_mapped(live: Live) -> None:
    async with asyncio.timeout(DEADLINE):
        async with live.session.get(f"{live.url}/agents/missing/proxy/status") as response:
            body = await _json(response)
    assert response.status == 404
    assert body["error"]["message"] == "agent missing not found"


async def test_proxy_error_after_head_breaks_the_response_off(live: Live) -> None:
    async with asyncio.timeout(DEADLINE):
        async with live.session.get(f"{live.url}/agents/a1/proxy/broken") as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()


async def test_readyz_follows_control_plane_health(live: Live) -> None:
    async with asyncio.timeout(DEADLINE):
        async with live.session.get(f"{live.url}/readyz") as ready:
            assert ready.status == 200
        async with live.session.get(f"{live.url}/healthz") as alive:
            assert alive.status == 200


async def test_unreachable_control_plane_is_503_with_retry_after(closed_port: int) -> None:
    runner, url = await _start_gateway(f"127.0.0.1:{closed_port}")
    try:
        async with aiohttp.ClientSession() as session, asyncio.timeout(DEADLINE):
            for path in ("/agents/a1", "/agents/a1/logs", "/agents/a1/proxy/status", "/readyz"):
                async with session.get(url + path) as response:
                    body = await _json(response)
                    assert response.status == 503, path
                    assert response.headers["Retry-After"].isdigit(), path
                    assert body["error"]["status"] == "UNAVAILABLE", path
            async with session.get(f"{url}/healthz") as alive:
                assert alive.status == 200
    finally:
        await runner.cleanup()
