"""The fake cluster behind the API: state, knobs and the reconcile loop of its controllers.

One :class:`Cluster` lives on the double's event loop. Controllers are
level-triggered like the real ones: every pass looks at the whole store and
moves each object one step towards where it should be, writing only what
changed. A pass runs after every write (the store wakes the loop) and at
least every ``timings.tick`` seconds, for time-based steps (image pulled,
container ready, crash, back-off).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from dataclasses import dataclass, field

from .controller import GarbageCollector, StatefulSetController, VolumeController
from .events import EventRecorder
from .faults import Faults, Timings
from .kubelet import Kubelet, Scheduler
from .logbuffer import LogStore
from .rbac import Authorizer
from .registry import Registry
from .store import Store

logger = logging.getLogger(__name__)
# After a pass of the controllers, the loop leaves the API server this many times the
# time the pass took before the next one.
PASS_REST_FACTOR = 2.0

Address = tuple[str, int]


@dataclass
class PodServers:
    """Which local server answers for a pod port (pods/proxy and probes go there)."""

    routes: dict[tuple[str, str, int | None], Address] = field(default_factory=dict)

    def set(self, namespace: str, pod: str, address: Address, *, port: int | None = None) -> None:
        self.routes[(namespace, pod, port)] = address

    def remove(self, namespace: str, pod: str) -> None:
        for key in [k for k in self.routes if k[0] == namespace and k[1] == pod]:
            del self.routes[key]

    def lookup(self, namespace: str, pod: str, port: int | None) -> Address | None:
        return self.routes.get((namespace, pod, port)) or self.routes.get((namespace, pod, None))


class Cluster:
    """Everything the fake API server serves and the fake controllers act on."""

    def __init__(
        self,
        *,
        timings: Timings | None = None,
        nodes: tuple[str, ...] = ("node-1", "node-2", "node-3"),
    ) -> None:
        self.timings = timings or Timings()
        self.faults = Faults()
        self.store = Store()
        self.registry = Registry(self.store)
        self.events = EventRecorder(self.registry)
        self.logs = LogStore()
        self.authorizer = Authorizer()
        self.pod_servers = PodServers()
        self.nodes = nodes
        # Failures of the double's own controllers: a test fixture asserts there are none.
        self.internal_errors: list[str] = []

        self.garbage_collector = GarbageCollector(self)
        self.volumes = VolumeController(self)
        self.statefulsets = StatefulSetController(self)
        self.scheduler = Scheduler(self)
        self.kubelet = Kubelet(self)

        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.store.add_listener(lambda _event: self._wake.set())

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name="kube-double-controllers"
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.logs.end_all()
        self.store.close_watchers()

    async def _run(self) -> None:
        rest = 0.0
        while True:
            if rest:
                await asyncio.sleep(rest)
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that arrives as the wait completes, and stop() would wait forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.timings.tick):
                    await self._wake.wait()
            self._wake.clear()
            started = time.perf_counter()
            self.reconcile_once()
            # A pass over many objects takes a while, and writes wake the next one at
            # once: leave the API server (same loop) at least twice that long, so it
            # keeps answering with a thousand agents as a real one would.
            rest = PASS_REST_FACTOR * (time.perf_counter() - started)

    def reconcile_once(self) -> None:
        """One pass of every controller; a failing one is recorded and the others still run."""
        for name, step in (
            ("garbage collector", self.garbage_collector.sync),
            ("volume controller", self.volumes.sync),
            ("statefulset controller", self.statefulsets.sync),
            ("scheduler", self.scheduler.sync),
            ("kubelet", self.kubelet.sync),
        ):
            try:
                step()
            except Exception:
                text = traceback.format_exc()
                logger.error("%s failed:\n%s", name, text)
                if len(self.internal_errors) < 100:
                    self.internal_errors.append(f"{name}: {text}")
