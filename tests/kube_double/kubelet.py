"""Fake scheduler and kubelet: pods go Pending -> scheduled -> Running/ready, or get stuck.

Scheduler: a pod is bound to a node once every PVC it mounts exists, is not
being deleted and is Bound (or waits for its first consumer), and no
"insufficient capacity" fault is set; otherwise it stays Pending with
``PodScheduled=False/Unschedulable`` and a ``FailedScheduling`` event whose
message reads like the real scheduler's (``0/3 nodes are available: ...``).

Kubelet: per container a small state machine -- ContainerCreating, then
either running (ready after ``timings.ready``) or ErrImagePull <->
ImagePullBackOff, and, for a crash-looping pod, running -> terminated ->
CrashLoopBackOff -> running with ``restartCount`` + 1. A pod being deleted is
removed after ``timings.terminate`` (capped by its grace period).
"""

from __future__ import annotations

import copy
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal

from .resources import PERSISTENTVOLUMECLAIMS, PODS, STORAGECLASSES
from .status import JsonObject
from .timestamps import rfc3339

if TYPE_CHECKING:
    from .cluster import Cluster

ContainerPhase = Literal["creating", "pull_error", "pull_backoff", "running", "backoff"]

SCHEDULER: Final = "default-scheduler"
KUBELET: Final = "kubelet"


def claim_names(pod: JsonObject) -> list[str]:
    return [
        volume["persistentVolumeClaim"]["claimName"]
        for volume in (pod.get("spec") or {}).get("volumes") or []
        if isinstance(volume.get("persistentVolumeClaim"), dict)
    ]


def qos_class(pod_spec: JsonObject) -> str:
    """Guaranteed, Burstable or BestEffort, from the containers' requests and limits."""
    containers = pod_spec.get("containers") or []
    any_set = False
    guaranteed = True
    for container in containers:
        resources = container.get("resources") or {}
        requests = resources.get("requests") or {}
        limits = resources.get("limits") or {}
        any_set = any_set or bool(requests or limits)
        for name in ("cpu", "memory"):
            if name not in limits or requests.get(name, limits[name]) != limits[name]:
                guaranteed = False
    if not any_set:
        return "BestEffort"
    return "Guaranteed" if guaranteed else "Burstable"


class Scheduler:
    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self._first_seen: dict[str, float] = {}
        self._next_node = 0

    def _volume_problem(self, pod: JsonObject) -> tuple[str | None, bool]:
        """(why the pod cannot be scheduled, whether it must wait for volume binding)."""
        registry = self._cluster.registry
        namespace = pod["metadata"]["namespace"]
        waiting = False
        for name in claim_names(pod):
            pvc = registry.find(PERSISTENTVOLUMECLAIMS, namespace, name)
            if pvc is None:
                return f'persistentvolumeclaim "{name}" not found', False
            if pvc["metadata"].get("deletionTimestamp"):
                return f'persistentvolumeclaim "{name}" is being deleted', False
            if (pvc.get("status") or {}).get("phase") == "Bound":
                continue
            class_name = (pvc.get("spec") or {}).get("storageClassName")
            sc = registry.find(STORAGECLASSES, "", class_name) if class_name else None
            if sc is not None and self._cluster.faults.provisioning_failure is None:
                # The volume controller will bind it (now, or once this pod is its first
                # consumer): wait quietly instead of reporting a transient failure.
                waiting = True
                continue
            return "pod has unbound immediate PersistentVolumeClaims", False
        return None, waiting

    def sync(self) -> None:
        cluster = self._cluster
        count = len(cluster.nodes)
        now = time.monotonic()
        pending_uids: set[str] = set()
        for pod in cluster.store.list(PODS):
            meta = pod["metadata"]
            spec = pod["spec"]
            if spec.get("nodeName") or meta.get("deletionTimestamp"):
                continue
            pending_uids.add(meta["uid"])
            first_seen = self._first_seen.setdefault(meta["uid"], now)

            problem, waiting = self._volume_problem(pod)
            if problem is not None:
                message = (
                    f"0/{count} nodes are available: {problem}. preemption: 0/{count} nodes are "
                    f"available: {count} Preemption is not helpful for scheduling."
                )
            elif cluster.faults.insufficient:
                message = (
                    f"0/{count} nodes are available: {count} Insufficient "
                    f"{cluster.faults.insufficient}. preemption: 0/{count} nodes are available: "
                    f"{count} No preemption victims found for incoming pod."
                )
            else:
                message = None

            if message is not None:
                self._unschedulable(pod, message)
                continue
            if waiting or now < first_seen + cluster.timings.schedule:
                continue
            self._bind(pod)
        for uid in [u for u in self._first_seen if u not in pending_uids]:
            del self._first_seen[uid]

    def _unschedulable(self, pod: JsonObject, message: str) -> None:
        cluster = self._cluster
        _set_condition(pod, "PodScheduled", "False", reason="Unschedulable", message=message)
        pod["status"]["phase"] = "Pending"
        stored = cluster.registry.write_internal(PODS, pod)
        cluster.events.record(
            PODS,
            stored,
            type="Warning",
            reason="FailedScheduling",
            message=message,
            component=SCHEDULER,
        )

    def _bind(self, pod: JsonObject) -> None:
        cluster = self._cluster
        node = cluster.nodes[self._next_node % len(cluster.nodes)]
        self._next_node += 1
        pod["spec"]["nodeName"] = node
        _set_condition(pod, "PodScheduled", "True")
        stored = cluster.registry.write_internal(PODS, pod)
        meta = stored["metadata"]
        cluster.events.record(
            PODS,
            stored,
            type="Normal",
            reason="Scheduled",
            message=f"Successfully assigned {meta['namespace']}/{meta['name']} to {node}",
            component=SCHEDULER,
        )


def _set_condition(
    pod: JsonObject,
    kind: str,
    status: str,
    *,
    reason: str | None = None,
    message: str | None = None,
) -> None:
    conditions: list[JsonObject] = pod.setdefault("status", {}).setdefault("conditions", [])
    existing = next((c for c in conditions if c["type"] == kind), None)
    condition: JsonObject = {"type": kind, "status": status, "lastProbeTime": None}
    if existing is not None and existing.get("status") == status:
        condition["lastTransitionTime"] = existing.get("lastTransitionTime")
    else:
        condition["lastTransitionTime"] = rfc3339()
    if reason:
        condition["reason"] = reason
    if message:
        condition["message"] = message
    if existing is None:
        conditions.append(condition)
    else:
        conditions[conditions.index(existing)] = condition


@dataclass
class ContainerRuntime:
    name: str
    image: str
    phase: ContainerPhase = "creating"
    due: float = 0.0
    restart_count: int = 0
    container_id: str = ""
    started_at: str | None = None
    ever_started: bool = False
    ready_due: float | None = None
    crash_due: float | None = None
    last_terminated: JsonObject | None = None
    pull_message: str = ""


@dataclass
class PodRuntime:
    uid: str
    namespace: str
    name: str
    node: str
    pod_ip: str
    host_ip: str
    start_time: str
    containers: dict[str, ContainerRuntime] = field(default_factory=dict)
    terminate_due: float | None = None
    transitions: dict[str, tuple[str, str]] = field(default_factory=dict)


class Kubelet:
    """Runs the scheduled pods of all nodes (without running anything)."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self._pods: dict[str, PodRuntime] = {}
        self._next_ip = 10

    def runtime(self, uid: str) -> PodRuntime | None:
        return self._pods.get(uid)

    def sync(self) -> None:
        cluster = self._cluster
        now = time.monotonic()
        alive: set[str] = set()
        for pod in cluster.store.list(PODS):
            meta = pod["metadata"]
            node = pod["spec"].get("nodeName")
            if not node:
                continue
            alive.add(meta["uid"])
            runtime = self._pods.get(meta["uid"]) or self._admit(pod, node, now)

            if meta.get("deletionTimestamp"):
                if self._terminate(pod, runtime, now):
                    alive.discard(meta["uid"])
                continue
            for container in runtime.containers.values():
                self._advance(pod, runtime, container, now)
            self._write_status(pod, runtime)

        for uid in [u for u in self._pods if u not in alive]:
            gone = self._pods.pop(uid)
            cluster.logs.forget_pod(gone.namespace, gone.name)
            cluster.events.forget(uid)

    def _admit(self, pod: JsonObject, node: str, now: float) -> PodRuntime:
        self._next_ip += 1
        meta = pod["metadata"]
        node_index = self._cluster.nodes.index(node) if node in self._cluster.nodes else 0
        runtime = PodRuntime(
            uid=meta["uid"],
            namespace=meta["namespace"],
            name=meta["name"],
            node=node,
            pod_ip=f"10.244.{node_index}.{self._next_ip % 250 + 2}",
            host_ip=f"172.18.0.{node_index + 2}",
            start_time=rfc3339(),
        )
        for container in pod["spec"].get("containers") or []:
            runtime.containers[container["name"]] = ContainerRuntime(
                name=container["name"],
                image=container.get("image", ""),
                due=now + self._cluster.timings.start,
            )
        self._pods[meta["uid"]] = runtime
        return runtime

    def _event(
        self,
        pod: JsonObject,
        kind: Literal["Normal", "Warning"],
        reason: str,
        message: str,
        container: str,
    ) -> None:
        self._cluster.events.record(
            PODS,
            pod,
            type=kind,
            reason=reason,
            message=message,
            component=KUBELET,
            host=pod["spec"].get("nodeName"),
            field_path=f"spec.containers{{{container}}}",
        )

    def _terminate(self, pod: JsonObject, runtime: PodRuntime, now: float) -> bool:
        """Count down a graceful delete; True once the pod is removed."""
        cluster = self._cluster
        meta = pod["metadata"]
        if runtime.terminate_due is None:
            grace = float(meta.get("deletionGracePeriodSeconds", 0))
            runtime.terminate_due = now + min(cluster.timings.terminate, grace)
            for name, container in runtime.containers.items():
                if container.phase == "running":
                    self._event(pod, "Normal", "Killing", f"Stopping container {name}", name)
        if now < runtime.terminate_due or meta.get("finalizers"):
            return False
        for name in runtime.containers:
            cluster.logs.stop((runtime.namespace, runtime.name, name))
        cluster.registry.remove_now(PODS, runtime.namespace, runtime.name)
        return True

    def _advance(
        self, pod: JsonObject, runtime: PodRuntime, container: ContainerRuntime, now: float
    ) -> None:
        cluster = self._cluster
        faults = cluster.faults
        timings = cluster.timings
        key = (runtime.namespace, runtime.name, container.name)
        pull_error = faults.image_pull_failures.get(container.image)

        if container.phase == "creating" and now >= container.due:
            if pull_error is not None:
                container.phase = "pull_error"
                container.pull_message = pull_error
                container.due = now + timings.image_pull_backoff
                self._event(
                    pod, "Normal", "Pulling", f'Pulling image "{container.image}"', container.name
                )
                self._event(
                    pod,
                    "Warning",
                    "Failed",
                    f'Failed to pull image "{container.image}": {pull_error}',
                    container.name,
                )
                self._event(pod, "Warning", "Failed", "Error: ErrImagePull", container.name)
            else:
                self._start(pod, runtime, container, now, first=True)
        elif container.phase == "pull_error" and now >= container.due:
            container.phase = "pull_backoff"
            container.due = now + 2 * timings.image_pull_backoff
            self._event(
                pod,
                "Normal",
                "BackOff",
                f'Back-off pulling image "{container.image}"',
                container.name,
            )
            self._event(pod, "Warning", "Failed", "Error: ImagePullBackOff", container.name)
        elif container.phase == "pull_backoff" and now >= container.due:
            container.phase = "creating"
            container.due = now
        elif container.phase == "running":
            crash = faults.crash_loops.get(runtime.name)
            if container.crash_due is None and crash is not None:
                container.crash_due = now + timings.crash_after
            if crash is not None and container.crash_due is not None and now >= container.crash_due:
                container.phase = "backoff"
                container.due = now + timings.crash_backoff
                container.last_terminated = {
                    "terminated": {
                        "exitCode": crash.exit_code,
                        "reason": crash.reason,
                        "startedAt": container.started_at,
                        "finishedAt": rfc3339(),
                        "containerID": container.container_id,
                    }
                }
                container.ready_due = None
                container.crash_due = None
                if crash.last_words:
                    cluster.logs.append(key, crash.last_words)
                cluster.logs.stop(key)
                self._event(
                    pod,
                    "Warning",
                    "BackOff",
                    f"Back-off restarting failed container {container.name} in pod "
                    f"{runtime.name}_{runtime.namespace}({runtime.uid})",
                    container.name,
                )
        elif container.phase == "backoff" and now >= container.due:
            container.restart_count += 1
            self._start(pod, runtime, container, now, first=False)

    def _start(
        self,
        pod: JsonObject,
        runtime: PodRuntime,
        container: ContainerRuntime,
        now: float,
        *,
        first: bool,
    ) -> None:
        cluster = self._cluster
        container.phase = "running"
        container.ever_started = True
        container.container_id = "containerd://" + secrets.token_hex(32)
        container.started_at = rfc3339()
        container.ready_due = now + cluster.timings.ready
        container.crash_due = None
        cluster.logs.start((runtime.namespace, runtime.name, container.name))
        if first:
            self._event(
                pod,
                "Normal",
                "Pulled",
                f'Container image "{container.image}" already present on machine',
                container.name,
            )
        self._event(
            pod, "Normal", "Created", f"Created container: {container.name}", container.name
        )
        self._event(pod, "Normal", "Started", f"Started container {container.name}", container.name)

    def _ready(self, runtime: PodRuntime, container: ContainerRuntime) -> bool:
        return (
            container.phase == "running"
            and container.ready_due is not None
            and time.monotonic() >= container.ready_due
            and runtime.name not in self._cluster.faults.not_ready
        )

    def _container_status(self, runtime: PodRuntime, container: ContainerRuntime) -> JsonObject:
        state: JsonObject
        if container.phase == "running":
            state = {"running": {"startedAt": container.started_at}}
        elif container.phase == "creating":
            state = {"waiting": {"reason": "ContainerCreating"}}
        elif container.phase == "pull_error":
            state = {"waiting": {"reason": "ErrImagePull", "message": container.pull_message}}
        elif container.phase == "pull_backoff":
            state = {
                "waiting": {
                    "reason": "ImagePullBackOff",
                    "message": f'Back-off pulling image "{container.image}": ErrImagePull: '
                    f"{container.pull_message}",
                }
            }
        else:
            state = {
                "waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": f"back-off 10s restarting failed container={container.name} "
                    f"pod={runtime.name}_{runtime.namespace}({runtime.uid})",
                }
            }
        status: JsonObject = {
            "name": container.name,
            "state": state,
            "lastState": copy.deepcopy(container.last_terminated) or {},
            "ready": self._ready(runtime, container),
            "restartCount": container.restart_count,
            "image": container.image,
            "imageID": f"{container.image}@sha256:{'0' * 64}" if container.ever_started else "",
            "started": container.phase == "running",
        }
        if container.container_id:
            status["containerID"] = container.container_id
        return status

    def _write_status(self, pod: JsonObject, runtime: PodRuntime) -> None:
        statuses = [self._container_status(runtime, c) for c in runtime.containers.values()]
        ready = bool(statuses) and all(s["ready"] for s in statuses)
        unready = [s["name"] for s in statuses if not s["ready"]]
        started = any(c.ever_started for c in runtime.containers.values())

        status: JsonObject = pod.setdefault("status", {})
        status["phase"] = "Running" if started else "Pending"
        _set_condition(pod, "PodReadyToStartContainers", "True")
        _set_condition(pod, "Initialized", "True")
        reason = None if ready else "ContainersNotReady"
        message = None if ready else f"containers with unready status: [{' '.join(unready)}]"
        _set_condition(pod, "Ready", "True" if ready else "False", reason=reason, message=message)
        _set_condition(
            pod, "ContainersReady", "True" if ready else "False", reason=reason, message=message
        )
        _set_condition(pod, "PodScheduled", "True")
        order = [
            "PodReadyToStartContainers",
            "Initialized",
            "Ready",
            "ContainersReady",
            "PodScheduled",
        ]
        status["conditions"].sort(
            key=lambda c: order.index(c["type"]) if c["type"] in order else 99
        )
        status["hostIP"] = runtime.host_ip
        status["hostIPs"] = [{"ip": runtime.host_ip}]
        status["podIP"] = runtime.pod_ip
        status["podIPs"] = [{"ip": runtime.pod_ip}]
        status["startTime"] = runtime.start_time
        status["containerStatuses"] = statuses
        status.setdefault("qosClass", qos_class(pod["spec"]))
        self._cluster.registry.write_internal(PODS, pod)
