"""Label and field selectors with the syntax and error messages of the API server."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .names import label_key_errors, label_value_errors
from .status import bad_request

Operator = Literal["=", "!=", "in", "notin", "exists", "!", "gt", "lt"]

_SET_BASED = re.compile(r"^(?P<key>[^\s=!<>(),]+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)$")
_EQUALITY = re.compile(r"^(?P<key>[^\s=!<>(),]+)\s*(?P<op>==|=|!=|<|>)\s*(?P<value>[^\s=!<>(),]*)$")
_EXISTS = re.compile(r"^(?P<key>[^\s=!<>(),]+)$")


@dataclass(frozen=True)
class Requirement:
    key: str
    op: Operator
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key, "")
        if self.op == "=":
            return present and value == self.values[0]
        if self.op == "!=":
            return not present or value != self.values[0]
        if self.op == "in":
            return present and value in self.values
        if self.op == "notin":
            return not present or value not in self.values
        if self.op == "exists":
            return present
        if self.op == "!":
            return not present
        try:
            number = int(value)
        except ValueError:
            return False
        limit = int(self.values[0])
        return present and (number > limit if self.op == "gt" else number < limit)


LabelSelector = tuple[Requirement, ...]


def _split_top_level(text: str) -> list[str]:
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _fail(detail: str) -> Exception:
    return bad_request(f"unable to parse requirement: {detail}")


def _checked(key: str, values: tuple[str, ...]) -> None:
    errors = label_key_errors(key, "key")
    for index, value in enumerate(values):
        errors += label_value_errors(value, f"values[{index}][{key}]")
    if errors:
        raise _fail(errors[0].message())


def parse_label_selector(text: str) -> LabelSelector:
    """Parse ``app=x,tier!=db,env in (a,b),!legacy``; raises 400 BadRequest when malformed."""
    if not text.strip():
        return ()
    requirements: list[Requirement] = []
    for raw in _split_top_level(text):
        part = raw.strip()
        if not part:
            raise _fail(f"found '', expected: identifier in {text!r}")
        if part.startswith("!"):
            key = part[1:].strip()
            _checked(key, ())
            requirements.append(Requirement(key, "!"))
            continue
        if match := _SET_BASED.match(part):
            values = tuple(v.strip() for v in match["values"].split(",") if v.strip())
            if not values:
                raise _fail(f"for 'in', 'notin' operators, values set can't be empty: {part!r}")
            _checked(match["key"], values)
            op: Operator = "in" if match["op"] == "in" else "notin"
            requirements.append(Requirement(match["key"], op, values))
            continue
        if match := _EQUALITY.match(part):
            symbol = match["op"]
            value = match["value"]
            if symbol in ("<", ">"):
                if not re.fullmatch(r"-?\d+", value):
                    raise _fail(f"for 'Gt', 'Lt' operators, the value must be an integer: {part!r}")
                _checked(match["key"], ())
                requirements.append(
                    Requirement(match["key"], "gt" if symbol == ">" else "lt", (value,))
                )
                continue
            _checked(match["key"], (value,))
            requirements.append(
                Requirement(match["key"], "!=" if symbol == "!=" else "=", (value,))
            )
            continue
        if match := _EXISTS.match(part):
            _checked(match["key"], ())
            requirements.append(Requirement(match["key"], "exists"))
            continue
        raise _fail(f"found {part!r}, expected: in, notin, =, ==, !=, gt, lt")
    return tuple(requirements)


def selector_from_object(selector: Mapping[str, Any] | None) -> LabelSelector:
    """A ``metav1.LabelSelector`` (matchLabels + matchExpressions) as requirements."""
    if not selector:
        return ()
    requirements = [
        Requirement(key, "=", (str(value),))
        for key, value in sorted((selector.get("matchLabels") or {}).items())
    ]
    operators: dict[str, Operator] = {
        "In": "in",
        "NotIn": "notin",
        "Exists": "exists",
        "DoesNotExist": "!",
    }
    for expression in selector.get("matchExpressions") or []:
        requirements.append(
            Requirement(
                expression["key"],
                operators[expression["operator"]],
                tuple(expression.get("values") or ()),
            )
        )
    return tuple(requirements)


def labels_match(selector: LabelSelector, labels: Mapping[str, str] | None) -> bool:
    labels = labels or {}
    return all(requirement.matches(labels) for requirement in selector)


@dataclass(frozen=True)
class FieldRequirement:
    field: str
    value: str
    negate: bool


FieldSelector = tuple[FieldRequirement, ...]


def _split_unescaped(text: str, separator: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for char in text:
        if escaped:
            current.append("\\" + char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def parse_field_selector(text: str, supported: frozenset[str]) -> FieldSelector:
    """Parse ``metadata.name=x,status.phase!=Running``; only ``supported`` fields allowed."""
    if not text.strip():
        return ()
    requirements: list[FieldRequirement] = []
    for part in _split_unescaped(text, ","):
        match = re.match(r"^(?P<field>[^=!]+)(?P<op>!=|==|=)(?P<value>.*)$", part)
        if match is None:
            raise bad_request(f"invalid selector: '{text}'; can't understand '{part}'")
        field = match["field"].strip()
        if field not in supported:
            raise bad_request(f"field label not supported: {field}")
        requirements.append(FieldRequirement(field, _unescape(match["value"]), match["op"] == "!="))
    return tuple(requirements)


def field_value(obj: Mapping[str, Any], path: str) -> str:
    if path == "source":
        return str((obj.get("source") or {}).get("component", ""))
    current: Any = obj
    for part in path.split("."):
        if not isinstance(current, Mapping):
            return ""
        current = current.get(part)
    if current is None:
        return ""
    if isinstance(current, bool):
        return "true" if current else "false"
    return str(current)


def fields_match(selector: FieldSelector, obj: Mapping[str, Any]) -> bool:
    for requirement in selector:
        equal = field_value(obj, requirement.field) == requirement.value
        if equal == requirement.negate:
            return False
    return True
