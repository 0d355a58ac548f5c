"""The OpenAPI document: generated from the proto, valid, complete, and true to the gateway.

The first group checks the document itself, built from the descriptors
without a server. The second runs a real ``agentapi-proxy serve`` (real
control plane, real reference agents) and checks that what the gateway
answers matches what the document says: directly for the streams, and with
a bounded property-based schemathesis run over every described operation.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import hypothesis
import jsonschema_rs
import pytest
import requests
import schemathesis
from google.protobuf.descriptor import Descriptor
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from agentapi_gateway.app import AGENT_SERVICE
from agentapi_gateway.errors import ErrorStatus
from agentapi_gateway.openapi import openapi_document, proto_comments
from agentapi_gateway.routes import HttpBinding, service_bindings
from agentapi_gateway.transcode import message_to_json
from agentapi_proxy.v1 import agent_service_pb2 as pb
from tests.harness import ProxyProcess, free_port_range, running_proxy

NDJSON = "application/x-ndjson"
# Hang guard for one HTTP exchange; generous because machines are noisy.
DEADLINE = 60.0
BINDINGS = service_bindings(AGENT_SERVICE)


def build_document() -> dict[str, Any]:
    return openapi_document(AGENT_SERVICE, BINDINGS, comments=proto_comments(AGENT_SERVICE.file))


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return build_document()


@pytest.fixture(scope="module", autouse=True)
def hypothesis_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep Hypothesis' files out of the working tree (no example database is kept at all)."""
    hypothesis.configuration.set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    yield
    hypothesis.configuration.set_hypothesis_home_dir(None)


def validator(document: dict[str, Any], schema: dict[str, Any]) -> Any:
    """A JSON Schema validator for ``schema``, resolving refs into ``document``'s components."""
    return jsonschema_rs.Draft4Validator(
        {**schema, "components": document["components"]},
        validate_formats=True,
        formats={"byte": is_base64},
    )


def is_base64(value: str) -> bool:
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def operation_of(document: dict[str, Any], binding: HttpBinding) -> dict[str, Any]:
    path = binding.path.template
    operation: dict[str, Any] = document["paths"][path][binding.http_method.lower()]
    return operation


def described(bindings: list[HttpBinding]) -> list[HttpBinding]:
    return [b for b in bindings if b.rpc_name != "ProxyHTTP"]


def component(document: dict[str, Any], message: Descriptor) -> dict[str, Any]:
    schema: dict[str, Any] = document["components"]["schemas"][message.name]
    return schema


# --- the document, built from the descriptors -----------------------------------------------


def test_document_is_valid_openapi_3_0(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.0.")
    # Validates against the OpenAPI 3.0 meta-schema; raises on the first violation.
    schemathesis.openapi.from_dict(json.loads(json.dumps(document))).validate()

    broken = json.loads(json.dumps(document))
    del broken["paths"]["/agents"]["get"]["responses"]
    with pytest.raises(jsonschema_rs.ValidationError, match="responses"):
        schemathesis.openapi.from_dict(broken).validate()


def test_every_binding_is_an_operation_except_the_raw_proxy(document: dict[str, Any]) -> None:
    expected = {(b.path.template, b.http_method.lower()) for b in described(BINDINGS)}
    actual = {(path, method) for path, item in document["paths"].items() for method in item}
    assert actual == expected
    assert not any("/proxy" in path for path in document["paths"])
    assert "/agents/{agent_id}/proxy/**" in document["info"]["description"]

    ids = [op["operationId"] for item in document["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))
    for binding in described(BINDINGS):
        operation = operation_of(document, binding)
        assert operation["x-grpc-method"] == f"agentapi_proxy.v1.AgentService/{binding.rpc_name}"


def test_every_request_field_is_a_parameter_or_in_the_body(document: dict[str, Any]) -> None:
    for binding in described(BINDINGS):
        operation = operation_of(document, binding)
        parameters = {(p["in"], p["name"]): p for p in operation.get("parameters", [])}
        path_fields = {v.field_path for v in binding.path.variables}
        assert {name for where, name in parameters if where == "path"} == path_fields

        fields = {f.name for f in binding.method.input_type.fields}
        if binding.body == "*":
            body = operation["requestBody"]["content"]["application/json"]["schema"]
            assert set(body["properties"]) == fields - path_fields, binding.path.template
            assert body["additionalProperties"] is False
            assert not {name for where, name in parameters if where == "query"}
        else:
            assert "requestBody" not in operation
            query = {name for where, name in parameters if where == "query"} - {"format"}
            assert query == fields - path_fields, binding.path.template


def test_every_response_field_is_in_its_schema(document: dict[str, Any]) -> None:
    seen: set[str] = set()
    pending = [b.method.output_type for b in described(BINDINGS)]
    while pending:
        message = pending.pop()
        if message.full_name in seen:
            continue
        seen.add(message.full_name)
        schema = component(document, message)
        assert set(schema["properties"]) == {f.name for f in message.fields}, message.name
        assert schema["additionalProperties"] is False
        pending += [
            f.message_type
            for f in message.fields
            if f.message_type is not None
            and not f.message_type.GetOptions().map_entry
            and not f.message_type.full_name.startswith("google.protobuf.")
        ]
    assert {"Agent", "StreamEnd", "StreamLogsResponse", "WatchAgentResponse"} <= {
        name.rsplit(".", 1)[-1] for name in seen
    }


def test_required_follows_field_behavior_and_output_presence(document: dict[str, Any]) -> None:
    paths = document["paths"]
    # REQUIRED and bound in the path: a required path parameter, absent from the body.
    create = paths["/sessions/{session_id}/agents"]["post"]
    assert create["parameters"][0] == {
        "name": "session_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "minLength": 1},
    }
    body = create["requestBody"]["content"]["application/json"]["schema"]
    assert "required" not in body
    assert create["requestBody"]["required"] is False

    # Responses: the fields the gateway always prints are required; those with presence
    # (optional fields, messages) are not.
    agent = document["components"]["schemas"]["Agent"]
    assert {"agent_id", "state", "env", "restart_count"} <= set(agent["required"])
    assert not {"exit_code", "create_time", "ready_time"} & set(agent["required"])
    assert "required" not in document["components"]["schemas"]["GetAgentResponse"]


def test_types_follow_proto3_json(document: dict[str, Any]) -> None:
    logs = paths_parameters(document, "/agents/{agent_id}/logs")
    tail_lines = validator(document, logs["tail_lines"]["schema"])
    assert tail_lines.is_valid("-1") and tail_lines.is_valid("25")
    assert not tail_lines.is_valid(25) and not tail_lines.is_valid("2.5")
    since = validator(document, logs["since"]["schema"])
    assert since.is_valid("30s") and since.is_valid("1.500s")
    assert not since.is_valid("30") and not since.is_valid("1m")
    since_time = validator(document, logs["since_time"]["schema"])
    assert since_time.is_valid("2024-05-01T12:00:00Z") and not since_time.is_valid("yesterday")
    assert logs["format"]["schema"]["enum"] == ["ndjson", "json", "text"]
    assert logs["follow"]["schema"] == {"type": "boolean"}

    schemas = document["components"]["schemas"]
    assert schemas["AgentState"]["enum"] == [v.name for v in pb.AgentState.DESCRIPTOR.values]
    assert schemas["Agent"]["properties"]["env"]["additionalProperties"] == {"type": "string"}
    assert schemas["StreamLogsResponse"]["properties"]["data"]["format"] == "byte"
    assert schemas["ListAgentsResponse"]["properties"]["agents"]["items"] == {
        "$ref": "#/components/schemas/Agent"
    }


def paths_parameters(document: dict[str, Any], path: str) -> dict[str, Any]:
    return {p["name"]: p for p in document["paths"][path]["get"]["parameters"]}


def test_messages_as_the_gateway_writes_them_match_their_schemas(
    document: dict[str, Any],
) -> None:
    agent = pb.Agent(
        agent_id="a1",
        session_id="s1",
        owner="alice",
        mode=pb.RUNTIME_MODE_PROCESS,
        state=pb.AGENT_STATE_FAILED,
        reason="Exited",
        message="exit code 3",
        address="127.0.0.1:3284",
        env={"A": "1"},
        labels={"team": "x"},
        exit_code=3,
        restart_count=2,
        log_tail="boom\n",
    )
    agent.create_time.FromDatetime(datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC))
    agent.ready_time.FromDatetime(datetime(2024, 5, 1, 12, 0, 1, tzinfo=UTC))
    samples = [
        pb.CreateAgentResponse(agent=agent, created=True),
        pb.CreateAgentResponse(),
        pb.ListAgentsResponse(agents=[agent, pb.Agent()]),
        pb.StreamLogsResponse(data=b"line\n\xff"),
        pb.StreamLogsResponse(end=pb.StreamEnd(reason="AgentDeleted", message="gone")),
        pb.WatchAgentResponse(agent=agent),
    ]
    for message in samples:
        check = validator(document, {"$ref": f"#/components/schemas/{message.DESCRIPTOR.name}"})
        errors = [e.message for e in check.iter_errors(message_to_json(message))]
        assert not errors, (message.DESCRIPTOR.name, errors)

    # A message missing a field the gateway always prints does not validate.
    incomplete = message_to_json(pb.GetAgentResponse(agent=agent))
    del incomplete["agent"]["state"]
    assert not validator(document, {"$ref": "#/components/schemas/GetAgentResponse"}).is_valid(
        incomplete
    )


def test_error_bodies_match_the_documented_responses(document: dict[str, Any]) -> None:
    responses = document["components"]["responses"]
    assert sorted(responses) == [
        "400", "401", "403", "404", "409", "413", "429", "499", "500", "501", "503", "504",
    ]  # fmt: skip
    stream_error = validator(document, {"$ref": "#/components/schemas/StreamError"})
    for code in grpc.StatusCode:
        if code is grpc.StatusCode.OK:
            continue
        for message in ("no such agent", "the request body is too large"):
            status = ErrorStatus(code, message, reason="Why")
            response = responses[str(status.http_status)]
            schema = response["content"]["application/json"]["schema"]
            assert validator(document, schema).is_valid(status.body()), (code, message)
            assert stream_error.is_valid(status.stream_record()), code
            if status.headers():
                assert response["headers"]["Retry-After"]["required"] is True
    # A body whose code disagrees with the status it was sent with does not validate.
    not_found = ErrorStatus(grpc.StatusCode.NOT_FOUND, "gone").body()
    schema = responses["400"]["content"]["application/json"]["schema"]
    assert not validator(document, schema).is_valid(not_found)


def test_proto_comments_become_descriptions(document: dict[str, Any]) -> None:
    create = document["paths"]["/sessions/{session_id}/agents"]["post"]
    assert create["summary"] == "Creates an agent and returns it in state STARTING (or later)."
    assert "ALREADY_EXISTS" in create["description"]
    agent = document["components"]["schemas"]["Agent"]
    assert agent["properties"]["owner"]["description"] == "User id of the creator."
    state = document["components"]["schemas"]["AgentState"]["description"]
    assert "- `AGENT_STATE_READY`: Answering its readiness probe; traffic can flow." in state


def test_without_the_proto_source_summaries_come_from_method_names(tmp_path: Path) -> None:
    assert proto_comments(AGENT_SERVICE.file, proto_root=tmp_path) == {}
    bare = openapi_document(AGENT_SERVICE, BINDINGS, comments={})
    create = bare["paths"]["/sessions/{session_id}/agents"]["post"]
    assert create["summary"] == "Create agent"
    assert "description" not in create
    schemathesis.openapi.from_dict(json.loads(json.dumps(bare))).validate()


# --- the live gateway ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """A real ``serve``; at most 30 agents can run at once (their ports are the bound)."""
    state_dir = tmp_path_factory.mktemp("openapi-state")
    env = {"AGENTAPI_PROCESS_PORT_RANGE": free_port_range(30)}
    with running_proxy(state_dir, env=env) as proxy:
        try:
            yield proxy
        finally:
            with contextlib.suppress(requests.RequestException, ValueError):
                delete_all_agents(proxy.base_url)


def delete_all_agents(base_url: str) -> None:
    """Delete every agent through the API (the harness kills what is left anyway)."""
    listed = requests.get(f"{base_url}/agents", timeout=DEADLINE)
    for agent in listed.json().get("agents", []):
        requests.delete(f"{base_url}/agents/{quote(agent['agent_id'])}", timeout=DEADLINE)


def ensure_live_agent(live: ProxyProcess) -> None:
    """Create the agent the known ids name, again if a test deleted it (creating is idempotent)."""
    created = requests.post(
        f"{live.base_url}/sessions/{LIVE_SESSION}/agents",
        json={"agent_id": LIVE_AGENT},
        timeout=DEADLINE,
    )
    assert created.status_code == 200, created.text


def test_gateway_serves_the_document(live: ProxyProcess) -> None:
    response = requests.get(f"{live.base_url}/openapi.json", timeout=DEADLINE)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json() == json.loads(json.dumps(build_document()))


def test_document_needs_no_control_plane(tmp_path: Path) -> None:
    # Nothing listens on the control plane's address: the RPC routes fail, the document does not.
    nowhere = f"127.0.0.1:{free_port_range(1).split('-')[0]}"
    env = {"AGENTAPI_GATEWAY_CONTROL_PLANE": nowhere}
    with running_proxy(tmp_path, env=env, command="gateway") as gateway:
        document = requests.get(f"{gateway.base_url}/openapi.json", timeout=DEADLINE)
        assert document.status_code == 200
        assert document.json()["openapi"].startswith("3.0.")
        listed = requests.get(f"{gateway.base_url}/agents", timeout=DEADLINE)
        assert listed.status_code == 503


def checked_lines(document: dict[str, Any], path: str, lines: Iterable[bytes]) -> list[Any]:
    """The stream's lines, each checked against the line schema the document gives ``path``."""
    content = document["paths"][path]["get"]["responses"]["200"]["content"]
    check = validator(document, content[NDJSON]["schema"])
    records = [json.loads(line) for line in lines]
    for record in records:
        errors = [e.message for e in check.iter_errors(record)]
        assert not errors, (record, errors)
    return records


def is_ndjson(response: requests.Response) -> bool:
    return response.headers.get("Content-Type", "").split(";")[0] == NDJSON


def test_streams_match_their_line_schema(live: ProxyProcess, document: dict[str, Any]) -> None:
    base = live.base_url
    created = requests.post(
        f"{base}/sessions/streams/agents", json={"agent_id": "streamed"}, timeout=DEADLINE
    )
    assert created.status_code == 200, created.text
    waited = requests.post(f"{base}/agents/streamed:wait", json={"timeout": "60s"}, timeout=90)
    assert waited.json()["agent"]["state"] == "AGENT_STATE_READY"

    logs = requests.get(f"{base}/agents/streamed/logs", timeout=DEADLINE)
    assert logs.status_code == 200 and is_ndjson(logs)
    assert checked_lines(document, "/agents/{agent_id}/logs", logs.content.splitlines())

    # Follow and watch end when their agent is deleted: start them, delete, read to the end.
    with (
        requests.get(f"{base}/agents/streamed/watch", stream=True, timeout=DEADLINE) as watch,
        requests.get(
            f"{base}/agents/streamed/logs?follow=true", stream=True, timeout=DEADLINE
        ) as follow,
    ):
        assert watch.status_code == 200 and is_ndjson(watch)
        assert follow.status_code == 200 and is_ndjson(follow)
        watched = watch.iter_lines()
        first = next(watched)
        deleted = requests.delete(f"{base}/agents/streamed", timeout=DEADLINE)
        assert deleted.status_code == 200, deleted.text
        states = checked_lines(document, "/agents/{agent_id}/watch", [first, *watched])
        followed = checked_lines(document, "/agents/{agent_id}/logs", follow.iter_lines())
    assert states[-1]["result"]["agent"]["state"] == "AGENT_STATE_DELETED"
    assert followed[-1]["result"]["end"]["reason"]


# --- property-based: schemathesis against the live gateway ----------------------------------

# Every check that compares a response with the document, and no 5xx.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# not_a_server_error's default.
OK_STATUSES = ["2xx", "3xx", "4xx"]
# The proto does not say what an id looks like, so generated ids are almost never valid and
# stop at the id check. A third of the cases take their ids from here instead: a live agent,
# a valid id of no agent, and sessions with and without that agent.
LIVE_AGENT, LIVE_SESSION = "fuzz-live", "fuzz"
KNOWN_IDS = {"agent_id": [LIVE_AGENT, "fuzz-none"], "session_id": [LIVE_SESSION, "elsewhere"]}
# Operations that wait for a live agent's future: on an existing agent they answer only when
# it is deleted (WatchAgent, StreamLogs with follow) or after their timeout (WaitAgent, up to
# 600 s). Cases that would wait are skipped; test_streams_match_their_line_schema covers them.
WAITS_FOR_THE_AGENT = {"WatchAgent", "WaitAgent"}


@pytest.fixture(scope="module")
def api_schema(live: ProxyProcess) -> Any:
    """The document as schemathesis loads it from the live gateway."""
    config = schemathesis.Config.from_dict(
        {
            "cache": {"enabled": False},
            "request-timeout": DEADLINE,
            # WaitAgent answers DEADLINE_EXCEEDED (504) when its timeout passes, by design.
            "operations": [
                {
                    "include-operation-id": "WaitAgent",
                    "checks": {"not_a_server_error": {"expected-statuses": [*OK_STATUSES, 504]}},
                }
            ],
        }
    )
    return schemathesis.openapi.from_url(
        f"{live.base_url}/openapi.json", config=config, timeout=DEADLINE
    )


def operations() -> list[Any]:
    return [
        pytest.param(path, method, id=operation["operationId"])
        for path, item in build_document()["paths"].items()
        for method, operation in item.items()
    ]


# TODO: use schemathesis.pytest.from_fixture once it runs on pytest 9 (schemathesis 4.32.5
# reads Node._nodeid, which pytest 9 removed); until then each operation's strategies
# drive a plain Hypothesis test.
@pytest.mark.parametrize(("path", "method"), operations())
def test_gateway_answers_as_documented(
    path: str, method: str, api_schema: Any, live: ProxyProcess, document: dict[str, Any]
) -> None:
    operation = api_schema[path][method]
    operation_id = operation.definition.raw["operationId"]
    content = operation.definition.raw["responses"]["200"]["content"]
    line_schema = validator(document, content[NDJSON]["schema"]) if NDJSON in content else None
    ensure_live_agent(live)

    @hypothesis.settings(
        max_examples=30,
        deadline=None,
        database=None,
        # A real server is slow for Hypothesis, and cases that would wait are rejected.
        suppress_health_check=[
            hypothesis.HealthCheck.too_slow,
            hypothesis.HealthCheck.filter_too_much,
        ],
    )
    @hypothesis.given(case=cases(operation, path=path, method=method, document=document))
    def answers_as_documented(case: schemathesis.Case[Any]) -> None:
        if waits_for_the_agent(case, operation_id=operation_id):
            agent = requests.get(f"{live.base_url}{agent_path(case)}", timeout=DEADLINE)
            hypothesis.assume(agent.status_code != 200)

        response = case.call_and_validate(checks=CHECKS)

        media_type = response.headers.get("content-type", [""])[0].split(";")[0]
        if media_type == NDJSON and line_schema is not None:
            for line in response.content.splitlines():
                errors = [e.message for e in line_schema.iter_errors(json.loads(line))]
                assert not errors, (line, errors)

    answers_as_documented()


def cases(
    operation: Any, *, path: str, method: str, document: dict[str, Any]
) -> st.SearchStrategy[schemathesis.Case[Any]]:
    """Valid and invalid cases as the document allows, and valid ones with known ids."""
    parameters = document["paths"][path][method].get("parameters", [])
    names = [p["name"] for p in parameters if p["in"] == "path"]
    known = st.fixed_dictionaries({name: st.sampled_from(KNOWN_IDS[name]) for name in names})
    return st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
        known.flatmap(
            lambda ids: operation.as_strategy(GenerationMode.POSITIVE, path_parameters=ids)
        ),
    )


def waits_for_the_agent(case: schemathesis.Case[Any], *, operation_id: str) -> bool:
    if operation_id in WAITS_FOR_THE_AGENT:
        return True
    follow = case.query.get("follow") if isinstance(case.query, dict) else None
    return operation_id == "StreamLogs" and follow is not None and str(follow).lower() != "false"


def agent_path(case: schemathesis.Case[Any]) -> str:
    """``/agents/X`` for ``/agents/X:wait``, ``/agents/X/watch`` and ``/agents/X/logs``."""
    path: str = case.formatted_path
    return path.removesuffix(":wait") if path.endswith(":wait") else path.rsplit("/", 1)[0]


# Values at the edges of what the document allows, which generation rarely reaches: the
# largest proto3 JSON durations and 64-bit integers, the earliest and latest timestamps.
LOGS, WAIT = "/agents/{agent_id}/logs", "/agents/{agent_id}:wait"
EXTREMES = [
    pytest.param(LOGS, "get", {"since": "315576000000s"}, id="since-max-duration"),
    pytest.param(LOGS, "get", {"since_time": "0001-01-01T00:00:00Z"}, id="since-time-min"),
    pytest.param(
        LOGS, "get", {"since_time": "9999-12-31T23:59:59.999999999Z"}, id="since-time-max"
    ),
    pytest.param(LOGS, "get", {"tail_lines": str(2**63 - 1)}, id="tail-lines-max"),
    pytest.param(LOGS, "get", {"tail_lines": str(-(2**63))}, id="tail-lines-min"),
    pytest.param(LOGS, "get", {"tail_lines": str(2**64)}, id="tail-lines-beyond-int64"),
    pytest.param(LOGS, "get", {"limit_bytes": str(2**63 - 1)}, id="limit-bytes-max"),
    pytest.param(WAIT, "post", {"timeout": "315576000000s"}, id="wait-max-duration"),
    pytest.param(WAIT, "post", {"timeout": "-315576000000s"}, id="wait-min-duration"),
    pytest.param(WAIT, "post", {"timeout": "0s", "state": "AGENT_STATE_PENDING"}, id="wait-0s"),
]


@pytest.mark.parametrize(("path", "method", "values"), EXTREMES)
def test_extremes_answer_as_documented(
    path: str, method: str, values: dict[str, str], api_schema: Any, live: ProxyProcess
) -> None:
    ensure_live_agent(live)
    operation = api_schema[path][method]
    if method == "get":
        case = operation.Case(path_parameters={"agent_id": LIVE_AGENT}, query=values)
    else:
        case = operation.Case(path_parameters={"agent_id": LIVE_AGENT}, body=values)
    case.call_and_validate(checks=CHECKS)


def test_deeply_nested_json_is_a_client_error(live: ProxyProcess, document: dict[str, Any]) -> None:
    # Deeper than Python's JSON decoder recurses; still well under the body size limit.
    response = requests.post(
        f"{live.base_url}/sessions/{LIVE_SESSION}/agents",
        data=b"[" * 100_000,
        headers={"Content-Type": "application/json"},
        timeout=DEADLINE,
    )
    assert response.status_code == 400, response.text
    schema = document["components"]["responses"]["400"]["content"]["application/json"]["schema"]
    assert validator(document, schema).is_valid(response.json()), response.text
