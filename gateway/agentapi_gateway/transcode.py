"""HTTP request parts to request messages, and response messages to JSON.

The JSON is proto3 JSON with the proto's own field names (``agent_id``,
``create_time``), the spelling the path templates and the proto use;
requests may use either those or the lowerCamelCase JSON names. Responses
print every field, defaults included (``"created": false``), and enums by
name. Durations are strings such as ``"30s"``, timestamps RFC 3339.

Query parameters name fields by proto or JSON name, nested fields with
dots (``since.seconds``), repeated fields by repeating the parameter. Their
values are converted by field type: booleans accept true/false/1/0 and an
empty value as true (``?follow``), enums a name or number, Duration,
Timestamp and the wrapper types their JSON string form. Maps and other
messages cannot be set from the query string; a body (or dotted names) can.

A field the path sets cannot be set by the query string too; a field that
the URL and the body both set must have the same value in both.
Every problem raises InvalidArgument with a message naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from typing import Any, Final, TypeVar, cast

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from agentapi_proxy.errors import InvalidArgument

# Well-known types whose proto3 JSON form is a string or a scalar.
_JSON_SCALAR_MESSAGES: Final = frozenset(
    {
        "google.protobuf.Duration",
        "google.protobuf.Timestamp",
        "google.protobuf.FieldMask",
        "google.protobuf.DoubleValue",
        "google.protobuf.FloatValue",
        "google.protobuf.Int64Value",
        "google.protobuf.UInt64Value",
        "google.protobuf.Int32Value",
        "google.protobuf.UInt32Value",
        "google.protobuf.BoolValue",
        "google.protobuf.StringValue",
        "google.protobuf.BytesValue",
    }
)
_TRUE: Final = frozenset({"", "true", "1", "t", "yes"})
_FALSE: Final = frozenset({"false", "0", "f", "no"})

FieldPath = tuple[FieldDescriptor, ...]
M = TypeVar("M", bound=Message)


def build_request(
    message_class: type[M],
    *,
    path_values: Mapping[str, str],
    query: Iterable[tuple[str, str]] = (),
    body: Any = None,
    body_field: str = "",
    reserved_query: Collection[str] = (),
) -> M:
    """A request message from path variables, query parameters and a JSON body.

    ``path_values`` maps proto field paths to decoded path segments;
    ``body`` is parsed JSON (None when there is none) and goes into the
    whole message when ``body_field`` is "*", else into that field.
    Query parameters named in ``reserved_query`` belong to the gateway and
    are skipped. Raises InvalidArgument.
    """
    descriptor = cast(Descriptor, message_class.DESCRIPTOR)
    from_body = message_class()
    if body is not None and body_field:
        if body_field == "*":
            if not isinstance(body, dict):
                raise InvalidArgument("the request body must be a JSON object")
            _parse_into(body, from_body)
        else:
            _parse_into(_nest(body_field, body), from_body)

    grouped: dict[FieldPath, list[str]] = {}
    spelled: dict[FieldPath, str] = {}
    for dotted, value in path_values.items():
        fields = _fields_named(descriptor, dotted, source="path variable")
        grouped[fields] = [value]
        spelled[fields] = f"path variable {dotted!r}"
    path_bound = set(grouped)
    for name, value in query:
        if name in reserved_query:
            continue
        fields = _fields_named(descriptor, name, source="query parameter")
        if fields in path_bound:
            raise InvalidArgument(
                f"query parameter {name!r} sets a field that the path already sets"
            )
        grouped.setdefault(fields, []).append(value)
        spelled.setdefault(fields, f"query parameter {name!r}")

    params: dict[str, Any] = {}
    for fields, values in grouped.items():
        _place(params, fields, _json_value(fields, values, spelled=spelled[fields]))
    from_params = message_class()
    _parse_into(params, from_params)

    for fields in grouped:
        _check_agrees(from_body, from_params, fields, spelled=spelled[fields])
    request = message_class()
    request.MergeFrom(from_body)
    request.MergeFrom(from_params)
    return request


def message_to_json(message: Message) -> dict[str, Any]:
    """A message as proto3 JSON with proto field names, every field printed, enums by name."""
    return json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )


def field_by_name(descriptor: Descriptor, name: str) -> FieldDescriptor | None:
    """The field called ``name`` by its proto name or its JSON name."""
    field = descriptor.fields_by_name.get(name)
    if field is not None:
        return field
    return next((f for f in descriptor.fields if f.json_name == name), None)


def _fields_named(descriptor: Descriptor, dotted: str, *, source: str) -> FieldPath:
    fields: list[FieldDescriptor] = []
    current: Descriptor | None = descriptor
    for part in dotted.split("."):
        field = field_by_name(current, part) if current is not None else None
        if field is None:
            known = ", ".join(f.name for f in descriptor.fields)
            raise InvalidArgument(
                f"unknown {source} {dotted!r}: {descriptor.name} has the fields {known}"
            )
        fields.append(field)
        current = _plain_message(field)
    return tuple(fields)


def _plain_message(field: FieldDescriptor) -> Descriptor | None:
    """The message type to descend into by a dotted name, or None for leaves."""
    message = field.message_type
    if message is None or field.is_repeated or message.full_name in _JSON_SCALAR_MESSAGES:
        return None
    return message


def _json_value(fields: FieldPath, values: list[str], *, spelled: str) -> Any:
    leaf = fields[-1]
    message = leaf.message_type
    if message is not None and message.GetOptions().map_entry:
        raise InvalidArgument(f"{spelled} names a map field; set it in the JSON body")
    if message is not None and message.full_name not in _JSON_SCALAR_MESSAGES:
        raise InvalidArgument(f"{spelled} names a message; set its fields with dotted names")
    converted = [_scalar(leaf, value, spelled=spelled) for value in values]
    if leaf.is_repeated:
        return converted
    if len(converted) != 1:
        raise InvalidArgument(f"{spelled} is given {len(converted)} times but takes one value")
    return converted[0]


# kubectl-style durations in query strings ("5m", "1h30m", "250ms"), besides "300s".
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_UNITS: Final = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_PROTO_DURATION = re.compile(r"-?\d+(?:\.\d+)?s")


_INTEGER = re.compile(r"[-+]?\d+")
_INTEGER_TYPES: Final = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED32,
        FieldDescriptor.TYPE_SFIXED64,
    }
)
_UNKNOWN_FIELD = re.compile(r'has no field named "([^"]+)"')


def _duration(value: str) -> str:
    """``value`` in proto3 JSON form; kubectl forms are converted, anything else is kept."""
    text = value.strip()
    if _PROTO_DURATION.fullmatch(text) or not text or _DURATION_PART.sub("", text):
        return value
    seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def _scalar(field: FieldDescriptor, value: str, *, spelled: str) -> Any:
    """The JSON value json_format expects; strings suit every type but bool."""
    if (
        field.message_type is not None
        and field.message_type.full_name == "google.protobuf.Duration"
    ):
        converted = _duration(value)
        if not _PROTO_DURATION.fullmatch(converted.strip()):
            raise InvalidArgument(
                f"{spelled} = {value!r} is not a duration; write it like 300s, 5m or 1h30m"
            )
        return converted
    kind = field.type
    if kind in _INTEGER_TYPES and not _INTEGER.fullmatch(value.strip()):
        raise InvalidArgument(f"{spelled} = {value!r} is not a whole number")
    if field.message_type is not None and field.message_type.full_name.endswith(".BoolValue"):
        kind = FieldDescriptor.TYPE_BOOL
    if kind != FieldDescriptor.TYPE_BOOL:
        return value
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise InvalidArgument(f"{spelled} = {value!r} is not a boolean (true or false)")


def _place(data: dict[str, Any], fields: FieldPath, value: Any) -> None:
    for field in fields[:-1]:
        data = data.setdefault(field.name, {})
    data[fields[-1].name] = value


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    for name in reversed(dotted.split(".")):
        value = {name: value}
    result: dict[str, Any] = value
    return result


def _parse_into(data: dict[str, Any], message: Message) -> None:
    try:
        json_format.ParseDict(data, message, ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        unknown = _UNKNOWN_FIELD.search(str(exc))
        if unknown is not None:
            known = ", ".join(field.name for field in message.DESCRIPTOR.fields)
            raise InvalidArgument(
                f"unknown field {unknown.group(1)!r}; this request takes {known} "
                "(fields the URL path sets are taken from there)"
            ) from exc
        raise InvalidArgument(f"invalid request: {exc}") from exc
    except (TypeError, ValueError, AttributeError) as exc:
        # json_format lets a few type mismatches through as plain Python errors.
        raise InvalidArgument(f"invalid request: a field has the wrong JSON type ({exc})") from exc


def _check_agrees(first: Message, second: Message, fields: FieldPath, *, spelled: str) -> None:
    """Reject a field set in the body to something else than the URL says."""
    mine, theirs = _value_if_set(first, fields), _value_if_set(second, fields)
    if mine is None or theirs is None:
        return
    if fields[-1].is_repeated:
        # Merging would append one list to the other.
        raise InvalidArgument(f"{spelled} and the request body both set {fields[-1].name}")
    if mine != theirs:
        raise InvalidArgument(f"{spelled} and the request body disagree on {fields[-1].name}")


def _value_if_set(message: Message, fields: FieldPath) -> Any:
    for field in fields[:-1]:
        if not message.HasField(field.name):
            return None
        message = getattr(message, field.name)
    leaf = fields[-1]
    if leaf.is_repeated:
        values = list(getattr(message, leaf.name))
        return values or None
    if leaf.has_presence:
        return getattr(message, leaf.name) if message.HasField(leaf.name) else None
    value = getattr(message, leaf.name)
    return None if value == leaf.default_value else value
