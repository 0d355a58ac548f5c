"""Checks for agent and session ids.

Agent ids end up inside Kubernetes names in provision mode, and the same
rules apply in legacy mode so an id valid in one mode is valid in the other.
The strictest derived name is the StatefulSet ``agent-{id}``: its controller
labels every pod with ``controller-revision-hash = {name}-{hash}`` where the
hash has up to 10 characters, and label values are limited to 63 characters,
so ``agent-{id}`` must stay within 52 characters (case K01). The headless
Service ``agent-{id}-headless`` (a DNS-1035 label, at most 63) is looser.
"""

from __future__ import annotations

import re
import secrets

from agentapi_proxy.errors import InvalidArgument

AGENT_NAME_PREFIX = "agent-"
# 63 (label value) - 1 (dash) - 10 (longest revision hash) = 52 for the StatefulSet name.
STATEFULSET_NAME_MAX = 52
AGENT_ID_MAX = STATEFULSET_NAME_MAX - len(AGENT_NAME_PREFIX)
SESSION_ID_MAX = 63

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def validate_agent_id(agent_id: str) -> str:
    """Return ``agent_id`` if every Kubernetes name derived from it is valid.

    Raises InvalidArgument with a message that says what is allowed.
    """
    rule = (
        f"an agent id is 1 to {AGENT_ID_MAX} characters of lower-case letters, digits "
        "and '-', starting and ending with a letter or digit"
    )
    if not agent_id:
        raise InvalidArgument(f"agent_id is empty: {rule}")
    if len(agent_id) > AGENT_ID_MAX:
        raise InvalidArgument(
            f"agent_id {agent_id[:80]!r} has {len(agent_id)} characters: {rule} "
            f"(the StatefulSet name {AGENT_NAME_PREFIX}{{id}} must fit in "
            f"{STATEFULSET_NAME_MAX} characters so its controller-revision-hash label fits in 63)"
        )
    if not _DNS_LABEL.fullmatch(agent_id):
        raise InvalidArgument(f"agent_id {agent_id!r} is not allowed: {rule}")
    return agent_id


def validate_session_id(session_id: str) -> str:
    """Return ``session_id`` if it can be a Kubernetes label value and a URL segment."""
    rule = (
        f"a session id is 1 to {SESSION_ID_MAX} characters of letters, digits, '-', '_' "
        "and '.', starting and ending with a letter or digit"
    )
    if not session_id:
        raise InvalidArgument(f"session_id is empty: {rule}")
    if len(session_id) > SESSION_ID_MAX or not _LABEL_VALUE.fullmatch(session_id):
        raise InvalidArgument(f"session_id {session_id[:80]!r} is not allowed: {rule}")
    return session_id


def validate_env_name(name: str) -> str:
    if not _ENV_NAME.fullmatch(name):
        raise InvalidArgument(
            f"environment variable name {name[:80]!r} is not allowed: use letters, digits "
            "and '_', not starting with a digit"
        )
    return name


def new_agent_id() -> str:
    """A fresh random id that passes :func:`validate_agent_id`."""
    return "a" + secrets.token_hex(6)
