"""The OpenAPI 3.0 document of the REST routes, generated from the proto at start-up.

Like the route table (:mod:`agentapi_gateway.routes`), the document has one
source: the service descriptor. Paths, methods and parameters come from the
``google.api.http`` bindings; schemas come from the message descriptors,
written as the gateway's proto3 JSON (:mod:`agentapi_gateway.transcode`);
errors and streams as :mod:`agentapi_gateway.errors` and
:mod:`agentapi_gateway.handlers` write them. Nothing here is written per
message, so a field added to the proto appears in the document by itself.

Choices the proto does not make by itself:

* ``required`` lists the fields marked ``(google.api.field_behavior) =
  REQUIRED``. A message that only ever appears in responses also requires
  every field without presence: the gateway always prints those, defaults
  included, so a client may rely on them.
* Schemas forbid unknown properties, because requests with unknown fields
  are refused. They list the proto field names only; requests may also use
  the lowerCamelCase JSON names (the document says so in its description).
* A streaming RPC answers ``application/x-ndjson``; its schema is that of one
  line, either ``{"result": ...}`` or a last ``{"error": ...}`` line whose
  ``code`` is the gRPC code number (once a stream has begun, the HTTP status
  line is gone).
* The raw ``ProxyHTTP`` pass-through (and any binding of a client-streaming
  RPC) is left out: its requests and responses are the agent's own.

Comments: the generated ``*_pb2`` modules drop the source info, so the
comments are read by compiling the ``.proto`` again with it (protoc runs in
process, through grpcio-tools). Where the ``.proto`` is not found, summaries
are derived from the method names.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import grpc
from aiohttp import web
from google.api import field_behavior_pb2  # type: ignore[import-untyped]
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import (
    Descriptor,
    EnumDescriptor,
    FieldDescriptor,
    FileDescriptor,
    ServiceDescriptor,
)

import agentapi_proxy
from agentapi_gateway.errors import ErrorStatus, http_status
from agentapi_gateway.handlers import FORMAT_PARAMETER, NDJSON
from agentapi_gateway.routes import HttpBinding, resolve_field_path

logger = logging.getLogger(__name__)

OPENAPI_VERSION: Final = "3.0.3"
DOCUMENT_PATH: Final = "/openapi.json"
JSON: Final = "application/json"
TEXT: Final = "text/plain"
# Where the .proto files live in a source checkout (src/agentapi_proxy -> the repository).
# TODO: ship the .proto as package data so that installed builds get the comments too.
SOURCE_PROTO_ROOT: Final = Path(agentapi_proxy.__file__).resolve().parents[2] / "proto"

_DOCUMENT_KEY: Final = web.AppKey("openapi_document", bytes)
_ERROR_SCHEMA: Final = "Error"
_STREAM_ERROR_SCHEMA: Final = "StreamError"
_REF: Final = "#/components/schemas/"

_INT32 = {"type": "integer", "format": "int32", "minimum": -(2**31), "maximum": 2**31 - 1}
_UINT32 = {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**32 - 1}
# proto3 JSON writes 64-bit integers as strings (a double cannot hold them).
_INT64 = {"type": "string", "format": "int64", "pattern": r"^-?[0-9]+$"}
_UINT64 = {"type": "string", "format": "uint64", "pattern": r"^[0-9]+$"}
_NON_FINITE = {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]}

_SCALARS: Final[Mapping[int, Mapping[str, Any]]] = {
    FieldDescriptor.TYPE_DOUBLE: {"anyOf": [{"type": "number", "format": "double"}, _NON_FINITE]},
    FieldDescriptor.TYPE_FLOAT: {"anyOf": [{"type": "number", "format": "float"}, _NON_FINITE]},
    FieldDescriptor.TYPE_INT32: _INT32,
    FieldDescriptor.TYPE_SINT32: _INT32,
    FieldDescriptor.TYPE_SFIXED32: _INT32,
    FieldDescriptor.TYPE_UINT32: _UINT32,
    FieldDescriptor.TYPE_FIXED32: _UINT32,
    FieldDescriptor.TYPE_INT64: _INT64,
    FieldDescriptor.TYPE_SINT64: _INT64,
    FieldDescriptor.TYPE_SFIXED64: _INT64,
    FieldDescriptor.TYPE_UINT64: _UINT64,
    FieldDescriptor.TYPE_FIXED64: _UINT64,
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
}

_WELL_KNOWN: Final[Mapping[str, Mapping[str, Any]]] = {
    "google.protobuf.Duration": {
        "type": "string",
        "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$",
        "description": 'A duration in seconds with an "s" suffix, e.g. "30s" or "1.5s".',
    },
    "google.protobuf.Timestamp": {
        "type": "string",
        "format": "date-time",
        "description": 'An RFC 3339 time, e.g. "2024-05-01T12:00:00Z".',
    },
    "google.protobuf.FieldMask": {
        "type": "string",
        "description": "Comma-separated lowerCamelCase field paths.",
    },
    "google.protobuf.Empty": {"type": "object", "additionalProperties": False},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {"description": "Any JSON value."},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Any": {
        "type": "object",
        "required": ["@type"],
        "properties": {"@type": {"type": "string"}},
        "additionalProperties": True,
    },
    "google.protobuf.DoubleValue": _SCALARS[FieldDescriptor.TYPE_DOUBLE],
    "google.protobuf.FloatValue": _SCALARS[FieldDescriptor.TYPE_FLOAT],
    "google.protobuf.Int64Value": _INT64,
    "google.protobuf.UInt64Value": _UINT64,
    "google.protobuf.Int32Value": _INT32,
    "google.protobuf.UInt32Value": _UINT32,
    "google.protobuf.BoolValue": {"type": "boolean"},
    "google.protobuf.StringValue": {"type": "string"},
    "google.protobuf.BytesValue": {"type": "string", "format": "byte"},
}

# Well-known types a query parameter can carry: their JSON form is one scalar.
_WELL_KNOWN_SCALARS: Final = frozenset(
    name
    for name in _WELL_KNOWN
    if name.endswith("Value") and name not in {"google.protobuf.Value", "google.protobuf.ListValue"}
) | {"google.protobuf.Duration", "google.protobuf.Timestamp", "google.protobuf.FieldMask"}


_CONVENTIONS: Final = """\
Generated at start-up from the proto's `google.api.http` options and message descriptors.

JSON is proto3 JSON with the proto field names (`agent_id`); requests may also use the
lowerCamelCase JSON names (`agentId`) and must not carry unknown fields. Responses print
every field without presence, defaults included. Enums are written by name, 64-bit integers
as decimal strings, durations as strings such as `"30s"`, timestamps in RFC 3339, bytes in
base64. Query parameters name request fields the path does not set.

Errors answer `{"error": {"code": <HTTP status>, "status": <gRPC code name>,
"message": ..., "reason"?: ...}}`. Streaming RPCs answer `application/x-ndjson`: one
`{"result": ...}` line per message; a failure after the stream began ends it with an
`{"error": ...}` line whose `code` is the gRPC code number. A stream without such a line
ended normally.

Authentication, when the server enables it: `X-API-Key: KEY` or `Authorization: Bearer KEY`.

Not described: `ANY /agents/{agent_id}/proxy/**`, the raw pass-through to the agent's own
HTTP API (its requests and responses are the agent's), and the gateway's `/healthz`,
`/readyz` and this document."""


def openapi_document(
    service: ServiceDescriptor,
    bindings: Sequence[HttpBinding],
    *,
    comments: Mapping[str, str] | None = None,
    version: str = agentapi_proxy.__version__,
) -> dict[str, Any]:
    """The OpenAPI 3.0 document of ``bindings`` (the route table of ``service``).

    ``comments`` maps full proto names to their comments (see :func:`proto_comments`).
    Pure: no I/O. Raises ValueError when a proto name would clash with the
    gateway's own schema names.
    """
    builder = _DocumentBuilder(bindings, comments=comments or {})
    paths: dict[str, dict[str, Any]] = {}
    for binding, operation_id in builder.described_bindings():
        path = binding.path.template.replace("=*}", "}")
        paths.setdefault(path, {})[binding.http_method.lower()] = builder.operation(
            binding, operation_id=operation_id
        )

    description = builder.comment(service.full_name)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": f"agentapi-proxy {service.name}",
            "version": version,
            "description": f"{description}\n\n{_CONVENTIONS}" if description else _CONVENTIONS,
        },
        "tags": [{"name": service.name, "description": description or service.full_name}],
        "paths": paths,
        "components": {
            "schemas": builder.schemas(),
            "responses": _error_responses(),
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
        },
        # Authentication is off by default: an empty requirement makes it optional.
        "security": [{}, {"apiKey": []}, {"bearer": []}],
    }


def proto_comments(
    file: FileDescriptor, *, proto_root: Path = SOURCE_PROTO_ROOT
) -> Mapping[str, str]:
    """The comments of the ``.proto`` behind ``file``, by full name of what they document.

    Keys are full names of services, methods, messages, fields and enums, and
    ``<enum full name>.<VALUE>`` for enum values. Compiles
    ``proto_root / file.name`` with protoc (once per process and path); answers
    an empty mapping when the file is missing or does not compile.
    """
    return _compiled_comments(file.name, str(proto_root))


def add_openapi_route(
    app: web.Application,
    *,
    service: ServiceDescriptor,
    bindings: Sequence[HttpBinding],
    proto_root: Path = SOURCE_PROTO_ROOT,
) -> None:
    """Serve the document of ``bindings`` at ``GET /openapi.json`` on ``app``.

    The document is built when ``app`` starts (reading the ``.proto`` for its
    comments) and serialised once; answering it needs no control plane.
    """

    async def build(app: web.Application) -> None:
        comments = proto_comments(service.file, proto_root=proto_root)
        document = openapi_document(service, bindings, comments=comments)
        app[_DOCUMENT_KEY] = json.dumps(document, indent=1, ensure_ascii=False).encode("utf-8")

    async def serve(request: web.Request) -> web.Response:
        return web.Response(
            body=request.config_dict[_DOCUMENT_KEY], content_type=JSON, charset="utf-8"
        )

    app.on_startup.append(build)
    app.router.add_get(DOCUMENT_PATH, serve)


@functools.cache
def _compiled_comments(file_name: str, proto_root: str) -> Mapping[str, str]:
    source = Path(proto_root) / file_name
    if not source.is_file():
        logger.debug("no %s: the OpenAPI document has no proto comments", source)
        return MappingProxyType({})
    try:
        proto = _compile_with_source_info(file_name, Path(proto_root))
    except (OSError, ValueError) as exc:
        logger.warning("cannot read the comments of %s: %s", source, exc)
        return MappingProxyType({})
    return MappingProxyType(dict(_comments_of(proto)))


def _compile_with_source_info(
    file_name: str, proto_root: Path
) -> descriptor_pb2.FileDescriptorProto:
    """Raises ValueError when protoc fails, OSError when its output cannot be read."""
    # Imported here: only start-up needs protoc, and only when the .proto is present.
    import google.api
    from grpc_tools import protoc

    googleapis_root = Path(next(iter(google.api.__path__))).parent.parent
    well_known_root = Path(str(resources.files("grpc_tools") / "_proto"))
    with tempfile.TemporaryDirectory(prefix="agentapi-openapi-") as scratch:
        output = Path(scratch) / "descriptor_set.pb"
        status = protoc.main(
            [
                "protoc",
                f"-I{proto_root}",
                f"-I{googleapis_root}",
                f"-I{well_known_root}",
                "--include_source_info",
                f"--descriptor_set_out={output}",
                file_name,
            ]
        )
        if status != 0:
            raise ValueError(f"protoc exited with {status}")
        descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(output.read_bytes())
    for proto in descriptor_set.file:
        if proto.name == file_name:
            return proto
    raise ValueError(f"protoc did not describe {file_name}")


def _comments_of(proto: descriptor_pb2.FileDescriptorProto) -> Iterator[tuple[str, str]]:
    """(full name, comment) pairs, located by the source-info paths of descriptor.proto."""
    by_path = {
        tuple(location.path): _clean_comment(
            location.leading_comments or location.trailing_comments
        )
        for location in proto.source_code_info.location
        if location.leading_comments or location.trailing_comments
    }
    prefix = f"{proto.package}." if proto.package else ""

    # The numbers are field numbers of FileDescriptorProto, DescriptorProto, ... in
    # descriptor.proto: 4 message_type, 5 enum_type, 6 service; then 2 field/value/method,
    # 3 nested_type and 4 enum_type inside a message.
    pairs: list[tuple[str, tuple[int, ...]]] = []
    for index, message in enumerate(proto.message_type):
        pairs += _message_paths(message, prefix + message.name, (4, index))
    for index, enum in enumerate(proto.enum_type):
        pairs += _enum_paths(enum, prefix + enum.name, (5, index))
    for index, service in enumerate(proto.service):
        pairs.append((prefix + service.name, (6, index)))
        for number, method in enumerate(service.method):
            pairs.append((f"{prefix}{service.name}.{method.name}", (6, index, 2, number)))
    for name, path in pairs:
        if by_path.get(path):
            yield name, by_path[path]


def _message_paths(
    message: descriptor_pb2.DescriptorProto, name: str, path: tuple[int, ...]
) -> list[tuple[str, tuple[int, ...]]]:
    pairs = [(name, path)]
    pairs += [(f"{name}.{f.name}", (*path, 2, i)) for i, f in enumerate(message.field)]
    for index, nested in enumerate(message.nested_type):
        pairs += _message_paths(nested, f"{name}.{nested.name}", (*path, 3, index))
    for index, enum in enumerate(message.enum_type):
        pairs += _enum_paths(enum, f"{name}.{enum.name}", (*path, 4, index))
    return pairs


def _enum_paths(
    enum: descriptor_pb2.EnumDescriptorProto, name: str, path: tuple[int, ...]
) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, path)] + [(f"{name}.{v.name}", (*path, 2, i)) for i, v in enumerate(enum.value)]


def _clean_comment(text: str) -> str:
    lines = [line[1:] if line.startswith(" ") else line for line in text.strip("\n").split("\n")]
    return "\n".join(lines).strip()


class _DocumentBuilder:
    """Collects component schemas while the operations are described."""

    def __init__(self, bindings: Sequence[HttpBinding], *, comments: Mapping[str, str]) -> None:
        self._bindings = bindings
        self._comments = comments
        self._schemas: dict[str, dict[str, Any]] = {}
        self._names: dict[str, str] = {}
        described = [binding for binding, _ in self.described_bindings()]
        self._package = described[0].method.containing_service.file.package if described else ""
        # A message that a client also writes requires only its REQUIRED fields.
        self._output_only = _reachable(b.method.output_type for b in described) - _reachable(
            b.method.input_type for b in described
        )

    def comment(self, full_name: str) -> str:
        return self._comments.get(full_name, "")

    def described_bindings(self) -> Iterator[tuple[HttpBinding, str]]:
        """(binding, operationId) of each binding the document describes, in proto order."""
        seen: dict[str, int] = {}
        for binding in self._bindings:
            if binding.method.client_streaming or binding.http_method == "*":
                continue
            if not _single_segment_variables(binding.path.template):
                # An OpenAPI path parameter is one segment and has a name; no binding of
                # ours has an anonymous wildcard or a "{name=a/*}" variable.
                logger.debug("%s is left out of the OpenAPI document", binding.path.template)
                continue
            count = seen.get(binding.rpc_name, 0)
            seen[binding.rpc_name] = count + 1
            yield binding, binding.rpc_name if count == 0 else f"{binding.rpc_name}_{count}"

    def schemas(self) -> dict[str, dict[str, Any]]:
        """The component schemas: those of the described operations and the error bodies."""
        gateway = _gateway_schemas()
        for name in gateway.keys() & self._schemas.keys():
            raise ValueError(f"a proto type is named {name!r}, like a gateway schema")
        return dict(sorted({**self._schemas, **gateway}.items()))

    def operation(self, binding: HttpBinding, *, operation_id: str) -> dict[str, Any]:
        method = binding.method
        text = self.comment(method.full_name)
        path_fields = [variable.field_path for variable in binding.path.variables]
        operation: dict[str, Any] = {
            "operationId": operation_id,
            "tags": [method.containing_service.name],
            "summary": _summary(text) or _words(method.name),
            "x-grpc-method": f"{method.containing_service.full_name}/{method.name}",
        }
        if text:
            operation["description"] = text

        parameters = [self._path_parameter(binding, field_path) for field_path in path_fields]
        if not binding.body:
            parameters += self._query_parameters(method.input_type, exclude=set(path_fields))
        if binding.is_server_streaming and _text_capable(binding):
            parameters.append(
                {
                    "name": FORMAT_PARAMETER,
                    "in": "query",
                    "description": "`text` answers the data as text/plain; the default is NDJSON.",
                    "schema": {"type": "string", "enum": ["ndjson", "json", "text"]},
                }
            )
        if parameters:
            operation["parameters"] = parameters
        if binding.body:
            operation["requestBody"] = self._request_body(binding, exclude=set(path_fields))

        success = (
            self._stream_response(binding) if binding.is_server_streaming else self._unary(binding)
        )
        operation["responses"] = {
            "200": success,
            **{str(code): {"$ref": f"#/components/responses/{code}"} for code in _ERROR_CODES},
        }
        return operation

    def _unary(self, binding: HttpBinding) -> dict[str, Any]:
        output = binding.method.output_type
        return {
            "description": self.comment(output.full_name) or output.name,
            "content": {JSON: {"schema": self._ref(output)}},
        }

    def _stream_response(self, binding: HttpBinding) -> dict[str, Any]:
        output = binding.method.output_type
        line = {
            "oneOf": [
                {
                    "type": "object",
                    "required": ["result"],
                    "properties": {"result": self._ref(output)},
                    "additionalProperties": False,
                },
                {"$ref": _REF + _STREAM_ERROR_SCHEMA},
            ]
        }
        content: dict[str, Any] = {
            NDJSON: {"schema": {**line, "description": "One line of the stream."}}
        }
        if _text_capable(binding):
            content[TEXT] = {"schema": {"type": "string"}}
        return {
            "description": f"A stream of {output.name}, one JSON document per line.",
            "content": content,
        }

    def _path_parameter(self, binding: HttpBinding, field_path: str) -> dict[str, Any]:
        fields = resolve_field_path(binding.method.input_type, field_path)
        schema = self._single_schema(fields[-1])
        if schema.get("type") == "string":
            # A path segment cannot be empty.
            schema = {**schema, "minLength": 1}
        parameter = {"name": field_path, "in": "path", "required": True, "schema": schema}
        return self._describe(parameter, fields[-1])

    def _query_parameters(
        self, message: Descriptor, *, exclude: set[str], prefix: str = "", depth: int = 0
    ) -> list[dict[str, Any]]:
        parameters: list[dict[str, Any]] = []
        for field in message.fields:
            name = prefix + field.name
            if name in exclude or _is_map(field):
                continue
            nested = field.message_type
            if nested is not None and nested.full_name not in _WELL_KNOWN:
                # Set by dotted names; repeated messages and deep cycles cannot be.
                if not field.is_repeated and depth < 4:
                    parameters += self._query_parameters(
                        nested, exclude=exclude, prefix=f"{name}.", depth=depth + 1
                    )
                continue
            if nested is not None and nested.full_name not in _WELL_KNOWN_SCALARS:
                continue
            parameter: dict[str, Any] = {"name": name, "in": "query"}
            if field.is_repeated:
                parameter |= {
                    "schema": {"type": "array", "items": self._single_schema(field)},
                    "style": "form",
                    "explode": True,
                }
            else:
                parameter["schema"] = self._single_schema(field)
            if field_behavior_pb2.REQUIRED in _behaviors(field):
                parameter["required"] = True
            parameters.append(self._describe(parameter, field))
        return parameters

    def _request_body(self, binding: HttpBinding, *, exclude: set[str]) -> dict[str, Any]:
        message = binding.method.input_type
        if binding.body == "*":
            if exclude & set(message.fields_by_name):
                schema = self._message_schema(message, exclude=exclude)
                bound = ", ".join(sorted(exclude))
                schema["description"] = f"{message.name} without the fields in the path ({bound})."
            else:
                schema = self._ref(message)
        else:
            schema = self._field_schema(resolve_field_path(message, binding.body)[-1])
        # An empty body means every field at its default.
        return {"required": False, "content": {JSON: {"schema": schema}}}

    def _describe(self, parameter: dict[str, Any], field: FieldDescriptor) -> dict[str, Any]:
        text = self.comment(field.full_name)
        return {**parameter, "description": text} if text else parameter

    def _ref(self, message: Descriptor) -> dict[str, Any]:
        """A reference to the component schema of ``message``, adding it (and its types)."""
        name = self._component_name(message.full_name)
        if name not in self._schemas:
            self._schemas[name] = {}  # Reserved first, so recursive messages terminate.
            self._schemas[name] = self._message_schema(message)
        return {"$ref": _REF + name}

    def _enum_ref(self, enum: EnumDescriptor) -> dict[str, Any]:
        name = self._component_name(enum.full_name)
        if name not in self._schemas:
            lines = [self.comment(enum.full_name)] if self.comment(enum.full_name) else []
            described = [
                f"- `{value.name}`: {self.comment(f'{enum.full_name}.{value.name}')}"
                for value in enum.values
                if self.comment(f"{enum.full_name}.{value.name}")
            ]
            schema: dict[str, Any] = {
                "type": "string",
                "enum": [value.name for value in enum.values],
            }
            if lines or described:
                schema["description"] = "\n".join([*lines, *described])
            self._schemas[name] = schema
        return {"$ref": _REF + name}

    def _component_name(self, full_name: str) -> str:
        name = self._names.get(full_name)
        if name is None:
            local = full_name.removeprefix(f"{self._package}.") if self._package else full_name
            name = self._names[full_name] = local
        return name

    def _message_schema(
        self, message: Descriptor, *, exclude: Iterable[str] = ()
    ) -> dict[str, Any]:
        excluded = set(exclude)
        fields = [field for field in message.fields if field.name not in excluded]
        required = [f.name for f in fields if field_behavior_pb2.REQUIRED in _behaviors(f)]
        if message.full_name in self._output_only:
            required += [f.name for f in fields if not f.has_presence and f.name not in required]
        schema: dict[str, Any] = {
            "type": "object",
            "properties": {field.name: self._field_schema(field) for field in fields},
            "additionalProperties": False,
        }
        if required:
            schema["required"] = required
        text = self.comment(message.full_name)
        oneofs = [
            f"At most one of {', '.join(f'`{f.name}`' for f in oneof.fields)} is set."
            for oneof in message.oneofs
            # A one-field oneof is what `optional` declares.
            if len(oneof.fields) > 1
        ]
        if text or oneofs:
            schema["description"] = "\n\n".join(part for part in [text, *oneofs] if part)
        return schema

    def _field_schema(self, field: FieldDescriptor) -> dict[str, Any]:
        if _is_map(field) and field.message_type is not None:
            value = field.message_type.fields_by_name["value"]
            schema: dict[str, Any] = {
                "type": "object",
                "additionalProperties": self._single_schema(value),
            }
        elif field.is_repeated:
            schema = {"type": "array", "items": self._single_schema(field)}
        else:
            schema = self._single_schema(field)

        behaviors = _behaviors(field)
        extra: dict[str, Any] = {}
        if field_behavior_pb2.OUTPUT_ONLY in behaviors:
            extra["readOnly"] = True
        if field_behavior_pb2.INPUT_ONLY in behaviors:
            extra["writeOnly"] = True
        text = self.comment(field.full_name)
        if text:
            extra["description"] = text
        if not extra:
            return schema
        if "$ref" in schema:
            # OpenAPI 3.0 ignores the siblings of a $ref.
            return {"allOf": [schema], **extra}
        return {**schema, **extra}

    def _single_schema(self, field: FieldDescriptor) -> dict[str, Any]:
        """The schema of one value of ``field`` (an element, for repeated fields)."""
        if field.enum_type is not None:
            return self._enum_ref(field.enum_type)
        message = field.message_type
        if message is None:
            return dict(_SCALARS[field.type])
        if message.full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[message.full_name])
        return self._ref(message)


def _gateway_schemas() -> dict[str, dict[str, Any]]:
    """The error bodies, as :class:`agentapi_gateway.errors.ErrorStatus` writes them."""
    names = sorted(code.name for code in grpc.StatusCode if code is not grpc.StatusCode.OK)
    fields: dict[str, Any] = {
        "status": {"type": "string", "enum": names, "description": "The gRPC code's name."},
        "message": {"type": "string", "description": "What happened, for a person."},
        "reason": {"type": "string", "description": "Short machine-readable cause, if any."},
    }
    return {
        _ERROR_SCHEMA: _error_envelope(
            {"code": {"type": "integer", "description": "The HTTP status."}, **fields},
            description="The body of every error response.",
        ),
        _STREAM_ERROR_SCHEMA: _error_envelope(
            {
                "code": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": 16,
                    "description": "The gRPC code number (the HTTP status was sent already).",
                },
                **fields,
            },
            description="The last line of a stream that failed after it began.",
        ),
    }


def _error_envelope(fields: dict[str, Any], *, description: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description,
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "status", "message"],
                "properties": fields,
                "additionalProperties": False,
            }
        },
        "additionalProperties": False,
    }


def _codes_by_http_status() -> dict[int, list[str]]:
    """HTTP status -> the gRPC code names the gateway answers with it (errors.py decides)."""
    by_status: dict[int, set[str]] = {}
    for code in grpc.StatusCode:
        if code is grpc.StatusCode.OK:
            continue
        for detail in ("", "too large"):
            by_status.setdefault(http_status(code, detail=detail), set()).add(code.name)
    return {status: sorted(names) for status, names in sorted(by_status.items())}


_ERROR_CODES: Final = tuple(_codes_by_http_status())


def _error_responses() -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, names in _codes_by_http_status().items():
        schema = {
            "allOf": [
                {"$ref": _REF + _ERROR_SCHEMA},
                {
                    "type": "object",
                    "properties": {
                        "error": {
                            "type": "object",
                            "properties": {
                                "code": {"type": "integer", "enum": [status]},
                                "status": {"type": "string", "enum": names},
                            },
                        }
                    },
                },
            ]
        }
        response: dict[str, Any] = {
            "description": " or ".join(names),
            "content": {JSON: {"schema": schema}},
        }
        if all(ErrorStatus(grpc.StatusCode[name], "").headers() for name in names):
            response["headers"] = {
                "Retry-After": {
                    "description": "Seconds to wait before retrying.",
                    "required": True,
                    "schema": {"type": "integer", "minimum": 1},
                }
            }
        responses[str(status)] = response
    return responses


def _single_segment_variables(template: str) -> bool:
    """Whether every wildcard of ``template`` is a variable of one segment (``{f}``, ``{f=*}``)."""
    variables = re.findall(r"\{[^}]*\}", template)
    if any("=" in variable and not variable.endswith("=*}") for variable in variables):
        return False
    literal = re.sub(r"\{[^}]*\}", "", template.partition(":")[0])
    return "*" not in literal


def _text_capable(binding: HttpBinding) -> bool:
    """Whether the stream can be read as text (the rule of handlers.server_stream_handler)."""
    data = binding.method.output_type.fields_by_name.get("data")
    return (
        data is not None
        and data.type == FieldDescriptor.TYPE_BYTES
        and not data.is_repeated
        and FORMAT_PARAMETER not in binding.method.input_type.fields_by_name
    )


def _reachable(roots: Iterable[Descriptor]) -> set[str]:
    """Full names of ``roots`` and of every message their fields reach."""
    seen: set[str] = set()
    pending = list(roots)
    while pending:
        message = pending.pop()
        if message.full_name in seen:
            continue
        seen.add(message.full_name)
        pending.extend(f.message_type for f in message.fields if f.message_type is not None)
    return seen


def _behaviors(field: FieldDescriptor) -> set[int]:
    return set(field.GetOptions().Extensions[field_behavior_pb2.field_behavior])


def _is_map(field: FieldDescriptor) -> bool:
    message = field.message_type
    return message is not None and field.is_repeated and message.GetOptions().map_entry


def _summary(text: str) -> str:
    first = " ".join(text.split())
    match = re.match(r"(.+?\.)(\s|$)", first)
    return match[1] if match else first


def _words(name: str) -> str:
    """``CreateAgent`` -> ``Create agent``."""
    return re.sub(r"(?<!^)(?=[A-Z])", " ", name).capitalize()
