"""``KubeDouble``: start the fake API server, hand out a kubeconfig, turn the knobs.

The server runs on its own event loop in its own thread, so the synchronous
``kubernetes`` client can be called straight from a test (or from
``asyncio.to_thread`` in async code) without deadlocking anything. Every
method of :class:`KubeDouble` is thread-safe: it runs its work on the
double's loop and waits for it (a few milliseconds).
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar

import yaml
from aiohttp import web

from .cluster import Cluster
from .faults import CrashLoop, ErrorInjection, Timings
from .rbac import PolicyRule
from .registry import DEFAULT_CLASS_ANNOTATION
from .resources import BY_PLURAL, EVENTS, NAMESPACES, PODS, STORAGECLASSES, ResourceType
from .revision import revision_hash
from .server import ApiServer, RecordedRequest
from .status import JsonObject
from .timestamps import rfc3339

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_IMAGE_PULL_ERROR: Final = (
    "rpc error: code = NotFound desc = failed to pull and unpack image: not found"
)


def _resource(name: str) -> ResourceType:
    try:
        return BY_PLURAL[name]
    except KeyError:
        raise ValueError(
            f"the double does not serve {name!r}; use one of {sorted(BY_PLURAL)}"
        ) from None


class KubeDouble:
    """A fake Kubernetes API server and cluster on 127.0.0.1, for one test.

    Use as a context manager (or call :meth:`start` and :meth:`stop`)::

        with KubeDouble(tmp_path) as kube:
            config = kubernetes.client.Configuration()
            kubernetes.config.load_kube_config(str(kube.kubeconfig), client_configuration=config)

    The kubeconfig names namespace ``namespace`` as its context's default and
    authenticates as ``system:serviceaccount:{namespace}:{service_account}``
    with a bearer token. A default StorageClass ``standard`` exists unless
    ``default_storage_class=None``.
    """

    def __init__(
        self,
        directory: Path,
        *,
        namespace: str = "agentapi-proxy",
        service_account: str = "agentapi-proxy",
        default_storage_class: str | None = "standard",
        timings: Timings | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.namespace = namespace
        self.user = f"system:serviceaccount:{namespace}:{service_account}"
        self.token = secrets.token_urlsafe(24)
        self.kubeconfig = self.directory / "kubeconfig"
        self._default_storage_class = default_storage_class
        self._timings = timings or Timings()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._cluster: Cluster | None = None
        self._server: ApiServer | None = None
        self.port = 0

    # --- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> KubeDouble:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> KubeDouble:
        """Listen on a free port, start the controllers, write the kubeconfig. Not re-entrant."""
        if self._loop is not None:
            raise RuntimeError("KubeDouble already started")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="kube-double", daemon=True
        )
        self._thread.start()
        try:
            self._await(self._start_async(), timeout=30)
        except BaseException:
            self.stop()
            raise
        self._write_kubeconfig()
        return self

    def stop(self) -> None:
        """End every stream, close the listener, stop the loop and thread; idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            if loop.is_running():
                self._await(self._stop_async(), timeout=30)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=30)
            if not thread.is_alive():
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
                loop.close()
            self._loop = None
            self._thread = None
            self.kubeconfig.unlink(missing_ok=True)

    async def _start_async(self) -> None:
        cluster = Cluster(timings=self._timings)
        self._cluster = cluster
        for name in sorted({self.namespace, "default", "kube-system"}):
            self._add_namespace(name)
        if self._default_storage_class:
            self._set_storage_class(self._default_storage_class, "Immediate")
        self._server = ApiServer(cluster, token=self.token, user=self.user)
        self._runner = web.AppRunner(
            self._server.app(), handler_cancellation=True, access_log=None, shutdown_timeout=2.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        cluster.start()
        logger.info("kube double listening on %s", self.url)

    async def _stop_async(self) -> None:
        if self._cluster is not None:
            await self._cluster.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _write_kubeconfig(self) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kube-double", "cluster": {"server": self.url}}],
            "users": [{"name": "kube-double-user", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "kube-double",
                    "context": {
                        "cluster": "kube-double",
                        "user": "kube-double-user",
                        "namespace": self.namespace,
                    },
                }
            ],
            "current-context": "kube-double",
        }
        self.directory.mkdir(parents=True, exist_ok=True)
        self.kubeconfig.write_text(yaml.safe_dump(config))

    # --- running work on the double's loop ---------------------------------------------

    def _await(self, coro: Any, *, timeout: float = 10) -> Any:
        assert self._loop is not None, "KubeDouble is not started"
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def _call(self, fn: Callable[[], T]) -> T:
        async def run() -> T:
            result = fn()
            self.cluster.wake()
            return result

        result: T = self._await(run())
        return result

    @property
    def cluster(self) -> Cluster:
        """The fake cluster; touch it only on the double's loop (through :meth:`_call`)."""
        assert self._cluster is not None, "KubeDouble is not started"
        return self._cluster

    @property
    def server(self) -> ApiServer:
        assert self._server is not None, "KubeDouble is not started"
        return self._server

    # --- looking at the cluster ----------------------------------------------------------

    def get(self, resource: str, name: str, *, namespace: str | None = None) -> JsonObject | None:
        """The stored object (a copy), bypassing the API, RBAC and faults; None if absent."""
        rt = _resource(resource)
        ns = (namespace or self.namespace) if rt.namespaced else ""
        return self._call(lambda: self.cluster.store.get(rt, ns, name))

    def list(self, resource: str, *, namespace: str | None = None) -> builtins.list[JsonObject]:
        rt = _resource(resource)
        ns = (namespace or self.namespace) if rt.namespaced else None
        return self._call(lambda: self.cluster.store.list(rt, ns))

    def events(
        self,
        *,
        involved: str | None = None,
        reason: str | None = None,
        namespace: str | None = None,
    ) -> builtins.list[JsonObject]:
        """Events, optionally only those about object ``involved`` or with ``reason``."""
        return [
            event
            for event in self.list(EVENTS.plural, namespace=namespace)
            if (involved is None or event["involvedObject"]["name"] == involved)
            and (reason is None or event["reason"] == reason)
        ]

    def wait_for(self, predicate: Callable[[], Any], *, what: str, timeout: float = 20.0) -> Any:
        """Poll ``predicate`` until it returns something truthy; return that.

        ``timeout`` is a hang guard, not an expectation: raise AssertionError naming ``what``.
        Blocks the calling thread (sleeps between polls): from a coroutine, run it in
        ``asyncio.to_thread`` or poll with ``asyncio.sleep`` instead.
        """
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"gave up after {timeout}s waiting for {what}")
            time.sleep(0.02)

    @property
    def internal_errors(self) -> builtins.list[str]:
        """Failures of the double's own controllers (bugs in the double); should stay empty."""
        return self._call(lambda: list(self.cluster.internal_errors))

    def revision_hash(self, template: JsonObject) -> str:
        """The hash the fake StatefulSet controller derives from a (defaulted) pod template."""
        return revision_hash(template)

    # --- requests ------------------------------------------------------------------------

    def requests(
        self, *, verb: str | None = None, resource: str | None = None, name: str | None = None
    ) -> builtins.list[RecordedRequest]:
        """Requests received so far; ``resource`` may name a subresource (``pods/log``)."""
        return self._call(
            lambda: [
                r
                for r in self.server.requests
                if (verb is None or r.verb == verb)
                and (resource is None or r.full_resource == resource)
                and (name is None or r.name == name)
            ]
        )

    def clear_requests(self) -> None:
        self._call(self.server.requests.clear)

    def permissions_used(self) -> set[tuple[str, str, str]]:
        """(API group, resource[/subresource], verb) of every resource request so far."""
        return {(r.group, r.full_resource, r.verb) for r in self.requests() if r.resource}

    # --- knobs: API server ---------------------------------------------------------------

    def deny(self, verb: str, resource: str, *, group: str = "") -> None:
        """RBAC: refuse ``verb`` on ``resource`` (e.g. "create", "statefulsets", group="apps")."""
        self._call(lambda: self.cluster.authorizer.deny(verb, resource, group=group))

    def allow(self, verb: str, resource: str, *, group: str = "") -> None:
        """Undo :meth:`deny`."""
        self._call(lambda: self.cluster.authorizer.allow(verb, resource, group=group))

    def set_rbac_rules(self, rules: Iterable[PolicyRule]) -> None:
        """Grant exactly ``rules`` (like a Role bound to our service account)."""
        frozen = tuple(rules)
        self._call(lambda: self.cluster.authorizer.set_rules(frozen))

    def inject_error(
        self,
        code: int,
        *,
        verb: str | None = None,
        resource: str | None = None,
        times: int | None = None,
        message: str = "",
        retry_after: int | None = None,
    ) -> None:
        """Answer matching requests with a ``Status`` of ``code`` (``times`` times, or until
        :meth:`clear_errors`)."""
        injection = ErrorInjection(code, verb, resource, times, message, retry_after)
        self._call(lambda: self.cluster.faults.injections.append(injection))

    def set_unavailable(self, unavailable: bool = True) -> None:
        """Every request (discovery too) gets 503 ServiceUnavailable, or no longer does."""
        if unavailable:
            self.inject_error(503)
        else:
            self._call(self.cluster.faults.clear_unavailable)

    def clear_errors(self) -> None:
        self._call(self.cluster.faults.injections.clear)

    def set_latency(
        self, seconds: float, *, verb: str | None = None, resource: str | None = None
    ) -> None:
        """Delay matching requests by ``seconds`` (0 removes the delay)."""

        def change() -> None:
            if seconds > 0:
                self.cluster.faults.latency[(verb, resource)] = seconds
            else:
                self.cluster.faults.latency.pop((verb, resource), None)

        self._call(change)

    def compact(self) -> int:
        """Forget the watch history: watching from any older resourceVersion now gets 410."""
        return self._call(self.cluster.store.compact)

    # --- knobs: cluster ------------------------------------------------------------------

    def fail_image_pull(self, image: str, message: str = DEFAULT_IMAGE_PULL_ERROR) -> None:
        """Containers with ``image`` go ErrImagePull / ImagePullBackOff (until cleared)."""
        self._call(lambda: self.cluster.faults.image_pull_failures.__setitem__(image, message))

    def clear_image_pull_failure(self, image: str) -> None:
        self._call(lambda: self.cluster.faults.image_pull_failures.pop(image, None))

    def crash_loop(
        self, pod: str, *, exit_code: int = 1, reason: str = "Error", last_words: str = ""
    ) -> None:
        """The containers of pod ``pod`` exit with ``exit_code`` shortly after every start,
        each run printing ``last_words`` to its log just before."""
        crash = CrashLoop(exit_code, reason, last_words.encode())
        self._call(lambda: self.cluster.faults.crash_loops.__setitem__(pod, crash))

    def stop_crash_loop(self, pod: str) -> None:
        self._call(lambda: self.cluster.faults.crash_loops.pop(pod, None))

    def set_insufficient(self, resource: str | None) -> None:
        """No node has room (``"cpu"`` or ``"memory"``) for new pods; None: room again."""
        self._call(lambda: setattr(self.cluster.faults, "insufficient", resource))

    def fail_provisioning(self, message: str | None) -> None:
        """Volume provisioning fails with ``message`` (ProvisioningFailed); None: works again."""
        self._call(lambda: setattr(self.cluster.faults, "provisioning_failure", message))

    def set_ready(self, pod: str, ready: bool) -> None:
        """Make a running pod's containers fail (or pass again) their readiness."""

        def change() -> None:
            if ready:
                self.cluster.faults.not_ready.discard(pod)
            else:
                self.cluster.faults.not_ready.add(pod)

        self._call(change)

    def set_default_storage_class(
        self, name: str | None, *, binding_mode: str = "Immediate"
    ) -> None:
        """Make ``name`` the only (default) StorageClass; None removes every StorageClass,
        so claims without an explicit class stay Pending."""

        def change() -> None:
            for sc in self.cluster.store.list(STORAGECLASSES):
                self.cluster.store.remove(STORAGECLASSES, "", sc["metadata"]["name"])
            if name is not None:
                self._set_storage_class(name, binding_mode)

        self._call(change)

    def _set_storage_class(self, name: str, binding_mode: str) -> None:
        self.cluster.store.insert(
            STORAGECLASSES,
            {
                "kind": "StorageClass",
                "apiVersion": "storage.k8s.io/v1",
                "metadata": {
                    "name": name,
                    "uid": str(uuid.uuid4()),
                    "creationTimestamp": rfc3339(),
                    "annotations": {DEFAULT_CLASS_ANNOTATION: "true"},
                },
                "provisioner": "rancher.io/local-path",
                "reclaimPolicy": "Delete",
                "volumeBindingMode": binding_mode,
            },
        )

    def add_namespace(self, name: str) -> None:
        self._call(lambda: self._add_namespace(name))

    def _add_namespace(self, name: str) -> None:
        if self.cluster.store.get(NAMESPACES, "", name) is not None:
            return
        self.cluster.store.insert(
            NAMESPACES,
            {
                "kind": "Namespace",
                "apiVersion": "v1",
                "metadata": {
                    "name": name,
                    "uid": str(uuid.uuid4()),
                    "creationTimestamp": rfc3339(),
                    "labels": {"kubernetes.io/metadata.name": name},
                },
                "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Active"},
            },
        )

    def serve_pod(
        self,
        pod: str,
        address: tuple[str, int],
        *,
        port: int | None = None,
        namespace: str | None = None,
    ) -> None:
        """Route pods/proxy (to ``port``, or any port when None) of ``pod`` to a local server."""
        ns = namespace or self.namespace
        self._call(lambda: self.cluster.pod_servers.set(ns, pod, address, port=port))

    def append_log(
        self,
        pod: str,
        text: str | bytes,
        *,
        container: str | None = None,
        namespace: str | None = None,
        previous: bool = False,
    ) -> None:
        """Add output of ``pod``'s container (its only one unless ``container`` is given).

        Before the container runs the output is kept and appears once it starts.
        ``previous=True`` writes the log of the last terminated instance.
        """
        ns = namespace or self.namespace
        data = text.encode() if isinstance(text, str) else text

        def change() -> None:
            name = container
            if name is None:
                obj = self.cluster.store.get(PODS, ns, pod)
                containers = [c["name"] for c in (obj or {}).get("spec", {}).get("containers", [])]
                if len(containers) != 1:
                    raise ValueError(f"pod {pod}: pass container= (containers: {containers})")
                name = containers[0]
            self.cluster.logs.append((ns, pod, name), data, previous=previous)

        self._call(change)
