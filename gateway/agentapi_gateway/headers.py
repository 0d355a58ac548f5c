"""Which HTTP headers cross the gateway, in which direction.

Pure functions over ``(name, value)`` pairs, so they can be checked without
a server. Hop-by-hop headers (RFC 9110 section 7.6.1) describe one
connection and never cross a proxy, and neither does any header that the
``Connection`` header names. Credentials (``Authorization``, ``X-API-Key``)
are for the gateway and the control plane: they travel as gRPC metadata and
never reach an agent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from multidict import CIMultiDict

from agentapi_proxy.errors import InvalidArgument
from agentapi_proxy.http_rules import NOT_FORWARDED, end_to_end_headers

# Meant for the gateway itself. Expect is answered by the gateway (100-continue),
# so relaying it would make the next hop wait for a continue nobody sends.
# Forwarded and X-Real-IP are the client's claims; the gateway writes X-Forwarded-* itself.
GATEWAY_ONLY: Final = NOT_FORWARDED

# Request headers passed to the control plane as gRPC metadata, under these keys.
CREDENTIAL_METADATA: Final = {"authorization": "authorization", "x-api-key": "x-api-key"}

_DIGITS = re.compile(r"[0-9]{1,18}")

Header = tuple[str, str]


def connection_named(headers: Iterable[Header]) -> frozenset[str]:
    """Lower-cased names listed in every ``Connection`` header."""
    return frozenset(
        token.strip().lower()
        for name, value in headers
        if name.lower() == "connection"
        for token in value.split(",")
        if token.strip()
    )


def end_to_end(headers: Iterable[Header]) -> list[Header]:
    """The headers without hop-by-hop ones and without those that ``Connection`` names."""
    return end_to_end_headers(headers)


def agent_request_headers(
    headers: Iterable[Header],
    *,
    client_address: str | None,
    scheme: str,
) -> list[Header]:
    """Headers to send to the agent for a client's request.

    End-to-end headers minus ``Host``, credentials and ``Expect``, plus the
    usual ``X-Forwarded-*`` headers (the client's address appended to any
    ``X-Forwarded-For`` it sent; the original ``Host`` as ``X-Forwarded-Host``).
    ``Content-Length`` stays: the body is relayed byte for byte.
    Raises InvalidArgument for a value that cannot be encoded as UTF-8.
    """
    pairs = list(headers)
    forwarded = [
        (name, value) for name, value in end_to_end(pairs) if name.lower() not in GATEWAY_ONLY
    ]
    for name, value in forwarded:
        _check_encodable(name, value)

    forwarded_for = [value for name, value in forwarded if name.lower() == "x-forwarded-for"]
    forwarded = [
        (name, value)
        for name, value in forwarded
        if name.lower() not in {"x-forwarded-for", "x-forwarded-host", "x-forwarded-proto"}
    ]
    if client_address:
        forwarded_for.append(client_address)
    if forwarded_for:
        forwarded.append(("X-Forwarded-For", ", ".join(forwarded_for)))
    host = next((value for name, value in pairs if name.lower() == "host"), None)
    if host is not None:
        _check_encodable("Host", host)
        forwarded.append(("X-Forwarded-Host", host))
    forwarded.append(("X-Forwarded-Proto", scheme))
    return forwarded


def client_response_headers(headers: Iterable[Header]) -> CIMultiDict[str]:
    """Headers to send to the client for an agent's response.

    End-to-end headers only. ``Content-Length`` is kept when the agent sent
    one valid value, because the body is relayed byte for byte and the client
    can then detect a cut-off body; a malformed or contradictory one is
    dropped and the body goes out chunked.
    """
    kept = end_to_end(headers)
    lengths = {value.strip() for name, value in kept if name.lower() == "content-length"}
    drop_length = len(lengths) > 1 or any(not _DIGITS.fullmatch(v) for v in lengths)

    result: CIMultiDict[str] = CIMultiDict()
    seen_length = False
    for name, value in kept:
        if name.lower() == "content-length":
            if drop_length or seen_length:
                continue
            seen_length = True
            value = value.strip()
        result.add(name, value)
    return result


def credential_metadata(headers: Iterable[Header]) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying the caller's credentials to the control plane.

    Raises InvalidArgument when a credential is not printable ASCII, which
    gRPC metadata cannot carry. The values are never logged.
    """
    metadata: list[tuple[str, str]] = []
    for name, value in headers:
        key = CREDENTIAL_METADATA.get(name.lower())
        if key is None:
            continue
        if not (value.isascii() and value.isprintable()):
            raise InvalidArgument(f"the {name} header must be printable ASCII")
        metadata.append((key, value))
    return tuple(metadata)


def _check_encodable(name: str, value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument(f"the value of header {name!r} is not valid UTF-8") from exc
