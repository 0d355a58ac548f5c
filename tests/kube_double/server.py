"""The fake API server's HTTP face: one aiohttp handler for every path.

Each request is parsed (:mod:`request_info`), recorded, delayed or failed by
the fault knobs, authenticated (bearer token), authorized (RBAC), then
served. :class:`ApiError` is turned into a ``Status`` response here and only
here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
from aiohttp import web

from . import streaming
from .cluster import Cluster
from .rbac import Attributes
from .request_info import RequestInfo, parse
from .resources import (
    ALL_RESOURCES,
    GROUP_VERSIONS,
    PODS,
    SELFSUBJECTACCESSREVIEWS,
    ResourceType,
    lookup,
)
from .status import (
    ApiError,
    JsonObject,
    bad_request,
    internal_error,
    invalid,
    method_not_allowed,
    status_object,
)
from .validation import SCHEMA_VERSION, schema_errors

logger = logging.getLogger(__name__)

# The real API server accepts request bodies up to 3 MiB.
MAX_BODY: Final = 3 * 1024 * 1024


@dataclass
class RecordedRequest:
    """One request as the double saw it; ``status`` is 0 until the answer is sent."""

    method: str
    path: str
    query: dict[str, str]
    verb: str
    group: str
    resource: str
    subresource: str
    namespace: str
    name: str
    user: str = ""
    status: int = 0
    started: float = field(default_factory=time.time)

    @property
    def full_resource(self) -> str:
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(obj).encode(),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-cache, private", **(headers or {})},
    )


def _version_info() -> JsonObject:
    major, minor = SCHEMA_VERSION.split(".")[:2]
    return {
        "major": major,
        "minor": minor,
        "emulationMajor": major,
        "emulationMinor": minor,
        "minCompatibilityMajor": major,
        "minCompatibilityMinor": str(max(int(minor) - 1, 0)),
        "gitVersion": f"v{SCHEMA_VERSION}",
        "gitCommit": "0" * 40,
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.25.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    }


def _resource_list(group: str, version: str) -> JsonObject:
    group_version = f"{group}/{version}" if group else version
    resources: list[JsonObject] = []
    for rt in ALL_RESOURCES:
        if rt.group != group or rt.version != version:
            continue
        entry: JsonObject = {
            "name": rt.plural,
            "singularName": rt.singular,
            "namespaced": rt.namespaced,
            "kind": rt.kind,
            "verbs": sorted(rt.verbs),
        }
        if rt.short_names:
            entry["shortNames"] = list(rt.short_names)
        resources.append(entry)
        for sub in sorted(rt.subresources):
            verbs = {
                "status": ["get", "patch", "update"],
                "log": ["get"],
                "proxy": ["create", "delete", "get", "patch", "update"],
            }[sub]
            resources.append(
                {
                    "name": f"{rt.plural}/{sub}",
                    "singularName": "",
                    "namespaced": rt.namespaced,
                    "kind": "Pod"
                    if sub == "log"
                    else ("PodProxyOptions" if sub == "proxy" else rt.kind),
                    "verbs": verbs,
                }
            )
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }


def _api_group(group: str) -> JsonObject:
    version = GROUP_VERSIONS[group]
    gv = {"groupVersion": f"{group}/{version}", "version": version}
    return {
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": group,
        "versions": [gv],
        "preferredVersion": gv,
    }


def _query_bool(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() in ("true", "1")


class ApiServer:
    """Serves ``cluster`` to clients holding ``token`` (user ``user``)."""

    def __init__(self, cluster: Cluster, *, token: str, user: str) -> None:
        self.cluster = cluster
        self.token = token
        self.user = user
        self.requests: list[RecordedRequest] = []
        self._session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, _app: web.Application) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            auto_decompress=False,
        )

    async def _on_cleanup(self, _app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        info = parse(request.method, request.rel_url.raw_path, request.query)
        record = RecordedRequest(
            method=request.method,
            path=info.path,
            query=dict(request.query),
            verb=info.verb,
            group=info.group,
            resource=info.resource,
            subresource=info.subresource,
            namespace=info.namespace,
            name=info.name,
        )
        self.requests.append(record)
        try:
            response = await self._serve(request, info, record)
        except ApiError as exc:
            if exc.code >= 500:
                logger.info("%s %s -> %s %s", request.method, info.path, exc.code, exc.message)
            response = _json(exc.status, exc.code, exc.headers)
        except Exception as exc:
            # A bug of the double: answer like the real server would, and make the test fail.
            text = traceback.format_exc()
            logger.error("%s %s failed:\n%s", request.method, info.path, text)
            self.cluster.internal_errors.append(f"{request.method} {info.path}: {text}")
            error = internal_error(repr(exc))
            response = _json(error.status, error.code)
        record.status = response.status
        return response

    async def _serve(
        self, request: web.Request, info: RequestInfo, record: RecordedRequest
    ) -> web.StreamResponse:
        faults = self.cluster.faults
        delay = faults.latency_for(info.verb, info.full_resource)
        if delay > 0:
            await asyncio.sleep(delay)
        injection = faults.take_injection(info.verb, info.full_resource)
        if injection is not None:
            headers = {"Retry-After": str(injection.retry_after)} if injection.retry_after else None
            raise ApiError(injection.status(), headers=headers)

        if info.path.rstrip("/") in ("/healthz", "/livez", "/readyz", "/version"):
            # Open to anyone, as with system:public-info-viewer.
            record.user = self._user_or_anonymous(request)
            return self._public(info)
        record.user = self._authenticate(request)
        attrs = Attributes(
            user=record.user,
            verb=info.verb,
            group=info.group,
            resource=info.resource,
            subresource=info.subresource,
            namespace=info.namespace,
            name=info.name,
            path=info.path,
        )
        if not info.is_resource_request:
            return self._discovery(info)
        if info.resource != SELFSUBJECTACCESSREVIEWS.plural:
            # Any authenticated user may ask what it may do (system:basic-user).
            self.cluster.authorizer.check(attrs)
        return await self._resource(request, info)

    def _user_or_anonymous(self, request: web.Request) -> str:
        try:
            return self._authenticate(request)
        except ApiError:
            return "system:anonymous"

    def _authenticate(self, request: web.Request) -> str:
        header = request.headers.get("Authorization", "")
        scheme, _, credential = header.partition(" ")
        if scheme.lower() != "bearer" or credential.strip() != self.token:
            raise ApiError(status_object(401, "Unauthorized", "Unauthorized"))
        return self.user

    # --- non-resource paths --------------------------------------------------------------

    def _public(self, info: RequestInfo) -> web.StreamResponse:
        if info.path.rstrip("/") == "/version":
            return _json(_version_info())
        return web.Response(text="ok", content_type="text/plain")

    def _discovery(self, info: RequestInfo) -> web.StreamResponse:
        parts = [p for p in info.path.split("/") if p]
        if info.method not in ("GET", "HEAD"):
            raise method_not_allowed()
        if parts == ["api"]:
            return _json(
                {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
            )
        if parts == ["api", "v1"]:
            return _json(_resource_list("", "v1"))
        if parts == ["apis"]:
            return _json(
                {
                    "kind": "APIGroupList",
                    "apiVersion": "v1",
                    "groups": [_api_group(g) for g in GROUP_VERSIONS],
                }
            )
        if len(parts) == 2 and parts[0] == "apis" and parts[1] in GROUP_VERSIONS:
            return _json(_api_group(parts[1]))
        if len(parts) == 3 and parts[0] == "apis" and GROUP_VERSIONS.get(parts[1]) == parts[2]:
            return _json(_resource_list(parts[1], parts[2]))
        return web.Response(status=404, text="404 page not found\n", content_type="text/plain")

    # --- resources -----------------------------------------------------------------------

    @staticmethod
    def _not_found_path() -> ApiError:
        return ApiError(
            status_object(
                404, "NotFound", "the server could not find the requested resource", details={}
            )
        )

    async def _body(self, request: web.Request) -> Any:
        raw = await request.read()
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise bad_request(f"couldn't get version/kind; json parse error: {exc}") from exc

    async def _resource(self, request: web.Request, info: RequestInfo) -> web.StreamResponse:
        rt = lookup(info.group, info.version, info.resource)
        if rt is None:
            raise self._not_found_path()
        if rt is SELFSUBJECTACCESSREVIEWS:
            if info.verb != "create":
                raise method_not_allowed()
            return _json(self._access_review(await self._body(request)), 201)
        if rt.namespaced and not info.namespace and info.verb not in ("list", "watch"):
            raise self._not_found_path()
        namespace = info.namespace if rt.namespaced else ""
        if info.subresource:
            return await self._subresource(request, info, rt, namespace)

        registry = self.cluster.registry
        verb = info.verb
        if verb not in rt.verbs or (verb == "create" and not rt.client_creatable):
            raise method_not_allowed()
        dry_run = request.query.get("dryRun") == "All"
        if verb == "get":
            return _json(registry.get(rt, namespace, info.name))
        if verb == "list":
            query = request.query
            limit = query.get("limit")
            return _json(
                registry.list(
                    rt,
                    namespace or None,
                    label_selector=query.get("labelSelector", ""),
                    field_selector=query.get("fieldSelector", ""),
                    limit=int(limit) if limit and limit.isdigit() else None,
                    continue_token=query.get("continue") or None,
                    resource_version=query.get("resourceVersion"),
                    resource_version_match=query.get("resourceVersionMatch"),
                )
            )
        if verb == "watch":
            return await streaming.watch(request, self.cluster, rt, info)
        if verb == "create":
            return _json(
                registry.create(rt, namespace, await self._body(request), dry_run=dry_run), 201
            )
        if verb == "update":
            return _json(
                registry.update(
                    rt, namespace, info.name, await self._body(request), dry_run=dry_run
                )
            )
        if verb == "patch":
            obj, created = registry.patch(
                rt,
                namespace,
                info.name,
                await request.read(),
                content_type=request.headers.get("Content-Type", ""),
                field_manager=request.query.get("fieldManager"),
                dry_run=dry_run,
            )
            return _json(obj, 201 if created else 200)
        if verb == "delete":
            return _json(
                registry.delete(
                    rt,
                    namespace,
                    info.name,
                    self._delete_options(request, await self._body(request)),
                    dry_run=dry_run,
                )
            )
        if verb == "deletecollection":
            return _json(await self._delete_collection(request, rt, namespace))
        raise method_not_allowed()

    @staticmethod
    def _delete_options(request: web.Request, body: Any) -> JsonObject:
        options: JsonObject = dict(body) if isinstance(body, dict) else {}
        query = request.query
        if "gracePeriodSeconds" in query:
            try:
                options["gracePeriodSeconds"] = int(query["gracePeriodSeconds"])
            except ValueError as exc:
                raise bad_request("gracePeriodSeconds: must be an integer") from exc
        if "propagationPolicy" in query:
            options["propagationPolicy"] = query["propagationPolicy"]
        if "orphanDependents" in query:
            options["orphanDependents"] = _query_bool(request, "orphanDependents")
        return options

    async def _delete_collection(
        self, request: web.Request, rt: ResourceType, namespace: str
    ) -> JsonObject:
        registry = self.cluster.registry
        options = self._delete_options(request, await self._body(request))
        listed = registry.list(
            rt,
            namespace or None,
            label_selector=request.query.get("labelSelector", ""),
            field_selector=request.query.get("fieldSelector", ""),
        )
        for item in listed["items"]:
            meta = item["metadata"]
            try:
                registry.delete(rt, meta.get("namespace", ""), meta["name"], options)
            except ApiError as exc:
                if exc.code != 404:
                    raise
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}

    async def _subresource(
        self, request: web.Request, info: RequestInfo, rt: ResourceType, namespace: str
    ) -> web.StreamResponse:
        if info.subresource not in rt.subresources:
            raise self._not_found_path()
        if rt is PODS and info.subresource == "log":
            if info.verb != "get":
                raise method_not_allowed()
            return await streaming.pod_log(request, self.cluster, info)
        if rt is PODS and info.subresource == "proxy":
            assert self._session is not None
            return await streaming.pod_proxy(
                request, self.cluster, self.cluster.registry, info, self._session
            )
        if info.subresource == "status" and info.verb == "get":
            return _json(self.cluster.registry.get(rt, namespace, info.name))
        # TODO: serve status writes once a test needs a client to write status (none does).
        raise method_not_allowed()

    def _access_review(self, body: Any) -> JsonObject:
        if not isinstance(body, dict):
            raise bad_request("SelfSubjectAccessReview body must be a JSON object")
        review = dict(body)
        review.setdefault("apiVersion", "authorization.k8s.io/v1")
        review.setdefault("kind", "SelfSubjectAccessReview")
        review.setdefault("metadata", {})
        if errors := schema_errors(review):
            raise invalid("SelfSubjectAccessReview", "authorization.k8s.io", "", errors)
        spec = review.get("spec") or {}
        resource = spec.get("resourceAttributes")
        if resource is not None:
            attrs = Attributes(
                user=self.user,
                verb=resource.get("verb", ""),
                group=resource.get("group", ""),
                resource=resource.get("resource", ""),
                subresource=resource.get("subresource", ""),
                namespace=resource.get("namespace", ""),
                name=resource.get("name", ""),
            )
        else:
            non_resource = spec.get("nonResourceAttributes") or {}
            attrs = Attributes(
                user=self.user, verb=non_resource.get("verb", ""), path=non_resource.get("path", "")
            )
        allowed = self.cluster.authorizer.allows(attrs)
        status: JsonObject = {"allowed": allowed}
        if allowed:
            status["reason"] = self.cluster.authorizer.allow_reason(attrs)
        review["status"] = status
        review["metadata"] = {}
        return review
