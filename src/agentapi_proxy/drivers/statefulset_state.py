"""What state an agent is in, read from its Kubernetes objects (pure, no I/O).

Every problem of the design document's troubleshooting list ends up here as a
state and a reason a person can act on: image pull failures, claims that
cannot bind or be provisioned, unschedulable pods, crash loops, and pods the
StatefulSet controller could not create.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from agentapi_proxy.model import State

# Container waiting reasons that need a person: the kubelet keeps retrying,
# but nothing will change until the image, registry or settings change.
STUCK_WAITING_REASONS = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "CrashLoopBackOff",
        "RunContainerError",
    }
)
# Warning events on the StatefulSet or claim that explain a missing pod or volume.
FAILING_EVENT_REASONS = frozenset({"FailedCreate", "ProvisioningFailed", "FailedBinding"})

Obj = Mapping[str, Any]


@dataclass(frozen=True)
class Observed:
    state: State
    reason: str = ""
    message: str = ""
    exit_code: int | None = None
    restart_count: int = 0
    ready_time: datetime | None = None


def observe(
    statefulset: Obj,
    pod: Obj | None,
    claim: Obj | None,
    events: Sequence[Obj] = (),
    *,
    claim_name: str = "",
) -> Observed:
    """The agent's state from its StatefulSet, pod, claim and their Warning events."""
    if statefulset.get("metadata", {}).get("deletionTimestamp"):
        return Observed(State.STOPPING, "Deleting", "the agent is being deleted")

    warnings = [e for e in events if e.get("type") == "Warning"]
    if pod is None:
        failing = _latest(e for e in warnings if e.get("reason") in FAILING_EVENT_REASONS)
        if failing is not None:
            return Observed(
                State.FAILED, str(failing.get("reason")), str(failing.get("message", ""))
            )
        return Observed(State.PENDING, "PodNotCreated", "waiting for the StatefulSet controller")

    status = pod.get("status", {})
    container = _container_status(status)
    restarts = int(container.get("restartCount", 0)) if container else 0
    ready_time = _ready_time(status)

    if container:
        waiting = container.get("state", {}).get("waiting")
        if waiting and waiting.get("reason") in STUCK_WAITING_REASONS:
            last = container.get("lastState", {}).get("terminated") or {}
            exit_code = last.get("exitCode")
            message = waiting.get("message") or _explain(waiting["reason"])
            if waiting["reason"] == "CrashLoopBackOff" and exit_code is not None:
                message = (
                    f"the agent keeps exiting (last exit code {exit_code}, {restarts} restarts)"
                )
            return Observed(
                State.FAILED,
                str(waiting["reason"]),
                str(message),
                exit_code=exit_code,
                restart_count=restarts,
            )
        terminated = container.get("state", {}).get("terminated")
        if terminated:
            return Observed(
                State.FAILED,
                str(terminated.get("reason") or "Terminated"),
                f"the agent exited with code {terminated.get('exitCode')}",
                exit_code=terminated.get("exitCode"),
                restart_count=restarts,
            )

    phase = status.get("phase", "Pending")
    if phase in {"Failed", "Succeeded"}:
        return Observed(
            State.FAILED,
            phase,
            str(status.get("message", "the pod stopped")),
            restart_count=restarts,
        )

    scheduled = _condition(status, "PodScheduled")
    if scheduled is not None and scheduled.get("status") == "False":
        reason = str(scheduled.get("reason") or "Unschedulable")
        message = str(scheduled.get("message", ""))
        if claim is not None and claim.get("status", {}).get("phase") != "Bound":
            claim_problem = _latest(
                e
                for e in warnings
                if e.get("involvedObject", {}).get("kind") == "PersistentVolumeClaim"
            )
            reason = "PersistentVolumeClaimPending"
            message = (
                f"claim {claim_name} is not bound"
                + (f": {claim_problem.get('message')}" if claim_problem else "")
                + " (check that a StorageClass exists and has capacity)"
            )
        return Observed(State.PENDING, reason, message, restart_count=restarts)

    if phase == "Running" and (_condition(status, "Ready") or {}).get("status") == "True":
        return Observed(State.READY, restart_count=restarts, ready_time=ready_time)
    if phase == "Running":
        if restarts or ready_time is not None:
            return Observed(
                State.UNREADY,
                "ProbeFailed",
                "the agent does not answer its readiness probe",
                restart_count=restarts,
                ready_time=ready_time,
            )
        return Observed(State.STARTING, "NotReady", "waiting for the readiness probe")
    return Observed(State.STARTING, "ContainerCreating", "the pod is starting")


def _explain(reason: str) -> str:
    if reason in {"ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName"}:
        return (
            "the node cannot pull the agent image: check provision_mode.image, the "
            "registry's access and the image pull policy"
        )
    return reason


def _container_status(status: Obj) -> Obj | None:
    statuses = status.get("containerStatuses") or []
    for entry in statuses:
        if entry.get("name") == "agent":
            return dict(entry)
    return dict(statuses[0]) if statuses else None


def _condition(status: Obj, kind: str) -> Obj | None:
    for condition in status.get("conditions") or []:
        if condition.get("type") == kind:
            return dict(condition)
    return None


def _ready_time(status: Obj) -> datetime | None:
    ready = _condition(status, "Ready")
    if not ready or ready.get("status") != "True" or not ready.get("lastTransitionTime"):
        return None
    return parse_time(str(ready["lastTransitionTime"]))


def _latest(events: Any) -> Obj | None:
    ordered = sorted(
        events,
        key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""),
    )
    return ordered[-1] if ordered else None


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)
