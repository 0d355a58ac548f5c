"""The REST route table, read from the ``google.api.http`` options of the proto.

The proto is the only definition of the REST routes: this module walks the
service descriptor's methods, reads each ``(google.api.http)`` rule and its
``additional_bindings``, and turns every path template into an aiohttp
route. Nothing here does I/O; a template or field the gateway cannot serve
fails at start-up with ValueError.

Path templates follow ``google/api/http.proto``::

    Template = "/" Segments [ Verb ] ;
    Segment  = "*" | "**" | LITERAL | Variable ;
    Variable = "{" FieldPath [ "=" Segments ] "}" ;
    Verb     = ":" LITERAL ;

``*`` matches one path segment and ``**`` the rest of the path; a trailing
``/**`` also matches when the rest is empty, without the slash, so
``/agents/a1/proxy`` and ``/agents/a1/proxy/`` both reach the agent's root.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from google.api import annotations_pb2, http_pb2  # type: ignore[import-untyped]
from google.protobuf.descriptor import (
    Descriptor,
    FieldDescriptor,
    MethodDescriptor,
    ServiceDescriptor,
)

# aiohttp's name for "any method", used for google.api.http's custom kind "*".
ANY_METHOD: Final = "*"

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_FIELD_PATH = re.compile(rf"{_IDENT}(?:\.{_IDENT})*")
_LITERAL = re.compile(r"[^/{}*:=]+")
_ONE_SEGMENT = "[^/]+"


@dataclass(frozen=True)
class PathVariable:
    """A template variable: where aiohttp puts its value and which request field it sets."""

    route_name: str
    field_path: str
    # A "**" variable at the end: its aiohttp match starts with the "/" it absorbed.
    is_tail: bool = False


@dataclass(frozen=True)
class PathTemplate:
    """A parsed ``google.api.http`` path template and its aiohttp form."""

    template: str
    aiohttp_path: str
    variables: tuple[PathVariable, ...]
    # Number of segments before a trailing "**", when there is one: the raw
    # request path after that many segments is the rest (see the proxy).
    tail_index: int | None = None

    def field_values(self, match_info: dict[str, str] | None) -> dict[str, str]:
        """Field path -> value for the variables of a matched request (values decoded)."""
        values: dict[str, str] = {}
        for variable in self.variables:
            value = (match_info or {}).get(variable.route_name, "")
            values[variable.field_path] = value.removeprefix("/") if variable.is_tail else value
        return values


@dataclass(frozen=True)
class HttpBinding:
    """One REST route of one RPC."""

    method: MethodDescriptor
    # "GET", "POST", ... or ANY_METHOD.
    http_method: str
    path: PathTemplate
    # "" (no body), "*" (the whole request message) or a field path.
    body: str

    @property
    def rpc_name(self) -> str:
        return self.method.name

    @property
    def is_unary(self) -> bool:
        return not self.method.client_streaming and not self.method.server_streaming

    @property
    def is_server_streaming(self) -> bool:
        return not self.method.client_streaming and self.method.server_streaming

    @property
    def is_bidi_streaming(self) -> bool:
        return self.method.client_streaming and self.method.server_streaming


def service_bindings(service: ServiceDescriptor) -> list[HttpBinding]:
    """Every HTTP binding of every method of ``service``, in declaration order.

    Raises ValueError for a template, body or field the gateway cannot serve,
    or when two bindings claim the same HTTP method and path.
    """
    bindings: list[HttpBinding] = []
    for method in service.methods:
        options = method.GetOptions()
        if not options.HasExtension(annotations_pb2.http):
            continue
        rule: http_pb2.HttpRule = options.Extensions[annotations_pb2.http]
        bindings.append(_binding(method, rule))
        for extra in rule.additional_bindings:
            if extra.additional_bindings:
                raise ValueError(f"{method.full_name}: additional_bindings may not nest")
            bindings.append(_binding(method, extra))

    seen: dict[tuple[str, str], str] = {}
    for binding in bindings:
        key = (binding.http_method, binding.path.aiohttp_path)
        if key in seen:
            raise ValueError(
                f"{binding.method.full_name} and {seen[key]} both bind "
                f"{binding.http_method} {binding.path.template}"
            )
        seen[key] = binding.method.full_name
    return bindings


def parse_template(template: str) -> PathTemplate:
    """Parse a ``google.api.http`` path template into its aiohttp route form.

    Raises ValueError when ``template`` does not follow the grammar.
    """
    if not template.startswith("/"):
        raise ValueError(f"path template {template!r} must start with '/'")
    segments, verb = _split_template(template[1:], template=template)

    parts: list[str] = []
    variables: list[PathVariable] = []
    used_names: set[str] = set()
    tail_index: int | None = None

    def route_name(field_path: str | None) -> str:
        base = field_path.replace(".", "__") if field_path else f"_segment{len(used_names)}"
        name = base
        while name in used_names:
            name = f"{base}_{len(used_names)}"
        used_names.add(name)
        return name

    for index, segment in enumerate(segments):
        is_last = index == len(segments) - 1
        field_path, pattern = _variable(segment, template=template)
        if pattern == ["**"]:
            if not is_last or verb:
                raise ValueError(f"path template {template!r}: '**' must end the template")
            tail_index = index
            name = route_name(field_path)
            if field_path is not None:
                variables.append(PathVariable(name, field_path, is_tail=bool(parts)))
            # With segments before it, "**" takes the slash too so the rest may be empty.
            if parts:
                parts[-1] += f"{{{name}:(?:/.*)?}}"
            else:
                parts.append(f"{{{name}:.*}}")
            continue
        if field_path is None:
            if pattern == ["*"]:
                parts.append(f"{{{route_name(None)}:{_ONE_SEGMENT}}}")
            else:
                parts.append(pattern[0])
            continue
        name = route_name(field_path)
        variables.append(PathVariable(name, field_path))
        if pattern == ["*"]:
            # aiohttp's own default pattern is one segment.
            parts.append(f"{{{name}}}")
        else:
            parts.append(f"{{{name}:{_segments_regex(pattern, template=template)}}}")

    path = "/" + "/".join(parts)
    if verb:
        path += ":" + verb
    return PathTemplate(template, path, tuple(variables), tail_index)


def resolve_field_path(message: Descriptor, field_path: str) -> list[FieldDescriptor]:
    """The fields along a dotted path of proto field names; ValueError if one is missing."""
    fields: list[FieldDescriptor] = []
    descriptor: Descriptor | None = message
    for name in field_path.split("."):
        field = descriptor.fields_by_name.get(name) if descriptor is not None else None
        if field is None:
            raise ValueError(f"{message.full_name} has no field {field_path!r}")
        fields.append(field)
        descriptor = field.message_type
    return fields


def _binding(method: MethodDescriptor, rule: http_pb2.HttpRule) -> HttpBinding:
    kind = rule.WhichOneof("pattern")
    if kind is None:
        raise ValueError(f"{method.full_name}: google.api.http rule has no pattern")
    if kind == "custom":
        http_method = rule.custom.kind.upper()
        template = rule.custom.path
    else:
        http_method = kind.upper()
        template = getattr(rule, kind)
    if http_method != ANY_METHOD and not re.fullmatch(r"[A-Z]+", http_method):
        raise ValueError(f"{method.full_name}: HTTP method {http_method!r} is not a token")
    if rule.response_body:
        # Not used by our proto; supporting it means rendering a field, not the message.
        raise ValueError(f"{method.full_name}: response_body is not supported by the gateway")

    path = parse_template(template)
    # A client-streaming request is not built from the URL: the proxy reads its variables.
    if not method.client_streaming:
        for variable in path.variables:
            _check_bindable(method, variable.field_path)
        if rule.body and rule.body != "*":
            _check_bindable(method, rule.body, allow_message=True)
    return HttpBinding(method, http_method, path, rule.body)


def _check_bindable(
    method: MethodDescriptor, field_path: str, *, allow_message: bool = False
) -> None:
    fields = resolve_field_path(method.input_type, field_path)
    leaf = fields[-1]
    if leaf.is_repeated and not allow_message:
        raise ValueError(f"{method.full_name}: path variable {field_path!r} is repeated")
    if leaf.message_type is not None and not allow_message:
        raise ValueError(f"{method.full_name}: path variable {field_path!r} is a message")


def _split_template(text: str, *, template: str) -> tuple[list[str], str]:
    """Segments and verb of a template without its leading "/"."""
    segments: list[str] = []
    current: list[str] = []
    depth = 0
    verb = ""
    for position, char in enumerate(text):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth < 0:
                raise ValueError(f"path template {template!r} has an unmatched '}}'")
        elif depth == 0 and char == "/":
            segments.append("".join(current))
            current = []
            continue
        elif depth == 0 and char == ":":
            verb = text[position + 1 :]
            if not _LITERAL.fullmatch(verb) or "/" in verb:
                raise ValueError(f"path template {template!r} has a bad verb {verb!r}")
            break
        current.append(char)
    if depth != 0:
        raise ValueError(f"path template {template!r} has an unmatched '{{'")
    segments.append("".join(current))
    if any(not segment for segment in segments) and segments != [""]:
        raise ValueError(f"path template {template!r} has an empty segment")
    return [s for s in segments if s], verb


def _variable(segment: str, *, template: str) -> tuple[str | None, list[str]]:
    """(field path or None, the segment patterns it matches) for one top-level segment."""
    if not segment.startswith("{"):
        if segment not in {"*", "**"} and not _LITERAL.fullmatch(segment):
            raise ValueError(f"path template {template!r} has a bad segment {segment!r}")
        return None, [segment]
    if not segment.endswith("}"):
        raise ValueError(f"path template {template!r}: a variable must be a whole segment")
    inner = segment[1:-1]
    field_path, _, sub = inner.partition("=")
    if not _FIELD_PATH.fullmatch(field_path):
        raise ValueError(f"path template {template!r} has a bad field path {field_path!r}")
    pattern = sub.split("/") if sub else ["*"]
    for part in pattern:
        if part not in {"*", "**"} and not _LITERAL.fullmatch(part):
            raise ValueError(f"path template {template!r} has a bad variable pattern {sub!r}")
    if "**" in pattern[:-1] or (pattern[-1] == "**" and len(pattern) > 1):
        # "{name=a/**}" would need the tail logic inside a variable; no proto of ours uses it.
        raise ValueError(f"path template {template!r}: '**' inside a variable must stand alone")
    return field_path, pattern


def _segments_regex(pattern: Sequence[str], *, template: str) -> str:
    pieces = [_ONE_SEGMENT if part == "*" else re.escape(part) for part in pattern]
    regex = "/".join(pieces)
    if "{" in regex or "}" in regex:
        raise ValueError(f"path template {template!r} cannot be expressed as an aiohttp route")
    return regex
