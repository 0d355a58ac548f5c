"""Kubernetes ``Status`` payloads and the one exception the double's layers raise.

Every failure the fake API server answers with is an :class:`ApiError`
carrying the ``Status`` object a real API server would send (same ``reason``,
``code``, message wording and ``details``); the HTTP layer turns it into a
response in one place (``server.py``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

JsonObject = dict[str, Any]

FieldErrorType = Literal[
    "FieldValueInvalid",
    "FieldValueRequired",
    "FieldValueForbidden",
    "FieldValueNotSupported",
    "FieldValueNotFound",
    "FieldValueDuplicate",
    "FieldValueTooLong",
]

_NO_VALUE: Final = object()


def render_value(value: object) -> str:
    """A value as the API server prints it in field errors (Go ``%#v``-like)."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


@dataclass(frozen=True)
class FieldError:
    """One entry of an ``Invalid`` status, e.g. ``metadata.name: Invalid value: ...``."""

    field: str
    type: FieldErrorType
    detail: str = ""
    value: object = _NO_VALUE

    @classmethod
    def invalid(cls, field: str, value: object, detail: str) -> FieldError:
        return cls(field, "FieldValueInvalid", detail, value)

    @classmethod
    def required(cls, field: str, detail: str = "") -> FieldError:
        return cls(field, "FieldValueRequired", detail)

    @classmethod
    def forbidden(cls, field: str, detail: str) -> FieldError:
        return cls(field, "FieldValueForbidden", detail)

    @classmethod
    def not_supported(cls, field: str, value: object, supported: Sequence[str]) -> FieldError:
        detail = "supported values: " + ", ".join(json.dumps(s) for s in supported)
        return cls(field, "FieldValueNotSupported", detail, value)

    @classmethod
    def not_found(cls, field: str, value: object) -> FieldError:
        return cls(field, "FieldValueNotFound", "", value)

    @classmethod
    def duplicate(cls, field: str, value: object) -> FieldError:
        return cls(field, "FieldValueDuplicate", "", value)

    @classmethod
    def too_long(cls, field: str, limit: int) -> FieldError:
        return cls(field, "FieldValueTooLong", f"must have at most {limit} bytes")

    def body(self) -> str:
        """The message without the field path, as in ``Status.details.causes[].message``."""
        title = {
            "FieldValueInvalid": "Invalid value",
            "FieldValueRequired": "Required value",
            "FieldValueForbidden": "Forbidden",
            "FieldValueNotSupported": "Unsupported value",
            "FieldValueNotFound": "Not found",
            "FieldValueDuplicate": "Duplicate value",
            "FieldValueTooLong": "Too long",
        }[self.type]
        parts = [title]
        if self.value is not _NO_VALUE:
            parts.append(render_value(self.value))
        if self.detail:
            parts.append(self.detail)
        return ": ".join(parts)

    def message(self) -> str:
        return f"{self.field}: {self.body()}" if self.field else self.body()


class ApiError(Exception):
    """A request failed; ``status`` is the exact ``Status`` object to send back."""

    def __init__(self, status: JsonObject, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(status.get("message", ""))
        self.status = status
        self.headers = headers or {}

    @property
    def code(self) -> int:
        return int(self.status["code"])

    @property
    def reason(self) -> str:
        return str(self.status.get("reason", ""))

    @property
    def message(self) -> str:
        return str(self.status.get("message", ""))


def status_object(
    code: int,
    reason: str,
    message: str,
    *,
    details: JsonObject | None = None,
) -> JsonObject:
    status: JsonObject = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
    }
    if details is not None:
        status["details"] = details
    status["code"] = code
    return status


def success_status(*, name: str, group: str, kind: str, uid: str) -> JsonObject:
    """What DELETE answers for kinds that do not return the deleted object."""
    details: JsonObject = {"name": name, "kind": kind, "uid": uid}
    if group:
        details["group"] = group
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": details,
    }


def _details(name: str, group: str, kind: str) -> JsonObject:
    details: JsonObject = {}
    if name:
        details["name"] = name
    if group:
        details["group"] = group
    details["kind"] = kind
    return details


def qualified(resource: str, group: str) -> str:
    """``statefulsets.apps`` for a grouped resource, ``pods`` for the core group."""
    return f"{resource}.{group}" if group else resource


def not_found(resource: str, group: str, name: str) -> ApiError:
    return ApiError(
        status_object(
            404,
            "NotFound",
            f'{qualified(resource, group)} "{name}" not found',
            details=_details(name, group, resource),
        )
    )


def already_exists(resource: str, group: str, name: str) -> ApiError:
    return ApiError(
        status_object(
            409,
            "AlreadyExists",
            f'{qualified(resource, group)} "{name}" already exists',
            details=_details(name, group, resource),
        )
    )


def conflict(resource: str, group: str, name: str, why: str) -> ApiError:
    return ApiError(
        status_object(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {qualified(resource, group)} "{name}": {why}',
            details=_details(name, group, resource),
        )
    )


MODIFIED_CONFLICT: Final = (
    "the object has been modified; please apply your changes to the latest version and try again"
)


def invalid(kind: str, group: str, name: str, errors: Sequence[FieldError]) -> ApiError:
    """422 Invalid, worded like ``StatefulSet.apps "x" is invalid: field: ...``."""
    qualified_kind = f"{kind}.{group}" if group else kind
    messages = [e.message() for e in errors]
    joined = messages[0] if len(messages) == 1 else "[" + ", ".join(messages) + "]"
    details = _details(name, group, kind)
    details["causes"] = [{"reason": e.type, "message": e.body(), "field": e.field} for e in errors]
    return ApiError(
        status_object(
            422, "Invalid", f'{qualified_kind} "{name}" is invalid: {joined}', details=details
        )
    )


def bad_request(message: str) -> ApiError:
    return ApiError(status_object(400, "BadRequest", message))


def unauthorized() -> ApiError:
    return ApiError(status_object(401, "Unauthorized", "Unauthorized"))


def forbidden(resource: str, group: str, name: str, why: str) -> ApiError:
    subject = qualified(resource, group)
    if name:
        subject = f'{subject} "{name}"'
    return ApiError(
        status_object(
            403,
            "Forbidden",
            f"{subject} is forbidden: {why}",
            details=_details(name, group, resource),
        )
    )


def forbidden_path(why: str) -> ApiError:
    return ApiError(status_object(403, "Forbidden", f"forbidden: {why}"))


def expired(message: str) -> ApiError:
    """410 Gone with reason ``Expired``: a resource version or continue token too old."""
    return ApiError(status_object(410, "Expired", message))


def method_not_allowed() -> ApiError:
    return ApiError(
        status_object(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )
    )


def unsupported_media_type(content_type: str, accepted: Sequence[str]) -> ApiError:
    return ApiError(
        status_object(
            415,
            "UnsupportedMediaType",
            f"the body of the request was in an unknown format - accepted media types include: "
            f"{', '.join(accepted)}",
        )
    )


def service_unavailable(message: str) -> ApiError:
    return ApiError(status_object(503, "ServiceUnavailable", message))


def internal_error(message: str) -> ApiError:
    return ApiError(
        status_object(
            500,
            "InternalError",
            f"Internal error occurred: {message}",
            details={"causes": [{"message": message}]},
        )
    )


_REASONS: Final = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def reason_for_code(code: int) -> str:
    return _REASONS.get(code, "Unknown")
