"""Provision mode: every agent is a StatefulSet in one namespace.

The cluster is the source of truth: get and list read it (a constant number
of API calls, whatever the number of agents), and the spec is rebuilt from
the objects' annotations, so a restarted control plane or a second replica
sees the same agents. The official ``kubernetes`` client does the
request/response calls on a bounded thread pool, so a slow API server never
blocks the event loop (K04). Streams (pod logs, agent traffic) use aiohttp
with the same credentials, so they cost no thread and cancelling one closes
its connection.

API calls per operation (all namespaced):

- create: GET statefulset, GET claim, POST configmap, POST service, POST statefulset
  (plus DELETE of what was made when a later step fails);
- get: GET statefulset, GET pod, GET claim, and LIST events when not ready;
- list: LIST statefulsets, LIST pods, LIST claims, and LIST events when one is not ready;
- delete: GET statefulset, DELETE statefulset, service, configmap, and the claim
  when ``pvc_delete_policy`` is ``delete``;
- logs: GET statefulset, GET pods/log (streamed);
- traffic: pods/proxy through the API server from outside the cluster, or the
  headless Service's DNS name from inside.

K02 policy: with ``pvc_delete_policy: delete`` the claim is deleted with the
agent; a create of the same id while the old claim is still terminating is
refused with UNAVAILABLE and a retry delay, never accepted into a pod stuck
Pending. With ``retain`` the claim, and its data, is reused by the next agent
with the same id.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import shlex
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from agentapi_proxy.drivers import statefulset_objects as objects
from agentapi_proxy.drivers.base import Driver
from agentapi_proxy.drivers.statefulset_state import Observed, observe, parse_time
from agentapi_proxy.errors import (
    AgentApiError,
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from agentapi_proxy.logconfig import for_agent
from agentapi_proxy.model import (
    AgentInfo,
    AgentSpec,
    Endpoint,
    LogOptions,
    Mode,
    State,
    StreamEnd,
)
from agentapi_proxy.settings import Settings, SettingsError
from agentapi_proxy.stateboard import StateBoard

logger = logging.getLogger(__name__)

T = TypeVar("T")
Obj = dict[str, Any]

API_THREADS = 16
REFRESH_SECONDS = 1.0
LOG_CHUNK_BYTES = 64 * 1024
# Messages of the API server for a container that has not started yet.
NOT_STARTED_MARKERS = ("waiting to start", "ContainerCreating", "PodInitializing", "not found")


def load_kube_configuration(kubeconfig: str) -> tuple[k8s.Configuration, bool]:
    """The client configuration and whether the control plane runs inside the cluster."""
    configuration = k8s.Configuration()
    try:
        if not kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST"):
            k8s_config.load_incluster_config(client_configuration=configuration)
            return configuration, True
        k8s_config.load_kube_config(
            config_file=kubeconfig or None, client_configuration=configuration
        )
    except (k8s_config.ConfigException, OSError, ValueError) as exc:
        raise SettingsError(
            "provision mode needs cluster credentials: none found in the pod "
            f"(in-cluster) nor in the kubeconfig {kubeconfig or '~/.kube/config'} ({exc}); "
            "set provision_mode.kubeconfig or run inside the cluster"
        ) from exc
    return configuration, False


class StatefulSetDriver(Driver):
    mode = Mode.STATEFULSET

    def __init__(
        self,
        settings: Settings,
        *,
        board: StateBoard,
        configuration: k8s.Configuration,
        in_cluster: bool,
    ) -> None:
        self._settings = settings
        self._namespace = settings.provision_mode.namespace
        self._board = board
        self._configuration = configuration
        self._in_cluster = in_cluster
        self._api_client = k8s.ApiClient(configuration)
        self._apps = k8s.AppsV1Api(self._api_client)
        self._core = k8s.CoreV1Api(self._api_client)
        self._pool = ThreadPoolExecutor(API_THREADS, thread_name_prefix="kube-api")
        self._locks: dict[str, asyncio.Lock] = {}
        self._http: aiohttp.ClientSession | None = None
        self._ssl = _ssl_context(configuration)
        self._refresher: asyncio.Task[None] | None = None
        self._known: set[str] = set()

    # --- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            connector=aiohttp.TCPConnector(limit=0),
        )
        await self._refresh()
        self._refresher = asyncio.create_task(self._refresh_loop(), name="statefulset-refresh")
        logger.info(
            "provision mode: namespace %s, %s",
            self._namespace,
            "in-cluster" if self._in_cluster else f"API server {self._configuration.host}",
        )

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        if self._http is not None:
            await self._http.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._api_client.close()

    # --- operations ----------------------------------------------------------

    async def create(self, spec: AgentSpec) -> tuple[AgentInfo, bool]:
        built = objects.build_objects(self._settings, spec, command=self._command(spec))
        agent_id = spec.agent_id
        async with self._lock(agent_id):
            existing = await self._read(
                self._apps.read_namespaced_stateful_set, objects.statefulset_name(agent_id)
            )
            if existing is not None:
                if _spec_hash(existing) != objects.spec_hash(spec):
                    raise AlreadyExists(
                        f"agent {agent_id!r} already exists with a different spec; "
                        "delete it first or choose another id"
                    )
                return await self.get(agent_id), False

            claim = await self._read(
                self._core.read_namespaced_persistent_volume_claim, objects.pvc_name(agent_id)
            )
            if claim is not None and claim["metadata"].get("deletionTimestamp"):
                raise Unavailable(
                    f"the volume {objects.pvc_name(agent_id)} of a deleted agent with id "
                    f"{agent_id!r} is still being deleted; retry in a few seconds",
                    reason="VolumeTerminating",
                    retry_after=5,
                )

            made: list[tuple[Callable[..., Any], str]] = []
            try:
                for create, delete, body in (
                    (
                        self._core.create_namespaced_config_map,
                        self._core.delete_namespaced_config_map,
                        built.configmap,
                    ),
                    (
                        self._core.create_namespaced_service,
                        self._core.delete_namespaced_service,
                        built.service,
                    ),
                    (
                        self._apps.create_namespaced_stateful_set,
                        self._apps.delete_namespaced_stateful_set,
                        built.statefulset,
                    ),
                ):
                    await self._create_or_take_over(create, delete, dict(body))
                    made.append((delete, str(body["metadata"]["name"])))
            except BaseException:
                for delete, name in reversed(made):
                    with contextlib.suppress(AgentApiError):
                        await self._delete(delete, name)
                raise

            for_agent(logger, agent_id).info(
                "StatefulSet %s created", objects.statefulset_name(agent_id)
            )
            self._known.add(agent_id)
            info = await self.get(agent_id)
            self._board.publish(info)
            return info, True

    async def get(self, agent_id: str) -> AgentInfo:
        statefulset = await self._read(
            self._apps.read_namespaced_stateful_set, objects.statefulset_name(agent_id)
        )
        if statefulset is None or not _is_ours(statefulset):
            raise NotFound(f"agent {agent_id!r} not found in namespace {self._namespace}")
        pod, claim = await asyncio.gather(
            self._read(self._core.read_namespaced_pod, objects.pod_name(agent_id)),
            self._read(
                self._core.read_namespaced_persistent_volume_claim, objects.pvc_name(agent_id)
            ),
        )
        observed = observe(statefulset, pod, claim, claim_name=objects.pvc_name(agent_id))
        if observed.state is not State.READY:
            events = await self._events()
            observed = observe(
                statefulset,
                pod,
                claim,
                _events_for(events, agent_id),
                claim_name=objects.pvc_name(agent_id),
            )
        return self._info(statefulset, observed)

    async def list_agents(self, session_id: str | None = None) -> list[AgentInfo]:
        selector = (
            objects.selector_for_session(session_id) if session_id else objects.selector_all()
        )
        return await self._list(selector)

    async def delete(self, agent_id: str) -> AgentInfo:
        async with self._lock(agent_id):
            last = await self.get(agent_id)
            name = objects.statefulset_name(agent_id)
            await self._delete(self._apps.delete_namespaced_stateful_set, name, missing_ok=True)
            await self._delete(
                self._core.delete_namespaced_service,
                objects.service_name(agent_id),
                missing_ok=True,
            )
            await self._delete(
                self._core.delete_namespaced_config_map,
                objects.configmap_name(agent_id),
                missing_ok=True,
            )
            if self._settings.provision_mode.pvc_delete_policy == "delete":
                await self._delete(
                    self._core.delete_namespaced_persistent_volume_claim,
                    objects.pvc_name(agent_id),
                    missing_ok=True,
                )
            self._known.discard(agent_id)
            deleted = AgentInfo(
                spec=last.spec,
                mode=Mode.STATEFULSET,
                state=State.DELETED,
                create_time=last.create_time,
            )
            self._board.publish(deleted)
            for_agent(logger, agent_id).info("deleted")
        self._locks.pop(agent_id, None)
        return deleted

    async def watch(self, agent_id: str) -> AsyncIterator[AgentInfo]:
        if self._board.get(agent_id) is None:
            self._board.publish(await self.get(agent_id))
        async for info in self._board.watch(agent_id):
            yield info

    async def logs(self, agent_id: str, options: LogOptions) -> AsyncIterator[bytes | StreamEnd]:
        assert self._http is not None
        await self.get(agent_id)
        pod = objects.pod_name(agent_id)
        url = f"{self._configuration.host}/api/v1/namespaces/{self._namespace}/pods/{pod}/log"
        params = _log_params(options)

        while True:
            response = await self._http.get(
                url, params=params, headers=self._auth_headers(), ssl=self._ssl or True
            )
            if response.status == 200:
                return self._read_logs(agent_id, response, follow=options.follow)
            async with response:
                message = _status_message(await response.text())
            if response.status in {400, 404} and any(m in message for m in NOT_STARTED_MARKERS):
                if options.previous:
                    raise FailedPrecondition(
                        f"agent {agent_id!r} has no previous run: {message}",
                        reason="NoPreviousRun",
                    )
                # K03: a follower waits for the container, unless it cannot start at all.
                info = await self.get(agent_id)
                if info.state is State.FAILED or not options.follow:
                    raise FailedPrecondition(
                        f"agent {agent_id!r} has no log yet: {info.reason or 'not started'}: "
                        f"{info.message or message}",
                        reason=info.reason,
                    )
                await asyncio.sleep(1.0)
                continue
            raise _from_status(response.status, message)

    async def _read_logs(
        self, agent_id: str, response: aiohttp.ClientResponse, *, follow: bool
    ) -> AsyncIterator[bytes | StreamEnd]:
        async with response:
            pending = b""
            async for chunk in response.content.iter_chunked(LOG_CHUNK_BYTES):
                pending += chunk
                # Whole lines per message, unless one line outgrows a chunk.
                cut = pending.rfind(b"\n") + 1
                if cut == 0 and len(pending) < LOG_CHUNK_BYTES:
                    continue
                cut = cut or len(pending)
                yield pending[:cut]
                pending = pending[cut:]
            if pending:
                yield pending
        if follow:
            try:
                await self.get(agent_id)
            except NotFound:
                yield StreamEnd("AgentDeleted", f"agent {agent_id!r} was deleted")
                return
            yield StreamEnd("ContainerEnded", f"the container of agent {agent_id!r} stopped")

    async def endpoint(self, agent_id: str) -> Endpoint:
        info = await self.get(agent_id)
        if info.state in {State.FAILED, State.STOPPING, State.PENDING}:
            raise FailedPrecondition(
                f"agent {agent_id!r} is {info.state.value}: {info.reason}: {info.message}",
                reason=info.reason,
            )
        port = self._settings.provision_mode.container_port
        pod = objects.pod_name(agent_id)
        if self._in_cluster:
            host = f"{pod}.{objects.service_name(agent_id)}.{self._namespace}.svc"
            return Endpoint(base_url=f"http://{host}:{port}", host=f"localhost:{port}")
        base = (
            f"{self._configuration.host}/api/v1/namespaces/{self._namespace}"
            f"/pods/{pod}:{port}/proxy"
        )
        return Endpoint(
            base_url=base,
            host=urlsplit(self._configuration.host).netloc,
            headers=self._auth_headers(),
            ssl=self._ssl,
        )

    def _command(self, spec: AgentSpec) -> list[str] | None:
        template = self._settings.provision_mode.command
        if not template.strip():
            return None
        values = {
            "port": str(self._settings.provision_mode.container_port),
            "agent_id": spec.agent_id,
            "session_id": spec.session_id,
        }
        try:
            return [part.format(**values) for part in shlex.split(template)]
        except (KeyError, IndexError, ValueError) as exc:
            raise FailedPrecondition(
                f"setting provision_mode.command {template!r} is not a valid template ({exc}); "
                "placeholders are {port}, {agent_id} and {session_id}"
            ) from exc

    # --- reading the cluster ----------------------------------------------------

    async def _list(self, selector: str) -> list[AgentInfo]:
        statefulsets, pods, claims = await asyncio.gather(
            self._call(
                self._apps.list_namespaced_stateful_set, self._namespace, label_selector=selector
            ),
            self._call(self._core.list_namespaced_pod, self._namespace, label_selector=selector),
            self._call(
                self._core.list_namespaced_persistent_volume_claim,
                self._namespace,
                label_selector=selector,
            ),
        )
        pods_by_name = {p["metadata"]["name"]: p for p in pods.get("items", [])}
        claims_by_name = {c["metadata"]["name"]: c for c in claims.get("items", [])}
        found: list[tuple[Obj, Observed, str]] = []
        for statefulset in statefulsets.get("items", []):
            if not _is_ours(statefulset):
                continue
            agent_id = statefulset["metadata"]["labels"][objects.LABEL_AGENT_ID]
            pod = pods_by_name.get(objects.pod_name(agent_id))
            claim = claims_by_name.get(objects.pvc_name(agent_id))
            found.append(
                (
                    statefulset,
                    observe(statefulset, pod, claim, claim_name=objects.pvc_name(agent_id)),
                    agent_id,
                )
            )
        if any(observed.state is not State.READY for _, observed, _ in found):
            events = await self._events()
            found = [
                (
                    statefulset,
                    observe(
                        statefulset,
                        pods_by_name.get(objects.pod_name(agent_id)),
                        claims_by_name.get(objects.pvc_name(agent_id)),
                        _events_for(events, agent_id),
                        claim_name=objects.pvc_name(agent_id),
                    ),
                    agent_id,
                )
                for statefulset, _, agent_id in found
            ]
        infos = [self._info(statefulset, observed) for statefulset, observed, _ in found]
        return sorted(infos, key=lambda info: info.agent_id)

    async def _events(self) -> list[Obj]:
        result = await self._call(self._core.list_namespaced_event, self._namespace)
        return list(result.get("items", []))

    async def _refresh(self) -> None:
        """Publish the state of every agent, and DELETED for those gone since last time."""
        infos = await self._list(objects.selector_all())
        current = {info.agent_id for info in infos}
        for info in infos:
            self._board.publish(info)
        for gone in self._known - current:
            last = self._board.get(gone)
            if last is not None:
                self._board.publish(
                    AgentInfo(
                        spec=last.spec,
                        mode=Mode.STATEFULSET,
                        state=State.DELETED,
                        create_time=last.create_time,
                    )
                )
        self._known = current

    async def _refresh_loop(self) -> None:
        # TODO: replace polling with pod and StatefulSet watches (the test double
        # supports them); polling costs 3-4 list calls per second per replica.
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            try:
                await self._refresh()
            except AgentApiError as exc:
                logger.warning("cannot read agents from the cluster: %s", exc.message)

    def _info(self, statefulset: Obj, observed: Observed) -> AgentInfo:
        spec = objects.spec_from_annotations(statefulset)
        port = self._settings.provision_mode.container_port
        address = (
            f"{objects.pod_name(spec.agent_id)}.{objects.service_name(spec.agent_id)}"
            f".{self._namespace}.svc:{port}"
        )
        return AgentInfo(
            spec=spec,
            mode=Mode.STATEFULSET,
            state=observed.state,
            create_time=parse_time(statefulset["metadata"]["creationTimestamp"]),
            reason=observed.reason,
            message=observed.message,
            address=address,
            ready_time=observed.ready_time,
            exit_code=observed.exit_code,
            restart_count=observed.restart_count,
        )

    # --- calling the API ---------------------------------------------------------

    def _lock(self, agent_id: str) -> asyncio.Lock:
        return self._locks.setdefault(agent_id, asyncio.Lock())

    async def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Obj:
        """Run one client call on the pool; returns the answer as a JSON-shaped dict."""
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(
                self._pool, functools.partial(method, *args, _request_timeout=30, **kwargs)
            )
        except ApiException as exc:
            raise _from_status(
                exc.status or 0, _status_message(exc.body or exc.reason or "")
            ) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise Unavailable(
                f"the Kubernetes API server at {self._configuration.host} is unreachable: {exc}",
                reason="APIServerUnreachable",
                retry_after=2,
            ) from exc
        serialized: Obj = self._api_client.sanitize_for_serialization(result)
        return serialized

    async def _read(self, method: Callable[..., Any], name: str) -> Obj | None:
        try:
            return await self._call(method, name, self._namespace)
        except NotFound:
            return None

    async def _delete(
        self, method: Callable[..., Any], name: str, *, missing_ok: bool = False
    ) -> None:
        try:
            await self._call(method, name, self._namespace, propagation_policy="Background")
        except NotFound:
            if not missing_ok:
                raise

    async def _create_or_take_over(
        self, create: Callable[..., Any], delete: Callable[..., Any], body: Mapping[str, Any]
    ) -> None:
        """Create the object; one of ours left by an interrupted create is replaced."""
        try:
            await self._call(create, self._namespace, body)
        except AlreadyExists:
            name = str(body["metadata"]["name"])
            logger.info("replacing %s left over by an interrupted create", name)
            await self._delete(delete, name, missing_ok=True)
            await self._call(create, self._namespace, body)

    def _auth_headers(self) -> dict[str, str]:
        token = self._configuration.api_key.get("authorization") or self._configuration.api_key.get(
            "BearerToken"
        )
        if not token:
            return {}
        prefix = self._configuration.api_key_prefix.get("authorization", "")
        value = f"{prefix} {token}".strip() if prefix and not token.startswith(prefix) else token
        return {"Authorization": value}


def _log_params(options: LogOptions) -> dict[str, str]:
    params = {"container": objects.CONTAINER_NAME}
    if options.follow:
        params["follow"] = "true"
    if options.tail_lines is not None:
        params["tailLines"] = str(options.tail_lines)
    if options.since_time is not None:
        params["sinceTime"] = options.since_time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if options.timestamps:
        params["timestamps"] = "true"
    if options.previous:
        params["previous"] = "true"
    if options.limit_bytes is not None:
        params["limitBytes"] = str(options.limit_bytes)
    return params


def _ssl_context(configuration: k8s.Configuration) -> ssl.SSLContext | None:
    if not configuration.host.startswith("https"):
        return None
    context = ssl.create_default_context(cafile=configuration.ssl_ca_cert or None)
    if configuration.cert_file:
        context.load_cert_chain(configuration.cert_file, configuration.key_file)
    if not configuration.verify_ssl:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _is_ours(obj: Mapping[str, Any]) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    return bool(
        labels.get(objects.LABEL_MANAGED_BY) == objects.MANAGER_NAME
        and labels.get(objects.LABEL_AGENT_ID)
    )


def _spec_hash(obj: Mapping[str, Any]) -> str:
    return str(
        (obj.get("metadata", {}).get("annotations") or {}).get(objects.ANNOTATION_SPEC_HASH, "")
    )


def _events_for(events: list[Obj], agent_id: str) -> list[Obj]:
    names = {
        objects.statefulset_name(agent_id),
        objects.pod_name(agent_id),
        objects.pvc_name(agent_id),
    }
    return [e for e in events if e.get("involvedObject", {}).get("name") in names]


def _status_message(body: str) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:500]
    if isinstance(data, dict) and data.get("message"):
        return str(data["message"])
    return body.strip()[:500]


def _rbac_hint(message: str) -> str:
    return (
        f"the control plane's service account lacks a permission: {message} "
        "(grant it in the Role, see deploy/20-rbac.yaml)"
    )


def _from_status(status: int, message: str) -> AgentApiError:
    if status == 403:
        return PermissionDenied(_rbac_hint(message), reason="Forbidden")
    if status == 401:
        return PermissionDenied(
            f"the Kubernetes API server rejected the control plane's credentials: {message}",
            reason="Unauthorized",
        )
    if status == 404:
        return NotFound(message)
    if status == 409:
        return AlreadyExists(message)
    if status in {400, 422}:
        return InvalidArgument(f"the Kubernetes API server refused the object: {message}")
    if status == 429 or status >= 500 or status == 0:
        return Unavailable(
            f"the Kubernetes API server is not available ({status}): {message}",
            reason="APIServerUnavailable",
            retry_after=2,
        )
    return Internal(f"unexpected answer {status} from the Kubernetes API server: {message}")
