"""Provision mode: every agent is a StatefulSet in one namespace.

The cluster is the source of truth: get and list read it (a constant number
of API calls, whatever the number of agents), and the spec is rebuilt from
the objects' annotations, so a restarted control plane or a second replica
sees the same agents. The official ``kubernetes`` client does the
request/response calls on a bounded thread pool, so a slow API server never
blocks the event loop (K04). Streams (watches, pod logs, agent traffic) use
aiohttp with the same credentials, so they cost no thread and cancelling one
closes its connection.

API calls per operation (all in ``provision_mode.namespace``; the RBAC rules
that cover them are
:data:`~agentapi_proxy.drivers.statefulset_objects.REQUIRED_RBAC_RULES`, and
the tests check the double saw no other call):

- create: GET statefulset; GET persistentvolumeclaim and GET pod in parallel
  (leftovers of an earlier agent with the id); POST configmap, POST service,
  POST statefulset; then the calls of get. A 409 on a POST costs a GET of that
  object (and, for one of ours left by an interrupted create with another
  spec, a DELETE and the POST again). A failure DELETEs what this call made;
- get: GET statefulset, GET pod, GET persistentvolumeclaim in parallel. Warning
  events come from the events watch; only while that watch has not synced yet
  and the agent is not ready, one LIST events (``fieldSelector=type=Warning``);
- list: LIST statefulsets, LIST pods, LIST persistentvolumeclaims by label
  selector, in parallel (plus the LIST of events as for get): three calls for
  any number of agents;
- delete: the calls of get, then DELETE statefulset (uid precondition,
  background propagation), DELETE service, DELETE configmap, and DELETE
  persistentvolumeclaim when the StatefulSet's claim retention policy (else
  ``pvc_delete_policy``) is Delete;
- logs: the calls of get (repeated, at most every 2 s, while a follower waits
  for the container to start), then GET pods/log (streamed; follow, tailLines,
  sinceTime, timestamps, previous, limitBytes passed through); when a followed
  log ends, the calls of get once more to say why;
- traffic: from outside the cluster GET or POST pods/proxy (RBAC verbs get,
  create: the agent API uses only these methods) through the API server, from
  inside the headless Service's DNS name; finding the agent reads the
  StateBoard, or costs the calls of get when the board does not know it;
- in the background: WATCH statefulsets and WATCH pods (our label selector)
  and WATCH events (``type=Warning``), each resumed from its last
  resourceVersion (bookmarks on) and started over with a LIST after 410 Gone;
  a change of an agent's objects costs the calls of get for that agent (more
  than :data:`FULL_REFRESH_AT` agents at once, one list instead), and every
  :data:`RESYNC_SECONDS` one list as a safety net.

K02 policy: with ``pvc_delete_policy: delete`` the claim is deleted with the
agent; a create of the same id while the old claim is still terminating (or
the old pod still stopping) is refused with UNAVAILABLE and a retry delay,
and nothing is created, so no pod is ever left Pending on a terminating claim.
With ``retain`` the claim, and its data, is reused by the next agent with the
same id.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import shlex
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException, OpenApiException

from agentapi_proxy.drivers import statefulset_objects as objects
from agentapi_proxy.drivers.base import Driver
from agentapi_proxy.drivers.statefulset_state import (
    PENDING_PROBLEMS,
    Observed,
    container_exit,
    container_has_run,
    has_previous_run,
    observe,
    parse_time,
)
from agentapi_proxy.errors import (
    AgentApiError,
    AlreadyExists,
    FailedPrecondition,
    Internal,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from agentapi_proxy.ids import AGENT_NAME_PREFIX
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

Obj = dict[str, Any]

API_THREADS: Final = 16
REQUEST_TIMEOUT_SECONDS: Final = 30
# The API server ends a watch after this; it is then renewed from the last resourceVersion.
WATCH_SECONDS: Final = 290
RETRY_MAX_SECONDS: Final = 5.0
# A full list this often even when the watches report nothing (a missed event heals).
RESYNC_SECONDS: Final = 60.0
# Changes arriving within this window are handled together.
REFRESH_DEBOUNCE_SECONDS: Final = 0.05
FULL_REFRESH_AT: Final = 8
MAX_CACHED_WARNINGS: Final = 2000
LOG_CHUNK_BYTES: Final = 64 * 1024
# How long a log follower waits for a container that is being created.
LOG_WAIT_SECONDS: Final = 120.0
# GetAgent of a failed agent shows the end of its log (as the process driver does).
LOG_TAIL_LINES: Final = 20
LOG_TAIL_BYTES: Final = 8 * 1024
LOG_TAIL_SECONDS: Final = 5.0
LOG_RECHECK_SECONDS: Final = 2.0
LEFTOVER_RETRY_SECONDS: Final = 2.0


def load_kube_configuration(kubeconfig: str) -> tuple[k8s.Configuration, bool]:
    """The client configuration and whether the control plane runs inside the cluster.

    Raises SettingsError when no credentials are found.
    """
    configuration = k8s.Configuration()
    try:
        if not kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST"):
            k8s_config.load_incluster_config(client_configuration=configuration)
            in_cluster = True
        else:
            k8s_config.load_kube_config(
                config_file=kubeconfig or None, client_configuration=configuration
            )
            in_cluster = False
    except (k8s_config.ConfigException, OSError, ValueError) as exc:
        raise SettingsError(
            "provision mode needs cluster credentials: none found in the pod "
            f"(in-cluster) nor in the kubeconfig {kubeconfig or '~/.kube/config'} ({exc}); "
            "set provision_mode.kubeconfig or run inside the cluster"
        ) from exc
    # One connection per pool thread, so none is opened and thrown away per call.
    configuration.connection_pool_maxsize = API_THREADS
    return configuration, in_cluster


def statefulset_agents_left(settings: Settings) -> list[str] | None:
    """Ids of provision-mode agents in the configured namespace; None when unknown.

    For a legacy-mode start: blocking, a few seconds at most. Only asked when
    cluster credentials are configured (``provision_mode.kubeconfig``, or inside
    a cluster); an unreachable cluster is reported as None, not as an error.
    """
    provision = settings.provision_mode
    if not provision.kubeconfig and not os.environ.get("KUBERNETES_SERVICE_HOST"):
        return None
    try:
        configuration, _ = load_kube_configuration(provision.kubeconfig)
        with k8s.ApiClient(configuration) as api:
            found = k8s.AppsV1Api(api).list_namespaced_stateful_set(
                provision.namespace, label_selector=objects.selector_all(), _request_timeout=5
            )
    except (SettingsError, ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
        logger.warning("could not check the cluster for provision-mode agents: %s", exc)
        return None
    names = [item.metadata for item in found.items if item.metadata is not None]
    return sorted(
        str((meta.labels or {}).get(objects.LABEL_AGENT_ID) or meta.name) for meta in names
    )


@dataclass(frozen=True)
class _Watched:
    """One kind of object the driver watches, with the query that selects ours."""

    resource: str
    path: str
    query: Mapping[str, str]


@dataclass(frozen=True)
class _Observation:
    statefulset: Obj
    pod: Obj | None
    observed: Observed


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
        self._ssl = _ssl_context(configuration)
        self._http: aiohttp.ClientSession | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        # Bumped by every create and delete, so a refresh that read the cluster before
        # the write does not publish what it read over the write's result.
        self._epochs: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._dirty_changed = asyncio.Event()
        self._warnings: dict[str, Obj] = {}
        self._warnings_synced = False
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        # Open pod log responses: closing the session does not end them, close() does.
        self._log_streams: set[aiohttp.ClientResponse] = set()
        base = f"/namespaces/{self._namespace}"
        agents = {"labelSelector": objects.selector_all()}
        self._statefulsets = _Watched("statefulsets", f"/apis/apps/v1{base}/statefulsets", agents)
        self._pods = _Watched("pods", f"/api/v1{base}/pods", agents)
        self._events = _Watched(
            "events", f"/api/v1{base}/events", {"fieldSelector": "type=Warning"}
        )

    # --- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Read every agent, then keep the StateBoard current from watches.

        Never fails for the cluster's sake: an API server that cannot be read
        yet is logged and retried in the background.
        """
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            connector=aiohttp.TCPConnector(limit=0),
        )
        versions: dict[str, str] = {}
        try:
            versions = await self._refresh()
            await self._complete_interrupted_creates()
        except AgentApiError as exc:
            logger.warning("cannot read the agents from the cluster yet: %s", exc.message)
        self._tasks = [
            asyncio.create_task(
                self._watch_loop(self._statefulsets, versions.get("statefulsets", "")),
                name="watch-statefulsets",
            ),
            asyncio.create_task(
                self._watch_loop(self._pods, versions.get("pods", "")), name="watch-pods"
            ),
            asyncio.create_task(self._watch_loop(self._events, ""), name="watch-events"),
            asyncio.create_task(self._refresh_loop(), name="refresh-agents"),
        ]
        logger.info(
            "provision mode: namespace %s, %s",
            self._namespace,
            "in-cluster" if self._in_cluster else f"API server {self._configuration.host}",
        )

    async def close(self) -> None:
        """Stop the watches; calls still running end (open log streams with UNAVAILABLE),
        new ones answer UNAVAILABLE."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for response in list(self._log_streams):
            response.close()
        if self._http is not None:
            await self._http.close()
        # Calls already on the pool finish (bounded by their request timeout).
        self._pool.shutdown(wait=False)
        self._api_client.close()

    # --- operations ----------------------------------------------------------

    async def create(self, spec: AgentSpec) -> tuple[AgentInfo, bool]:
        # Builds and validates everything (K01: name lengths) before the first API call.
        built = objects.build_objects(self._settings, spec, command=self._command(spec))
        agent_id = spec.agent_id
        async with self._lock(agent_id):
            self._bump(agent_id)
            try:
                existing = await self._read(
                    self._apps.read_namespaced_stateful_set, objects.statefulset_name(agent_id)
                )
                if existing is not None:
                    info = await self._same_agent(existing, spec)
                    # The same create again may be the retry of one that was cut short.
                    await self._ensure_companions(existing, spec)
                    return info, False
                await self._check_leftovers(agent_id)

                # The StatefulSet first, then the ConfigMap and Service it owns: a create
                # cut short (the control plane killed) leaves either nothing or a
                # StatefulSet whose companions start() or the next create of the same
                # spec adds, and the garbage collector removes the companions with it.
                statefulset, winner = await self._create_statefulset(built.statefulset)
                if winner:
                    # Another replica created the same agent a moment ago.
                    return await self._same_agent(statefulset, spec), False
                try:
                    await self._ensure_companions(statefulset, spec)
                except BaseException:
                    await self._undo(
                        agent_id,
                        [
                            (
                                self._apps.delete_namespaced_stateful_set,
                                objects.statefulset_name(agent_id),
                                _uid(statefulset),
                            )
                        ],
                    )
                    raise

                for_agent(logger, agent_id).info(
                    "StatefulSet %s created", objects.statefulset_name(agent_id)
                )
                info = await self.get(agent_id)
                self._board.publish(info)
                return info, True
            finally:
                self._bump(agent_id)

    async def get(self, agent_id: str) -> AgentInfo:
        current = await self._observe(agent_id)
        info = self._info(current.statefulset, current.observed)
        if info.state is State.FAILED and info.exit_code is not None and current.pod is not None:
            info = replace(info, log_tail=await self._log_tail(agent_id, current.pod))
        return info

    async def list_agents(self, session_id: str | None = None) -> list[AgentInfo]:
        selector = (
            objects.selector_for_session(session_id) if session_id else objects.selector_all()
        )
        infos, _ = await self._list(selector)
        return infos

    async def delete(self, agent_id: str) -> AgentInfo:
        async with self._lock(agent_id):
            self._bump(agent_id)
            try:
                current = await self._observe(agent_id)
                statefulset = current.statefulset
                last = self._info(statefulset, current.observed)
                await self._delete(
                    self._apps.delete_namespaced_stateful_set,
                    objects.statefulset_name(agent_id),
                    uid=str(statefulset["metadata"].get("uid") or ""),
                )
                await self._delete(
                    self._core.delete_namespaced_service, objects.service_name(agent_id)
                )
                await self._delete(
                    self._core.delete_namespaced_config_map, objects.configmap_name(agent_id)
                )
                if self._deletes_claim(statefulset):
                    # Also done by the garbage collector where the retention policy is
                    # honoured; deleting it here covers API servers that drop the field.
                    await self._delete(
                        self._core.delete_namespaced_persistent_volume_claim,
                        objects.pvc_name(agent_id),
                    )
                deleted = replace(last, state=State.DELETED, reason="", message="", ready_time=None)
                self._board.publish(deleted)
                for_agent(logger, agent_id).info("deleted")
            finally:
                self._bump(agent_id)
        self._locks.pop(agent_id, None)
        return deleted

    async def watch(self, agent_id: str) -> AsyncIterator[AgentInfo]:
        if self._board.get(agent_id) is None:
            self._board.publish(await self.get(agent_id))
        async for info in self._board.watch(agent_id):
            yield info

    async def logs(self, agent_id: str, options: LogOptions) -> AsyncIterator[bytes | StreamEnd]:
        assert self._http is not None, "start() first"
        pod = objects.pod_name(agent_id)
        url = f"{self._configuration.host}/api/v1/namespaces/{self._namespace}/pods/{pod}/log"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LOG_WAIT_SECONDS
        while True:
            await self._wait_for_container(agent_id, options, deadline=deadline)
            self._check_open()
            try:
                response = await self._http.get(
                    url,
                    params=_log_params(options),
                    headers=self._auth_headers(),
                    ssl=self._ssl_argument(),
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise self._unreachable(exc) from exc
            if response.status == 200:
                return self._read_logs(agent_id, response, options)

            async with response:
                message = _status_message(await response.text())
            if response.status == 400 and "previous terminated container" in message:
                raise FailedPrecondition(
                    f"agent {agent_id!r} has no previous run: {message}", reason="NoPreviousRun"
                )
            # The container or pod changed between our look and the log request.
            if response.status in {400, 404} and (
                "waiting to start" in message or "not found" in message
            ):
                if loop.time() >= deadline:
                    raise Unavailable(
                        f"the log of agent {agent_id!r} cannot be read yet: {message}",
                        reason="ContainerNotStarted",
                        retry_after=5,
                    )
                await asyncio.sleep(0.5)
                continue
            raise _from_status(response.status, message)

    async def endpoint(self, agent_id: str) -> Endpoint:
        # The watches keep the board current; a read of the cluster only when it knows nothing.
        info = self._board.get(agent_id) or await self.get(agent_id)
        if info.state in {State.FAILED, State.STOPPING, State.PENDING, State.DELETED}:
            raise FailedPrecondition(
                f"agent {agent_id!r} is {info.state.value} and takes no traffic: "
                f"{info.reason}: {info.message}",
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

    # --- creating and deleting -------------------------------------------------

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

    async def _same_agent(self, statefulset: Obj, spec: AgentSpec) -> AgentInfo:
        """The existing agent when it was created with ``spec``; else AlreadyExists
        (Unavailable while it is being deleted)."""
        name = statefulset["metadata"]["name"]
        if not _is_ours(statefulset):
            raise AlreadyExists(
                f"a StatefulSet {name} that agentapi-proxy does not manage exists in namespace "
                f"{self._namespace}; remove it or choose another agent id"
            )
        if statefulset["metadata"].get("deletionTimestamp"):
            raise Unavailable(
                f"agent {spec.agent_id!r} is still being deleted; retry in a few seconds",
                reason="AgentTerminating",
                retry_after=LEFTOVER_RETRY_SECONDS,
            )
        if _spec_hash(statefulset) != objects.spec_hash(spec):
            raise AlreadyExists(
                f"agent {spec.agent_id!r} already exists with a different spec; "
                "delete it first or choose another id"
            )
        return await self.get(spec.agent_id)

    async def _check_leftovers(self, agent_id: str) -> None:
        """Refuse to create while objects of a deleted agent with this id are still going (K02)."""
        claim, pod = await asyncio.gather(
            self._read(
                self._core.read_namespaced_persistent_volume_claim, objects.pvc_name(agent_id)
            ),
            self._read(self._core.read_namespaced_pod, objects.pod_name(agent_id)),
        )
        if claim is not None and claim["metadata"].get("deletionTimestamp"):
            raise Unavailable(
                f"the volume claim {objects.pvc_name(agent_id)} of a deleted agent with id "
                f"{agent_id!r} is still being deleted; retry in a few seconds",
                reason="VolumeTerminating",
                retry_after=LEFTOVER_RETRY_SECONDS,
            )
        if pod is not None and pod["metadata"].get("deletionTimestamp"):
            raise Unavailable(
                f"the pod {objects.pod_name(agent_id)} of a deleted agent with id {agent_id!r} "
                "is still stopping; retry in a few seconds",
                reason="OldPodTerminating",
                retry_after=LEFTOVER_RETRY_SECONDS,
            )
        if pod is not None:
            raise FailedPrecondition(
                f"pod {objects.pod_name(agent_id)} exists without its StatefulSet (orphaned); "
                f"delete it (kubectl delete pod -n {self._namespace} "
                f"{objects.pod_name(agent_id)}) before creating agent {agent_id!r} again",
                reason="OrphanedPod",
            )
        if claim is not None:
            for_agent(logger, agent_id).info(
                "reusing the retained volume claim %s", objects.pvc_name(agent_id)
            )

    async def _ensure_companions(self, statefulset: Obj, spec: AgentSpec) -> None:
        """Make sure the StatefulSet's ConfigMap and Service exist and are owned by it."""
        owner_uid = _uid(statefulset)
        await self._ensure_owned(
            objects.build_configmap(self._settings, spec, owner_uid=owner_uid),
            spec,
            create=self._core.create_namespaced_config_map,
            read=self._core.read_namespaced_config_map,
            delete=self._core.delete_namespaced_config_map,
        )
        await self._ensure_owned(
            objects.build_service(self._settings, spec, owner_uid=owner_uid),
            spec,
            create=self._core.create_namespaced_service,
            read=self._core.read_namespaced_service,
            delete=self._core.delete_namespaced_service,
        )

    async def _ensure_owned(
        self,
        body: Mapping[str, Any],
        spec: AgentSpec,
        *,
        create: Callable[..., Any],
        read: Callable[..., Any],
        delete: Callable[..., Any],
    ) -> None:
        """Create ``body``, or keep the equal one of ours that exists already.

        One of ours with another spec or owner is left over from an earlier
        agent with this id (or an older version that made it unowned) and is
        replaced; one that is not ours is AlreadyExists.
        """
        name = str(body["metadata"]["name"])
        try:
            await self._create(create, body)
            return
        except AlreadyExists:
            pass
        found = await self._read(read, name)
        if found is None:
            await self._create(create, body)
            return
        if not _is_ours(found):
            raise AlreadyExists(
                f"a {body['kind']} {name} that agentapi-proxy does not manage exists in "
                f"namespace {self._namespace}; remove it or choose another agent id"
            )
        if _spec_hash(found) == objects.spec_hash(spec) and _owner_uids(found) == _owner_uids(body):
            return
        for_agent(logger, spec.agent_id).info(
            "replacing %s %s left over by an earlier agent with this id", body["kind"], name
        )
        await self._delete(delete, name, uid=_uid(found))
        await self._create(create, body)

    async def _complete_interrupted_creates(self) -> None:
        """Add the ConfigMap or Service that a create cut short did not make (see create)."""
        selector = objects.selector_all()
        statefulsets, configmaps, services = await asyncio.gather(
            self._call(
                self._apps.list_namespaced_stateful_set, self._namespace, label_selector=selector
            ),
            self._call(
                self._core.list_namespaced_config_map, self._namespace, label_selector=selector
            ),
            self._call(
                self._core.list_namespaced_service, self._namespace, label_selector=selector
            ),
        )
        have = {str(obj["metadata"]["name"]) for obj in configmaps["items"] + services["items"]}
        for statefulset in statefulsets["items"]:
            if statefulset["metadata"].get("deletionTimestamp") or not _is_ours(statefulset):
                continue
            try:
                spec = objects.spec_from_annotations(statefulset)
            except AgentApiError as exc:
                logger.warning("%s", exc.message)
                continue
            agent_id = spec.agent_id
            if {objects.configmap_name(agent_id), objects.service_name(agent_id)} <= have:
                continue
            async with self._lock(agent_id):
                for_agent(logger, agent_id).info("completing a create that was cut short")
                try:
                    await self._ensure_companions(statefulset, spec)
                except AgentApiError as exc:
                    for_agent(logger, agent_id).warning(
                        "could not complete its create: %s", exc.message
                    )

    async def _create_statefulset(self, body: Mapping[str, Any]) -> tuple[Obj, bool]:
        """Create the StatefulSet; returns it, and whether another create won the race."""
        try:
            return await self._create(self._apps.create_namespaced_stateful_set, body), False
        except AlreadyExists:
            existing = await self._read(
                self._apps.read_namespaced_stateful_set, str(body["metadata"]["name"])
            )
            if existing is None:
                raise
            return existing, True

    async def _create(self, create: Callable[..., Any], body: Mapping[str, Any]) -> Obj:
        try:
            return await self._call(create, self._namespace, dict(body))
        except NotFound as exc:
            raise FailedPrecondition(
                f"cannot create {body['kind']} {body['metadata']['name']}: {exc.message} "
                f"(does namespace {self._namespace}, provision_mode.namespace, exist?)",
                reason="NamespaceNotFound",
            ) from exc

    async def _undo(
        self, agent_id: str, made: Iterable[tuple[Callable[..., Any], str, str]]
    ) -> None:
        """Delete what a failed create made, newest first; failures are logged, not raised."""
        for delete, name, uid in reversed(list(made)):
            try:
                await self._delete(delete, name, uid=uid)
            except AgentApiError as exc:
                for_agent(logger, agent_id).warning(
                    "could not remove %s after a failed create: %s", name, exc.message
                )

    async def _delete(self, method: Callable[..., Any], name: str, *, uid: str = "") -> None:
        """Delete ``name`` (only the object with ``uid`` when given); a missing one is fine."""
        options: Obj = {"propagationPolicy": "Background"}
        if uid:
            options["preconditions"] = {"uid": uid}
        try:
            await self._call(method, name, self._namespace, body=options)
        except NotFound:
            pass
        except AlreadyExists:
            # 409 on delete: the uid precondition failed, the object is a newer one.
            logger.info("%s was replaced meanwhile; leaving the new one", name)

    def _deletes_claim(self, statefulset: Obj) -> bool:
        policy = (statefulset.get("spec") or {}).get("persistentVolumeClaimRetentionPolicy")
        if policy and policy.get("whenDeleted"):
            return bool(policy["whenDeleted"] == "Delete")
        return self._settings.provision_mode.pvc_delete_policy == "delete"

    # --- reading the cluster ----------------------------------------------------

    async def _observe(self, agent_id: str) -> _Observation:
        """Read the agent's objects and derive its state. Raises NotFound."""
        statefulset, pod, claim = await asyncio.gather(
            self._read(self._apps.read_namespaced_stateful_set, objects.statefulset_name(agent_id)),
            self._read(self._core.read_namespaced_pod, objects.pod_name(agent_id)),
            self._read(
                self._core.read_namespaced_persistent_volume_claim, objects.pvc_name(agent_id)
            ),
        )
        if statefulset is None or not _is_ours(statefulset):
            raise NotFound(f"agent {agent_id!r} not found in namespace {self._namespace}")
        claim_name = objects.pvc_name(agent_id)
        observed = observe(statefulset, pod, claim, claim_name=claim_name)
        if observed.state is not State.READY:
            events = await self._warning_events()
            observed = observe(statefulset, pod, claim, events, claim_name=claim_name)
        return _Observation(statefulset, pod, observed)

    async def _list(self, selector: str) -> tuple[list[AgentInfo], dict[str, str]]:
        """The agents matching ``selector``, and the lists' resourceVersions by resource."""
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
        pods_by_name = {p["metadata"]["name"]: p for p in pods.get("items") or []}
        claims_by_name = {c["metadata"]["name"]: c for c in claims.get("items") or []}
        found: list[tuple[Obj, str]] = [
            (statefulset, statefulset["metadata"]["labels"][objects.LABEL_AGENT_ID])
            for statefulset in statefulsets.get("items") or []
            if _is_ours(statefulset)
        ]

        def observe_all(events: list[Obj]) -> list[tuple[Obj, Observed]]:
            return [
                (
                    statefulset,
                    observe(
                        statefulset,
                        pods_by_name.get(objects.pod_name(agent_id)),
                        claims_by_name.get(objects.pvc_name(agent_id)),
                        events,
                        claim_name=objects.pvc_name(agent_id),
                    ),
                )
                for statefulset, agent_id in found
            ]

        observed = observe_all([])
        if any(o.state is not State.READY for _, o in observed):
            observed = observe_all(await self._warning_events())

        infos = []
        for statefulset, state in observed:
            try:
                infos.append(self._info(statefulset, state))
            except FailedPrecondition as exc:
                # One hand-edited object must not hide every other agent.
                logger.warning("skipping %s", exc.message)
        versions = {
            "statefulsets": _resource_version(statefulsets),
            "pods": _resource_version(pods),
        }
        return sorted(infos, key=lambda info: info.agent_id), versions

    async def _warning_events(self) -> list[Obj]:
        if self._warnings_synced:
            return list(self._warnings.values())
        result = await self._call(
            self._core.list_namespaced_event, self._namespace, field_selector="type=Warning"
        )
        return list(result.get("items") or [])

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

    # --- logs ------------------------------------------------------------------

    async def _wait_for_container(
        self, agent_id: str, options: LogOptions, *, deadline: float
    ) -> None:
        """Return once the container has a log to read (K03); raise when it will not soon.

        Raises NotFound, FailedPrecondition naming the reason (failed, blocked
        or not started and not following), or Unavailable after ``deadline``.
        """
        loop = asyncio.get_running_loop()
        while True:
            current = await self._observe(agent_id)
            pod, observed = current.pod, current.observed
            started = pod is not None and container_has_run(pod)
            if options.previous:
                if pod is not None and has_previous_run(pod):
                    return
                raise FailedPrecondition(
                    f"agent {agent_id!r} has no previous run: its container has not been restarted",
                    reason="NoPreviousRun",
                )
            if started and observed.reason not in {"OldPodTerminating", "PodTerminating"}:
                return
            why = f"{observed.reason}: {observed.message}"
            if (
                not options.follow
                or observed.state is State.FAILED
                or observed.reason in PENDING_PROBLEMS
            ):
                raise FailedPrecondition(
                    f"agent {agent_id!r} has no log yet, its container is not running ({why})",
                    reason=observed.reason,
                )
            if loop.time() >= deadline:
                raise Unavailable(
                    f"agent {agent_id!r} has not started after {LOG_WAIT_SECONDS:g}s ({why}); "
                    "retry later",
                    reason=observed.reason,
                    retry_after=5,
                )
            await self._next_change(
                agent_id, within=min(LOG_RECHECK_SECONDS, deadline - loop.time())
            )

    async def _next_change(self, agent_id: str, *, within: float) -> None:
        """Wait until the board shows a change of the agent, at most ``within`` seconds."""

        async def second_state() -> bool:
            changes = self._board.watch(agent_id)
            try:
                seen = 0
                async for _ in changes:
                    seen += 1
                    if seen == 2:
                        return True
                return False
            finally:
                if isinstance(changes, AsyncGenerator):
                    await changes.aclose()

        try:
            if await asyncio.wait_for(second_state(), max(within, 0.01)):
                return
        except TimeoutError:
            return
        except NotFound:
            pass
        # Not on the board (yet), or the board closed: a plain delay instead.
        await asyncio.sleep(within)

    async def _log_tail(self, agent_id: str, pod: Obj) -> str:
        """The last lines the failed run printed, or "" when they cannot be read now.

        The run that failed is the previous one once the kubelet restarted the
        container (CrashLoopBackOff), else the current, terminated one.
        """
        assert self._http is not None, "start() first"
        params = {"tailLines": str(LOG_TAIL_LINES), "limitBytes": str(LOG_TAIL_BYTES)}
        # While the container waits to be restarted, its current log is the failed run's.
        if _running_now(pod) and has_previous_run(pod):
            params["previous"] = "true"
        url = (
            f"{self._configuration.host}/api/v1/namespaces/{self._namespace}/pods/"
            f"{objects.pod_name(agent_id)}/log"
        )
        try:
            async with asyncio.timeout(LOG_TAIL_SECONDS):
                async with self._http.get(
                    url, params=params, headers=self._auth_headers(), ssl=self._ssl_argument()
                ) as response:
                    if response.status != 200:
                        return ""
                    text = await response.text(errors="replace")
        except (aiohttp.ClientError, TimeoutError) as exc:
            for_agent(logger, agent_id).debug("cannot read the end of its log: %s", exc)
            return ""
        return text

    async def _read_logs(
        self, agent_id: str, response: aiohttp.ClientResponse, options: LogOptions
    ) -> AsyncIterator[bytes | StreamEnd]:
        sent = 0
        self._log_streams.add(response)
        try:
            pending = b""
            async for chunk in response.content.iter_chunked(LOG_CHUNK_BYTES):
                pending += chunk
                # Whole lines per message, unless one line outgrows a chunk.
                cut = pending.rfind(b"\n") + 1
                if cut == 0 and len(pending) < LOG_CHUNK_BYTES:
                    continue
                cut = cut or len(pending)
                sent += cut
                yield pending[:cut]
                pending = pending[cut:]
            if pending:
                sent += len(pending)
                yield pending
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._check_open()
            raise Unavailable(
                f"the log stream of agent {agent_id!r} broke off: {exc}; call StreamLogs "
                "again to resume",
                reason="LogStreamBroken",
            ) from exc
        finally:
            # Closes the connection (a half-read follow stream is not reused).
            self._log_streams.discard(response)
            response.close()
        if options.follow and not (options.limit_bytes and sent >= options.limit_bytes):
            yield await self._why_log_ended(agent_id)

    async def _why_log_ended(self, agent_id: str) -> StreamEnd:
        # Shutting down: the caller sees UNAVAILABLE, not an end that looks final.
        self._check_open()
        try:
            current = await self._observe(agent_id)
        except NotFound:
            return StreamEnd("AgentDeleted", f"agent {agent_id!r} was deleted")
        except AgentApiError as exc:
            return StreamEnd("LogStreamClosed", f"the log stream ended: {exc.message}")
        stopped, exit_code = container_exit(current.pod)
        if stopped:
            return StreamEnd(
                "ContainerExited",
                f"the container of agent {agent_id!r} stopped (exit code {exit_code}); "
                "call StreamLogs again to follow its next run",
            )
        # TODO: resume after the last line sent (sinceTime, timestamps stripped) once an
        # API server we support is seen cutting long follows; until then the caller resumes.
        return StreamEnd(
            "LogStreamClosed",
            "the API server closed the log stream; call StreamLogs again to resume",
        )

    # --- keeping the board current ----------------------------------------------

    def _bump(self, agent_id: str) -> None:
        self._epochs[agent_id] = self._epochs.get(agent_id, 0) + 1

    def _mark(self, agent_id: str) -> None:
        self._dirty.add(agent_id)
        self._dirty_changed.set()

    async def _refresh(self) -> dict[str, str]:
        """Publish every agent, and DELETED for those gone; returns the lists' versions."""
        epochs = dict(self._epochs)
        infos, versions = await self._list(objects.selector_all())
        unchanged = {a for a, epoch in epochs.items() if self._epochs.get(a) == epoch}
        changed = set(self._epochs) - unchanged
        current = {info.agent_id for info in infos}
        for info in infos:
            if info.agent_id not in changed:
                self._board.publish(info)
        for known in self._board.all():
            if known.mode is Mode.STATEFULSET and known.agent_id not in current | changed:
                self._publish_deleted(known)
        return versions

    async def _refresh_one(self, agent_id: str) -> None:
        epoch = self._epochs.get(agent_id, 0)
        try:
            info: AgentInfo | None = await self.get(agent_id)
        except NotFound:
            info = None
        if self._epochs.get(agent_id, 0) != epoch:
            return
        if info is not None:
            self._board.publish(info)
        elif (known := self._board.get(agent_id)) is not None:
            self._publish_deleted(known)

    def _publish_deleted(self, last: AgentInfo) -> None:
        self._board.publish(
            replace(last, state=State.DELETED, reason="", message="", ready_time=None)
        )

    async def _refresh_loop(self) -> None:
        """Re-read the agents the watches marked as changed; everything now and then."""
        while True:
            try:
                async with asyncio.timeout(RESYNC_SECONDS):
                    await self._dirty_changed.wait()
                everything = False
            except TimeoutError:
                everything = True
            await asyncio.sleep(REFRESH_DEBOUNCE_SECONDS)
            self._dirty_changed.clear()
            dirty, self._dirty = sorted(self._dirty), set()
            try:
                if everything or len(dirty) > FULL_REFRESH_AT:
                    await self._refresh()
                    continue
                results = await asyncio.gather(
                    *(self._refresh_one(agent_id) for agent_id in dirty), return_exceptions=True
                )
            except AgentApiError as exc:
                logger.warning("cannot read the agents from the cluster: %s", exc.message)
                await asyncio.sleep(RETRY_MAX_SECONDS)
                continue
            except Exception:
                # A bug must not end the updates for good; the next change retries.
                logger.exception("refreshing the agents failed")
                await asyncio.sleep(RETRY_MAX_SECONDS)
                continue
            retry = [a for a, result in zip(dirty, results, strict=True) if result is not None]
            for agent_id, result in zip(dirty, results, strict=True):
                if isinstance(result, AgentApiError):
                    for_agent(logger, agent_id).warning("cannot read state: %s", result.message)
                elif isinstance(result, asyncio.CancelledError):
                    raise result
                elif isinstance(result, BaseException):
                    for_agent(logger, agent_id).error("reading state failed", exc_info=result)
            if retry:
                await asyncio.sleep(RETRY_MAX_SECONDS)
                for agent_id in retry:
                    self._mark(agent_id)

    async def _watch_loop(self, watched: _Watched, version: str) -> None:
        """Follow one kind of object forever: list, watch, resume, re-list after 410 Gone."""
        delay = 0.5
        while True:
            try:
                if not version:
                    version = await self._relist(watched)
                version = await self._watch_once(watched, version)
                delay = 0.5
                continue
            except AgentApiError as exc:
                logger.warning(
                    "watching %s failed, retrying in %gs: %s", watched.resource, delay, exc.message
                )
            except Exception:
                logger.exception("watching %s failed, retrying in %gs", watched.resource, delay)
                version = ""
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_SECONDS)

    async def _relist(self, watched: _Watched) -> str:
        if watched is not self._events:
            versions = await self._refresh()
            return versions[watched.resource]
        result = await self._call(
            self._core.list_namespaced_event, self._namespace, field_selector="type=Warning"
        )
        self._warnings.clear()
        for event in result.get("items") or []:
            self._on_warning("ADDED", event)
        self._warnings_synced = True
        return _resource_version(result)

    async def _watch_once(self, watched: _Watched, version: str) -> str:
        """One watch request; returns the version to resume from, "" when it expired (410)."""
        assert self._http is not None
        params = {
            **watched.query,
            "watch": "true",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_SECONDS),
        }
        try:
            async with self._http.get(
                f"{self._configuration.host}{watched.path}",
                params=params,
                headers=self._auth_headers(),
                ssl=self._ssl_argument(),
                # Bookmarks arrive well within this; silence means a dead connection.
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=10, sock_read=WATCH_SECONDS + 30
                ),
            ) as response:
                if response.status != 200:
                    raise _from_status(
                        response.status,
                        _status_message(await response.text()),
                        retry_after=response.headers.get("Retry-After", ""),
                    )
                async for line in _lines(response.content):
                    event = json.loads(line)
                    kind, obj = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":
                        if obj.get("code") == 410:
                            logger.info("watch of %s expired; listing again", watched.resource)
                            return ""
                        raise _from_status(int(obj.get("code") or 0), str(obj.get("message")))
                    version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                    if kind != "BOOKMARK":
                        self._on_change(watched, str(kind), obj)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._unreachable(exc) from exc
        except ValueError as exc:
            raise Unavailable(
                f"a watch of {watched.resource} sent a malformed event: {exc}"
            ) from exc
        return version

    def _on_change(self, watched: _Watched, kind: str, obj: Obj) -> None:
        if watched is self._events:
            self._on_warning(kind, obj)
            return
        labels = (obj.get("metadata") or {}).get("labels") or {}
        agent_id = labels.get(objects.LABEL_AGENT_ID)
        if agent_id and labels.get(objects.LABEL_MANAGED_BY) == objects.MANAGER_NAME:
            self._mark(str(agent_id))

    def _on_warning(self, kind: str, event: Obj) -> None:
        involved = event.get("involvedObject") or {}
        agent_id = _agent_of(str(involved.get("kind")), str(involved.get("name")))
        uid = str((event.get("metadata") or {}).get("uid") or "")
        if agent_id is None or not uid:
            return
        if kind == "DELETED":
            self._warnings.pop(uid, None)
        else:
            self._warnings[uid] = event
            if len(self._warnings) > MAX_CACHED_WARNINGS:
                oldest = min(
                    self._warnings,
                    key=lambda k: str(self._warnings[k].get("lastTimestamp") or ""),
                )
                del self._warnings[oldest]
        self._mark(agent_id)

    # --- calling the API ---------------------------------------------------------

    def _lock(self, agent_id: str) -> asyncio.Lock:
        return self._locks.setdefault(agent_id, asyncio.Lock())

    async def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Obj:
        """Run one client call on the pool; returns the answer's JSON. Raises the
        project's errors (Unavailable when the API server cannot be reached)."""
        self._check_open()
        loop = asyncio.get_running_loop()
        call = functools.partial(_raw_body, method, *args, **kwargs)
        try:
            data = await loop.run_in_executor(self._pool, call)
        except ApiException as exc:
            raise _from_status(
                exc.status or 0,
                _status_message(exc.body or exc.reason or ""),
                retry_after=(exc.headers or {}).get("Retry-After", ""),
            ) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._unreachable(exc) from exc
        except OpenApiException as exc:
            raise Internal(f"the Kubernetes client refused a request: {exc}") from exc
        try:
            parsed = json.loads(data) if data else {}
        except ValueError as exc:
            raise Unavailable(
                f"the Kubernetes API server at {self._configuration.host} sent no JSON: {exc}",
                reason="APIServerUnavailable",
            ) from exc
        return parsed if isinstance(parsed, dict) else {}

    async def _read(self, method: Callable[..., Any], name: str) -> Obj | None:
        try:
            return await self._call(method, name, self._namespace)
        except NotFound:
            return None

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the control plane is shutting down; retry shortly")

    def _unreachable(self, exc: BaseException) -> Unavailable:
        return Unavailable(
            f"the Kubernetes API server at {self._configuration.host} is unreachable: {exc}",
            reason="APIServerUnreachable",
            retry_after=2,
        )

    def _auth_headers(self) -> dict[str, str]:
        """The client's own credentials as headers (its hook refreshes expiring tokens)."""
        settings: Mapping[str, Any] = self._configuration.auth_settings()
        return {
            str(auth["key"]): str(auth["value"])
            for auth in settings.values()
            if auth.get("in") == "header" and auth.get("value")
        }

    def _ssl_argument(self) -> ssl.SSLContext | bool:
        return self._ssl if self._ssl is not None else True


def _raw_body(method: Callable[..., Any], *args: Any, **kwargs: Any) -> bytes:
    """Call the client and read the whole answer in the calling (pool) thread.

    Reading here, not on the event loop, keeps a slow body off the loop and hands
    the connection back to the client's pool before the thread takes the next call.
    """
    response = method(
        *args, _preload_content=False, _request_timeout=REQUEST_TIMEOUT_SECONDS, **kwargs
    )
    data: bytes = response.data
    return data


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


async def _lines(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """Newline-separated records of any length (a pod may be larger than a read buffer)."""
    pending = b""
    async for chunk in content.iter_any():
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            if line.strip():
                yield line
    if pending.strip():
        yield pending


def _ssl_context(configuration: k8s.Configuration) -> ssl.SSLContext | None:
    """TLS for the aiohttp streams, from the same kubeconfig settings as the client's calls."""
    # TODO: honour the kubeconfig's tls-server-name and proxy-url for streams too, once a
    # supported cluster needs them (the client's own calls already do).
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
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return bool(
        labels.get(objects.LABEL_MANAGED_BY) == objects.MANAGER_NAME
        and labels.get(objects.LABEL_AGENT_ID)
    )


def _spec_hash(obj: Mapping[str, Any]) -> str:
    return str(
        ((obj.get("metadata") or {}).get("annotations") or {}).get(objects.ANNOTATION_SPEC_HASH, "")
    )


def _running_now(pod: Obj) -> bool:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return any((status.get("state") or {}).get("running") for status in statuses)


def _owner_uids(obj: Mapping[str, Any]) -> list[str]:
    return [str(ref.get("uid")) for ref in obj["metadata"].get("ownerReferences") or []]


def _uid(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("uid") or "")


def _resource_version(listed: Mapping[str, Any]) -> str:
    return str((listed.get("metadata") or {}).get("resourceVersion") or "")


def _agent_of(kind: str, name: str) -> str | None:
    """The agent id an event's object belongs to, from the names the builders give."""
    prefix = AGENT_NAME_PREFIX
    if kind == "StatefulSet" and name.startswith(prefix):
        return name[len(prefix) :]
    if kind == "Pod" and name.startswith(prefix) and name.endswith("-0"):
        return name[len(prefix) : -2]
    claim_prefix = f"{objects.VOLUME_NAME}-{prefix}"
    if kind == "PersistentVolumeClaim" and name.startswith(claim_prefix) and name.endswith("-0"):
        return name[len(claim_prefix) : -2]
    return None


def _status_message(body: str | bytes) -> str:
    text = body.decode(errors="replace") if isinstance(body, bytes) else body
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()[:500]
    if isinstance(data, dict) and data.get("message"):
        return str(data["message"])
    return text.strip()[:500]


def _from_status(status: int, message: str, *, retry_after: str = "") -> AgentApiError:
    """The project's error for an API server answer (the one place that maps them)."""
    if status == 403:
        return PermissionDenied(
            f"the control plane's service account lacks a permission: {message} "
            "(grant it in the Role, see deploy/20-rbac.yaml)",
            reason="Forbidden",
        )
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
        # The caller's parts of the spec are checked before sending, so what the API
        # server refuses comes from the settings (image, quantities, ...).
        return FailedPrecondition(
            f"the Kubernetes API server refused an object built from the settings: {message}",
            reason="Invalid",
        )
    if status == 429 or status >= 500 or status == 0:
        delay = float(retry_after) if retry_after.isdigit() else 2.0
        return Unavailable(
            f"the Kubernetes API server is not available ({status}): {message}",
            reason="APIServerUnavailable",
            retry_after=delay,
        )
    return Internal(f"unexpected answer {status} from the Kubernetes API server: {message}")
