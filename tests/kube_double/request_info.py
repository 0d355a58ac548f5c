"""What a request asks for, parsed from its method and path like the API server does.

``GET /apis/apps/v1/namespaces/ns/statefulsets/x`` is verb ``get`` on resource
``statefulsets`` of group ``apps``; without a name it is ``list`` (``watch``
with ``?watch=true``); ``DELETE`` without a name is ``deletecollection``.
Subresources (``pods/log``, ``pods/proxy``) keep the verb of the method.
Path segments are percent-decoded one by one, so ``agent-x-0%3A3284`` names
pod ``agent-x-0`` port 3284 and a proxied ``a%2Fb`` becomes ``a/b``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

_VERBS: Final = {
    "GET": "get",
    "HEAD": "get",
    "POST": "create",
    "PUT": "update",
    "PATCH": "patch",
    "DELETE": "delete",
}


@dataclass(frozen=True)
class RequestInfo:
    method: str
    path: str
    verb: str
    is_resource_request: bool
    group: str = ""
    version: str = ""
    namespace: str = ""
    resource: str = ""
    name: str = ""
    subresource: str = ""
    # Segments after the subresource (the proxied path of pods/proxy).
    rest: tuple[str, ...] = ()
    trailing_slash: bool = False

    @property
    def full_resource(self) -> str:
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource


def _is_true(value: str | None) -> bool:
    return value is not None and value.lower() in ("true", "1")


def parse(method: str, raw_path: str, query: Mapping[str, str]) -> RequestInfo:
    segments = [unquote(s) for s in raw_path.strip("/").split("/")] if raw_path.strip("/") else []
    trailing = raw_path.endswith("/") and len(raw_path) > 1
    path = unquote(raw_path)
    plain = RequestInfo(method, path, method.lower(), False, trailing_slash=trailing)

    if not segments or segments[0] not in ("api", "apis"):
        return plain
    if segments[0] == "api":
        if len(segments) < 3:
            return plain
        group, version, rest = "", segments[1], segments[2:]
    else:
        if len(segments) < 4:
            return plain
        group, version, rest = segments[1], segments[2], segments[3:]

    verb = _VERBS.get(method.upper(), method.lower())
    watch_path = False
    if rest and rest[0] == "watch":
        watch_path = True
        rest = rest[1:]

    namespace = ""
    if len(rest) >= 2 and rest[0] == "namespaces":
        namespace = rest[1]
        if len(rest) > 2:
            rest = rest[2:]
        else:
            rest = ["namespaces", namespace]
    if not rest:
        return plain

    resource = rest[0]
    name = rest[1] if len(rest) > 1 else ""
    subresource = rest[2] if len(rest) > 2 else ""
    if not name:
        if verb == "get":
            verb = "list"
        elif verb == "delete":
            verb = "deletecollection"
    if verb in ("get", "list") and (watch_path or _is_true(query.get("watch"))):
        verb = "watch"
    return RequestInfo(
        method=method,
        path=path,
        verb=verb,
        is_resource_request=True,
        group=group,
        version=version,
        namespace=namespace,
        resource=resource,
        name=name,
        subresource=subresource,
        rest=tuple(rest[3:]),
        trailing_slash=trailing,
    )
