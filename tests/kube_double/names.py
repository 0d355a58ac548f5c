"""Name and label syntax checks with the API server's wording.

The JSON schema does not encode these; the real server checks them in its
validation code, so the double does too (e.g. a StatefulSet name is a
DNS-1123 label of at most 63 characters, a Service name a DNS-1035 label).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

from .resources import NameRule
from .status import FieldError

_DNS1123_LABEL: Final = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN: Final = re.compile(
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
)
_DNS1035_LABEL: Final = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_LABEL_VALUE: Final = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_QUALIFIED_NAME_PART: Final = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")

ANNOTATIONS_SIZE_LIMIT: Final = 256 * 1024

_LABEL_MSG: Final = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
    "and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', "
    "regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
_SUBDOMAIN_MSG: Final = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' "
    "or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex "
    "used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
_DNS1035_MSG: Final = (
    "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
    "alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or "
    "'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')"
)
_LABEL_VALUE_MSG: Final = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or "
    "'my_value',  or '12345', regex used for validation is "
    "'(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
)
_QUALIFIED_PART_MSG: Final = (
    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
    "with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used "
    "for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
)


def _max_len(limit: int) -> str:
    return f"must be no more than {limit} characters"


def dns1123_label_messages(value: str) -> list[str]:
    messages = []
    if len(value) > 63:
        messages.append(_max_len(63))
    if not _DNS1123_LABEL.fullmatch(value):
        messages.append(_LABEL_MSG)
    return messages


def dns1123_subdomain_messages(value: str) -> list[str]:
    messages = []
    if len(value) > 253:
        messages.append(_max_len(253))
    if not _DNS1123_SUBDOMAIN.fullmatch(value):
        messages.append(_SUBDOMAIN_MSG)
    return messages


def dns1035_label_messages(value: str) -> list[str]:
    messages = []
    if len(value) > 63:
        messages.append(_max_len(63))
    if not _DNS1035_LABEL.fullmatch(value):
        messages.append(_DNS1035_MSG)
    return messages


def path_segment_messages(value: str) -> list[str]:
    if value in (".", ".."):
        return [f"may not be '{value}'"]
    for bad in ("/", "%"):
        if bad in value:
            return [f"may not contain '{bad}'"]
    return []


def name_messages(rule: NameRule, name: str) -> list[str]:
    if rule is NameRule.DNS1123_LABEL:
        return dns1123_label_messages(name)
    if rule is NameRule.DNS1035_LABEL:
        return dns1035_label_messages(name)
    if rule is NameRule.PATH_SEGMENT:
        return path_segment_messages(name)
    return dns1123_subdomain_messages(name)


def label_value_messages(value: str) -> list[str]:
    messages = []
    if len(value) > 63:
        messages.append(_max_len(63))
    if not _LABEL_VALUE.fullmatch(value):
        messages.append(_LABEL_VALUE_MSG)
    return messages


def qualified_name_messages(key: str) -> list[str]:
    """Messages for a label or annotation key: ``[prefix/]name``."""
    parts = key.split("/")
    if len(parts) > 2:
        return [
            "a qualified name must consist of alphanumeric characters, '-', '_' or '.', and must "
            "start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or "
            "'123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]') "
            "with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"
        ]
    messages = []
    name = parts[-1]
    if len(parts) == 2:
        prefix = parts[0]
        if not prefix:
            messages.append("prefix part must be non-empty")
        else:
            messages += ["prefix part " + m for m in dns1123_subdomain_messages(prefix)]
    if not name:
        messages.append("name part must be non-empty")
    else:
        if len(name) > 63:
            messages.append("name part " + _max_len(63))
        if not _QUALIFIED_NAME_PART.fullmatch(name):
            messages.append(_QUALIFIED_PART_MSG)
    return messages


def label_key_errors(key: str, field: str) -> list[FieldError]:
    return [FieldError.invalid(field, key, m) for m in qualified_name_messages(key)]


def label_value_errors(value: str, field: str) -> list[FieldError]:
    return [FieldError.invalid(field, value, m) for m in label_value_messages(value)]


def labels_errors(labels: object, field: str) -> list[FieldError]:
    """Errors of a ``labels`` map (keys and values), reported on the map's path."""
    if not isinstance(labels, Mapping):
        return []
    errors: list[FieldError] = []
    for key in sorted(labels):
        value = labels[key]
        errors += label_key_errors(str(key), field)
        if isinstance(value, str):
            errors += label_value_errors(value, field)
    return errors


def annotations_errors(annotations: object, field: str) -> list[FieldError]:
    if not isinstance(annotations, Mapping):
        return []
    errors: list[FieldError] = []
    total = 0
    for key in sorted(annotations):
        errors += [
            FieldError.invalid(field, key, m) for m in qualified_name_messages(str(key).lower())
        ]
        total += len(str(key)) + len(str(annotations[key]))
    if total > ANNOTATIONS_SIZE_LIMIT:
        errors.append(FieldError.too_long(field, ANNOTATIONS_SIZE_LIMIT))
    return errors
