"""The long-lived answers: watches, pod logs and pods/proxy.

Errors found before the first byte are raised as :class:`ApiError` and become
a normal ``Status`` response; once a stream has begun it can only end (a watch
may first send an ``ERROR`` event, as the real server does for 410).
Streams end when the client goes away, when their subject does (a followed
container exits or its pod is deleted), on ``timeoutSeconds``, or when the
double stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

import aiohttp
from aiohttp import web

from .logbuffer import ContainerLog, LogQuery, follow
from .registry import Registry
from .request_info import RequestInfo
from .resources import PODS, ResourceType
from .selectors import (
    FieldSelector,
    LabelSelector,
    fields_match,
    labels_match,
    parse_field_selector,
    parse_label_selector,
)
from .status import (
    ApiError,
    FieldError,
    JsonObject,
    bad_request,
    invalid,
    service_unavailable,
)
from .store import StoredEvent
from .timestamps import parse_rfc3339

if TYPE_CHECKING:
    from .cluster import Cluster

HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
INITIAL_EVENTS_END: Final = "k8s.io/initial-events-end"


def _int_param(query: Mapping[str, str], name: str) -> int | None:
    value = query.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise bad_request(f"{name}: invalid value {value!r}: must be an integer") from exc


def _line(event_type: str, obj: JsonObject) -> bytes:
    return json.dumps({"type": event_type, "object": obj}).encode() + b"\n"


async def _start_stream(request: web.Request, content_type: str) -> web.StreamResponse:
    response = web.StreamResponse(
        status=200, headers={"Content-Type": content_type, "Cache-Control": "no-cache, private"}
    )
    response.enable_chunked_encoding()
    await response.prepare(request)
    return response


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


# --- watch ------------------------------------------------------------------------------


class _Filter:
    """Turns store events into what a watch with selectors sees (ADDED when an object
    starts matching, DELETED when it stops), like the API server's watch cache."""

    def __init__(self, labels: LabelSelector, fields: FieldSelector) -> None:
        self._labels = labels
        self._fields = fields

    def matches(self, obj: JsonObject | None) -> bool:
        return (
            obj is not None
            and labels_match(self._labels, obj["metadata"].get("labels"))
            and fields_match(self._fields, obj)
        )

    def translate(self, event: StoredEvent) -> str | None:
        now = self.matches(event.obj)
        before = self.matches(event.previous)
        if event.type == "DELETED":
            return "DELETED" if before else None
        if event.type == "ADDED":
            return "ADDED" if now else None
        if now and before:
            return "MODIFIED"
        if now:
            return "ADDED"
        if before:
            return "DELETED"
        return None


async def watch(
    request: web.Request, cluster: Cluster, rt: ResourceType, info: RequestInfo
) -> web.StreamResponse:
    query = request.query
    namespace = info.namespace if rt.namespaced and info.namespace else None
    event_filter = _Filter(
        parse_label_selector(query.get("labelSelector", "")),
        parse_field_selector(query.get("fieldSelector", ""), rt.field_labels),
    )
    timeout = _int_param(query, "timeoutSeconds")
    deadline = time.monotonic() + (
        timeout if timeout is not None else cluster.timings.watch_default_timeout
    )
    bookmarks = query.get("allowWatchBookmarks", "").lower() in ("true", "1")
    send_initial = query.get("sendInitialEvents", "").lower() in ("true", "1")
    start = query.get("resourceVersion", "")
    store = cluster.store

    initial: list[JsonObject] = []
    gone: ApiError | None = None
    watcher = None
    if start in ("", "0") or send_initial:
        # Current state as ADDED events, then changes: list and subscribe without awaiting.
        initial = [obj for obj in store.list(rt, namespace) if event_filter.matches(obj)]
        watcher = store.subscribe(rt, namespace, since=None)
    else:
        since = _int_param(query, "resourceVersion")
        try:
            watcher = store.subscribe(rt, namespace, since=since)
        except ApiError as exc:
            gone = exc

    response = await _start_stream(request, "application/json")
    try:
        if gone is not None:
            await response.write(_line("ERROR", gone.status))
            return response
        assert watcher is not None
        for obj in initial:
            await response.write(_line("ADDED", obj))
        if send_initial and bookmarks:
            await response.write(_bookmark(rt, store.resource_version, initial_end=True))

        last_sent = time.monotonic()
        while not watcher.closed or not watcher.queue.empty():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or _client_gone(request):
                break
            wait = min(remaining, 0.5, cluster.timings.bookmark_interval)
            try:
                async with asyncio.timeout(wait):
                    event = await watcher.queue.get()
            except TimeoutError:
                if bookmarks and time.monotonic() - last_sent >= cluster.timings.bookmark_interval:
                    await response.write(_bookmark(rt, store.resource_version))
                    last_sent = time.monotonic()
                continue
            if event is None:
                break
            kind = event_filter.translate(event)
            if kind is not None:
                await response.write(_line(kind, event.obj))
                last_sent = time.monotonic()
        if bookmarks and not _client_gone(request):
            await response.write(_bookmark(rt, store.resource_version))
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        return response
    finally:
        if watcher is not None:
            store.unsubscribe(watcher)
    with contextlib.suppress(ConnectionResetError, aiohttp.ClientConnectionResetError):
        await response.write_eof()
    return response


def _bookmark(rt: ResourceType, resource_version: int, *, initial_end: bool = False) -> bytes:
    meta: JsonObject = {"resourceVersion": str(resource_version)}
    if initial_end:
        meta["annotations"] = {INITIAL_EVENTS_END: "true"}
    return _line("BOOKMARK", {"kind": rt.kind, "apiVersion": rt.api_version, "metadata": meta})


# --- pods/log ---------------------------------------------------------------------------


def _log_query(name: str, query: Mapping[str, str]) -> LogQuery:
    tail = _int_param(query, "tailLines")
    since_seconds = _int_param(query, "sinceSeconds")
    limit = _int_param(query, "limitBytes")
    since_time = query.get("sinceTime")
    errors: list[FieldError] = []
    if tail is not None and tail < 0:
        errors.append(FieldError.invalid("tailLines", tail, "must be greater than or equal to 0"))
    if limit is not None and limit < 1:
        errors.append(FieldError.invalid("limitBytes", limit, "must be greater than 0"))
    if since_seconds is not None and since_seconds < 1:
        errors.append(FieldError.invalid("sinceSeconds", since_seconds, "must be greater than 0"))
    stream = query.get("stream", "All")
    if stream not in ("All", "Stdout", "Stderr"):
        errors.append(FieldError.not_supported("stream", stream, ["All", "Stderr", "Stdout"]))
    if since_seconds is not None and since_time:
        errors.append(
            FieldError.forbidden(
                "", "at most one of `sinceTime` or `sinceSeconds` may be specified"
            )
        )
    if errors:
        raise invalid("PodLogOptions", "", name, errors)

    since_ns: int | None = None
    if since_seconds is not None:
        since_ns = time.time_ns() - since_seconds * 1_000_000_000
    elif since_time:
        try:
            since_ns = int(parse_rfc3339(since_time) * 1_000_000_000)
        except ValueError as exc:
            raise bad_request(f"sinceTime: invalid value {since_time!r}") from exc
    return LogQuery(
        timestamps=query.get("timestamps", "").lower() in ("true", "1"),
        tail_lines=tail,
        since_ns=since_ns,
        limit_bytes=limit,
    )


def _choose_log(
    cluster: Cluster, pod: JsonObject, container: str, *, previous: bool
) -> ContainerLog | None:
    """Which instance's log the kubelet would serve, or the error it would answer."""
    meta = pod["metadata"]
    name = meta["name"]
    key = (meta["namespace"], name, container)
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    status: JsonObject = next((s for s in statuses if s.get("name") == container), {})
    state = status.get("state") or {}
    last = (status.get("lastState") or {}).get("terminated")

    if previous:
        if not last:
            raise bad_request(
                f'previous terminated container "{container}" in pod "{name}" not found'
            )
        # Until the next instance starts, the crashed one is still the "current" log.
        return cluster.logs.previous(key) if "running" in state else cluster.logs.current(key)
    if "running" in state or "terminated" in state or last:
        return cluster.logs.current(key)
    reason = (state.get("waiting") or {}).get("reason")
    if reason == "ErrImagePull":
        detail = "image can't be pulled"
    elif reason == "ImagePullBackOff":
        detail = "trying and failing to pull image"
    elif reason:
        detail = reason
    else:
        raise bad_request(
            f'container "{container}" in pod "{name}" is waiting to start - no logs yet'
        )
    raise bad_request(f'container "{container}" in pod "{name}" is waiting to start: {detail}')


async def pod_log(request: web.Request, cluster: Cluster, info: RequestInfo) -> web.StreamResponse:
    query = request.query
    pod = cluster.registry.get(PODS, info.namespace, info.name)
    spec = pod.get("spec") or {}
    containers = [c["name"] for c in spec.get("containers") or []]
    all_containers = containers + [c["name"] for c in spec.get("initContainers") or []]
    container = query.get("container", "")
    if not container:
        if len(containers) != 1:
            raise bad_request(
                f"a container name must be specified for pod {info.name}, choose one of: "
                f"[{' '.join(containers)}]"
            )
        container = containers[0]
    elif container not in all_containers:
        raise bad_request(f"container {container} is not valid for pod {info.name}")
    log_query = _log_query(info.name, query)
    follow_logs = query.get("follow", "").lower() in ("true", "1")
    previous = query.get("previous", "").lower() in ("true", "1")

    if not spec.get("nodeName"):
        # Not scheduled: the real server has no kubelet to ask and answers 200, empty.
        return web.Response(body=b"", content_type="text/plain", charset="utf-8")
    log = _choose_log(cluster, pod, container, previous=previous)
    if log is None:
        return web.Response(body=b"", content_type="text/plain", charset="utf-8")

    if not follow_logs:
        chunks = [log_query.render(e) for e in log_query.select(log.entries)]
        body = b"".join(chunks)
        if log_query.limit_bytes is not None:
            body = body[: log_query.limit_bytes]
        return web.Response(body=body, content_type="text/plain", charset="utf-8")

    response = await _start_stream(request, "text/plain; charset=utf-8")
    try:
        async for chunk in follow(log, log_query):
            if _client_gone(request):
                break
            await response.write(chunk)
        await response.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        pass
    return response


# --- pods/proxy -------------------------------------------------------------------------


def _split_pod_target(target: str) -> tuple[str, str, str]:
    """``pod``, ``pod:port`` or ``scheme:pod:port`` -> (scheme, pod, port)."""
    parts = target.split(":")
    if len(parts) == 1:
        return "", parts[0], ""
    if len(parts) == 2:
        return "", parts[0], parts[1]
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    raise bad_request(f'invalid pod request "{target}"')


async def pod_proxy(
    request: web.Request,
    cluster: Cluster,
    registry: Registry,
    info: RequestInfo,
    session: aiohttp.ClientSession,
) -> web.StreamResponse:
    _, pod_name, port = _split_pod_target(info.name)
    pod = registry.get(PODS, info.namespace, pod_name)
    if not port:
        for container in (pod.get("spec") or {}).get("containers") or []:
            if container.get("ports"):
                port = str(container["ports"][0]["containerPort"])
                break
    pod_ip = (pod.get("status") or {}).get("podIP")
    if not pod_ip:
        raise bad_request("address not allowed")
    refused = service_unavailable(
        f"error trying to reach service: dial tcp {pod_ip}:{port or 80}: "
        "connect: connection refused"
    )
    target = cluster.pod_servers.lookup(
        info.namespace, pod_name, int(port) if port.isdigit() else None
    )
    if target is None:
        raise refused

    # The path is in the URL, or (proxy without a path) in the "path" query parameter.
    path = (
        "/" + "/".join(info.rest) if info.rest else "/" + request.query.get("path", "").lstrip("/")
    )
    if info.trailing_slash and info.rest and not path.endswith("/"):
        path += "/"
    params = [(k, v) for k, v in request.query.items() if k != "path"]
    url = f"http://{target[0]}:{target[1]}{path}"
    headers = {
        k: v
        for k, v in request.headers.items()
        if k.lower() not in HOP_BY_HOP and k.lower() != "authorization"
    }
    body = request.content.iter_any() if request.can_read_body else None
    try:
        upstream = await session.request(
            request.method,
            url,
            params=params,
            headers=headers,
            data=body,
            allow_redirects=False,
            auto_decompress=False,
        )
    except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
        raise refused from exc

    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    try:
        for key, value in upstream.headers.items():
            if key.lower() not in HOP_BY_HOP:
                response.headers.add(key, value)
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        else:
            response.enable_chunked_encoding()
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
    except (ConnectionResetError, aiohttp.ClientError):
        # Either side went away mid-stream; the other side sees the connection end.
        pass
    finally:
        upstream.close()
    return response
