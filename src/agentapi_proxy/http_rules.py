"""What a proxied HTTP request may look like before it is sent to an agent.

One set of rules for both traffic paths (through the control plane, and the
gateway's direct path). Everything is checked against what HTTP/1.1 allows
on the wire, character by character, rather than by listing bad characters:
an HTTP client may quietly drop or rewrite a character a blocklist forgot
(yarl drops TABs, for example, which turned ``/.\t./`` into ``/../``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from urllib.parse import unquote

from agentapi_proxy.errors import InvalidArgument

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Meant for the gateway or describing the caller's own connection: never forwarded.
NOT_FORWARDED = frozenset(
    {"host", "authorization", "x-api-key", "expect", "forwarded", "x-real-ip"}
)

# More request headers than any browser or client library sends; aiohttp's own server
# limit is 128, so the gateway never forwards more than that anyway.
MAX_HEADERS = 200
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 3986 path characters: unreserved, sub-delims, ":", "@", "/" and %XX escapes.
_PATH = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-Fa-f]{2})*")
_QUERY = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*")
# Field values: visible ASCII, space, tab and obs-text; no other control characters.
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


def end_to_end_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop hop-by-hop headers and every header that ``Connection`` names."""
    headers = list(headers)
    named = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == "connection"
        for token in value.split(",")
    }
    return [
        (name, value)
        for name, value in headers
        if name.lower() not in HOP_BY_HOP and name.lower() not in named
    ]


def check_path(path: str) -> str:
    """Return ``path`` if it stays inside the agent's root, else raise InvalidArgument.

    The path is forwarded verbatim (still percent-encoded); dot-segments, in
    any encoding, are refused rather than resolved, because behind the
    Kubernetes API server's pod proxy they could climb out of the pod's URL.
    """
    if not path.startswith("/") or path.startswith("//"):
        raise InvalidArgument(f"proxied path {path[:200]!r} must start with a single '/'")
    if not _PATH.fullmatch(path):
        raise InvalidArgument(
            f"proxied path {path[:200]!r} has characters a URL path may not hold; "
            "percent-encode them"
        )
    for segment in path.split("/"):
        decoded = segment
        for _ in range(3):
            if "%" not in decoded:
                break
            decoded = unquote(decoded)
        if decoded.strip() in {".", ".."} or "/" in decoded or "\\" in decoded:
            raise InvalidArgument(
                f"proxied path {path[:200]!r} has a dot-segment or an encoded slash; "
                "send the path the agent should see"
            )
    return path


def check_query(query: str) -> str:
    if not _QUERY.fullmatch(query):
        raise InvalidArgument(
            f"query string {query[:200]!r} has characters a URL may not hold; percent-encode them"
        )
    return query


def check_method(method: str) -> str:
    if not _TOKEN.fullmatch(method):
        raise InvalidArgument(f"HTTP method {method[:40]!r} is not a valid token")
    return method


def check_headers(headers: Sequence[tuple[str, str]]) -> int | None:
    """Raise InvalidArgument for a malformed header; returns the declared Content-Length.

    Several Content-Length values that differ, or one that is not a plain
    decimal, make the body's end ambiguous and are refused.
    """
    if len(headers) > MAX_HEADERS:
        raise InvalidArgument(
            f"{len(headers)} headers; at most {MAX_HEADERS} are forwarded to an agent"
        )
    lengths = set()
    for name, value in headers:
        if not _TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
            raise InvalidArgument(f"header {name[:80]!r} is not a valid HTTP header")
        if name.lower() == "content-length":
            lengths |= {part.strip() for part in value.split(",")}
    if not lengths:
        return None
    if len(lengths) > 1 or not all(part.isdigit() and part.isascii() for part in lengths):
        raise InvalidArgument(f"Content-Length {sorted(lengths)!r} is not one decimal number")
    return int(lengths.pop())
