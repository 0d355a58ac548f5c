"""Pages of ListAgents: which agents one answer carries and where the next one starts.

Agents are listed sorted by id, so a page is "the first N ids after X". The
token names X and the query it belongs to; it is opaque to callers but not a
secret (it grants nothing: every agent on a page is still checked against the
caller).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from agentapi_proxy.errors import InvalidArgument
from agentapi_proxy.v1 import agent_service_pb2 as pb

DEFAULT_PAGE_SIZE: Final = 500
MAX_PAGE_SIZE: Final = 1000
# Below gRPC's default 4 MiB message limit, with room for the envelope.
MAX_PAGE_BYTES: Final = 3 * 1024 * 1024
_TOKEN_VERSION: Final = 1
# An agent id and a session id with their JSON around them fit well within this.
MAX_TOKEN_BYTES: Final = 512


@dataclass(frozen=True)
class PageQuery:
    """A ListAgents request's paging, checked: the page starts after ``after``."""

    size: int
    after: str | None


def page_query(request: pb.ListAgentsRequest) -> PageQuery:
    """Check ``page_size`` and ``page_token``; raises InvalidArgument naming the field."""
    if request.page_size < 0:
        raise InvalidArgument(f"page_size must not be negative, got {request.page_size}")
    size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    if not request.page_token:
        return PageQuery(size=size, after=None)
    fields = _token_fields(request.page_token)
    if fields is None:
        raise InvalidArgument(
            "page_token is not a next_page_token of ListAgents; "
            "leave it empty to start from the first page"
        )
    if fields["session"] != request.session_id:
        raise InvalidArgument(
            "page_token belongs to a listing with another session_id; "
            "keep session_id the same while paging, or start again without page_token"
        )
    return PageQuery(size=size, after=fields["after"])


def _token_fields(token: str) -> dict[str, str] | None:
    """The ``after`` and ``session`` of a token of ours; None for anything else."""
    try:
        raw = base64.urlsafe_b64decode((token + "=" * (-len(token) % 4)).encode("ascii"))
        fields = json.loads(raw) if len(raw) <= MAX_TOKEN_BYTES else None
    except (ValueError, UnicodeError, binascii.Error, RecursionError):
        # RecursionError: deeply nested JSON, which no token of ours is.
        return None
    if not (
        isinstance(fields, dict)
        and type(fields.get("v")) is int
        and fields["v"] == _TOKEN_VERSION
        and isinstance(fields.get("after"), str)
        and isinstance(fields.get("session"), str)
    ):
        return None
    return {"after": fields["after"], "session": fields["session"]}


def page_of(
    agents: Iterable[pb.Agent], query: PageQuery, *, session_id: str
) -> pb.ListAgentsResponse:
    """The page ``query`` asks for out of ``agents`` (sorted by id), with its next token.

    A page holds at most ``query.size`` agents and ends before it would pass
    MAX_PAGE_BYTES, so that it always fits in one gRPC message.
    """
    page = pb.ListAgentsResponse()
    used = 0
    last: str | None = None
    more = False
    for agent in agents:
        if query.after is not None and agent.agent_id <= query.after:
            continue
        size = agent.ByteSize() + 8
        if len(page.agents) >= query.size or (page.agents and used + size > MAX_PAGE_BYTES):
            more = True
            break
        page.agents.append(agent)
        used += size
        last = agent.agent_id
    if more and last is not None:
        page.next_page_token = _token(after=last, session_id=session_id)
    return page


def _token(*, after: str, session_id: str) -> str:
    raw = json.dumps({"v": _TOKEN_VERSION, "after": after, "session": session_id})
    return base64.urlsafe_b64encode(raw.encode()).decode("ascii").rstrip("=")
