"""What state an agent is in, read from its Kubernetes objects (pure, no I/O).

Every problem of the design document's troubleshooting list ends up here as a
state and a reason a person can act on:

============================  =========  =================================
problem                       state      reason
============================  =========  =================================
image cannot be pulled        FAILED     ErrImagePull, ImagePullBackOff, ...
agent keeps exiting           FAILED     CrashLoopBackOff (with exit code)
pod cannot be created         FAILED     FailedCreate (quota, admission)
no StorageClass               PENDING    NoStorageClass
volume provisioning fails     PENDING    ProvisioningFailed
claim not bound otherwise     PENDING    PersistentVolumeClaimPending
no node has room              PENDING    Unschedulable ("Insufficient cpu")
old claim/pod still deleted   PENDING    VolumeTerminating, OldPodTerminating
============================  =========  =================================

RBAC denials and an unreachable API server are not states: the calls that meet
them fail (PERMISSION_DENIED, UNAVAILABLE).

Events are matched to the objects by uid, so the warnings of an earlier agent
with the same id (same object names) never explain the state of a new one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from agentapi_proxy.model import State

CONTAINER_NAME: Final = "agent"

# Container waiting reasons that need a person: the kubelet keeps retrying,
# but nothing will change until the image, registry or settings change.
STUCK_WAITING_REASONS: Final = frozenset(
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
IMAGE_PULL_REASONS: Final = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName"}
)
# Warning events on the StatefulSet that explain a pod or claim the controller could not make.
FAILING_EVENT_REASONS: Final = frozenset({"FailedCreate"})
# PENDING reasons that will not go away by waiting a few seconds: a person (or an
# autoscaler) has to act. A log follower gives up on them instead of waiting.
PENDING_PROBLEMS: Final = frozenset(
    {
        "Unschedulable",
        "NoStorageClass",
        "ProvisioningFailed",
        "PersistentVolumeClaimPending",
    }
)

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
    events: Iterable[Obj] = (),
    *,
    claim_name: str = "",
) -> Observed:
    """The agent's state from its StatefulSet, pod, claim and Warning events about them.

    ``pod`` and ``claim`` are what exists under the agent's names, whoever owns
    them: a pod of an earlier StatefulSet of the same name is recognised by its
    owner and reported as the old pod still stopping. ``events`` may hold
    events about anything; only those about these very objects count.
    """
    if _meta(statefulset).get("deletionTimestamp"):
        return Observed(State.STOPPING, "Deleting", "the agent is being deleted")

    warnings = _warnings_about(events, [statefulset, pod, claim])
    if pod is not None and not _owned_by(pod, statefulset):
        return Observed(
            State.PENDING,
            "OldPodTerminating",
            f"waiting for pod {_meta(pod).get('name')} of an earlier agent with this id to stop",
        )
    if claim is not None and _meta(claim).get("deletionTimestamp"):
        return Observed(
            State.PENDING,
            "VolumeTerminating",
            f"waiting for claim {claim_name} of an earlier agent with this id to be deleted",
        )
    if pod is None:
        failing = _latest(e for e in warnings if e.get("reason") in FAILING_EVENT_REASONS)
        if failing is not None:
            return Observed(
                State.FAILED, str(failing.get("reason")), str(failing.get("message", ""))
            )
        return Observed(State.PENDING, "PodNotCreated", "waiting for the StatefulSet controller")
    if _meta(pod).get("deletionTimestamp"):
        return Observed(State.STARTING, "PodTerminating", "the pod is being replaced")

    status = pod.get("status") or {}
    container = _container_status(status)
    restarts = int(container.get("restartCount", 0)) if container else 0
    ready_time = _ready_time(status)
    last_exit = _last_exit_code(container)

    if container:
        state = container.get("state") or {}
        waiting = state.get("waiting")
        if waiting and waiting.get("reason") in STUCK_WAITING_REASONS:
            reason = str(waiting["reason"])
            message = str(waiting.get("message") or _explain(reason))
            if reason in IMAGE_PULL_REASONS:
                message = f"{_explain(reason)}: {message}"
            if reason == "CrashLoopBackOff":
                message = (
                    f"the agent keeps exiting (last exit code {last_exit}, "
                    f"{restarts} restarts); see its logs with previous=true"
                )
            return Observed(
                State.FAILED, reason, message, exit_code=last_exit, restart_count=restarts
            )
        terminated = state.get("terminated")
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
        reason, message = _unschedulable(scheduled, claim, warnings, claim_name=claim_name)
        return Observed(State.PENDING, reason, message, restart_count=restarts)

    ready = _condition(status, "Ready") or {}
    if phase == "Running" and ready.get("status") == "True":
        return Observed(State.READY, restart_count=restarts, ready_time=ready_time)
    if phase == "Running" and container and (container.get("state") or {}).get("running"):
        started = str(container["state"]["running"].get("startedAt") or "")
        if _later(str(ready.get("lastTransitionTime") or ""), started):
            # Ready went False after this run started, so it had been True in between.
            # Timestamps have whole seconds: within the run's first second this reads
            # STARTING, which the next change corrects.
            return Observed(
                State.UNREADY,
                "ProbeFailed",
                "the agent stopped answering its readiness probe",
                exit_code=last_exit,
                restart_count=restarts,
            )
        if restarts:
            return Observed(
                State.STARTING,
                "Restarted",
                f"the agent restarted after exit code {last_exit} ({restarts} restarts) "
                "and is not ready yet",
                exit_code=last_exit,
                restart_count=restarts,
            )
        return Observed(State.STARTING, "NotReady", "waiting for the readiness probe")
    return Observed(State.STARTING, "ContainerCreating", "the pod is starting")


def container_has_run(pod: Obj) -> bool:
    """Whether the agent container has started at least once, so it has a log to read."""
    container = _container_status(pod.get("status") or {})
    if not container:
        return False
    state = container.get("state") or {}
    return bool(
        state.get("running")
        or state.get("terminated")
        or (container.get("lastState") or {}).get("terminated")
    )


def has_previous_run(pod: Obj) -> bool:
    """Whether a terminated earlier run of the agent container exists (``previous`` logs)."""
    container = _container_status(pod.get("status") or {})
    return bool(container and (container.get("lastState") or {}).get("terminated"))


def container_exit(pod: Obj | None) -> tuple[bool, int | None]:
    """(whether the agent container is not running now, exit code of its last run)."""
    if pod is None:
        return True, None
    container = _container_status(pod.get("status") or {})
    if not container:
        return True, None
    state = container.get("state") or {}
    terminated = state.get("terminated")
    if terminated:
        return True, terminated.get("exitCode")
    return not state.get("running"), _last_exit_code(container)


def _unschedulable(
    scheduled: Obj, claim: Obj | None, warnings: Sequence[Obj], *, claim_name: str
) -> tuple[str, str]:
    reason = str(scheduled.get("reason") or "Unschedulable")
    message = str(scheduled.get("message", ""))
    if claim is None or (claim.get("status") or {}).get("phase") == "Bound":
        return reason, message

    claim_uid = _meta(claim).get("uid")
    claim_warnings = [
        e for e in warnings if (e.get("involvedObject") or {}).get("uid") == claim_uid
    ]
    failed = _latest(e for e in claim_warnings if e.get("reason") == "ProvisioningFailed")
    if failed is not None:
        return "ProvisioningFailed", (
            f"the volume of claim {claim_name} cannot be provisioned: {failed.get('message')} "
            "(check the StorageClass's provisioner and the storage capacity)"
        )
    if not (claim.get("spec") or {}).get("storageClassName"):
        return "NoStorageClass", (
            f"claim {claim_name} names no StorageClass and the cluster has no default one: "
            "create a StorageClass and mark it default "
            "(annotation storageclass.kubernetes.io/is-default-class=true)"
        )
    latest = _latest(claim_warnings)
    return "PersistentVolumeClaimPending", (
        f"claim {claim_name} is not bound"
        + (f": {latest.get('message')}" if latest is not None else "")
        + " (check that its StorageClass exists and has capacity)"
    )


def _explain(reason: str) -> str:
    if reason in IMAGE_PULL_REASONS:
        return (
            "the node cannot pull the agent image: check provision_mode.image, the "
            "registry's access and the image pull policy"
        )
    return reason


def _meta(obj: Obj) -> Obj:
    meta: Obj = obj.get("metadata") or {}
    return meta


def _owned_by(pod: Obj, statefulset: Obj) -> bool:
    uid = _meta(statefulset).get("uid")
    refs = _meta(pod).get("ownerReferences") or []
    controllers = [ref for ref in refs if ref.get("controller")]
    # A pod nobody controls yet is adopted by the StatefulSet whose selector matches it.
    return not controllers or any(ref.get("uid") == uid for ref in controllers)


def _warnings_about(events: Iterable[Obj], objects: Sequence[Obj | None]) -> list[Obj]:
    uids = {_meta(obj).get("uid") for obj in objects if obj is not None} - {None, ""}
    return [
        e
        for e in events
        if e.get("type") == "Warning" and (e.get("involvedObject") or {}).get("uid") in uids
    ]


def _container_status(status: Obj) -> Obj | None:
    statuses = status.get("containerStatuses") or []
    for entry in statuses:
        if entry.get("name") == CONTAINER_NAME:
            return dict(entry)
    return dict(statuses[0]) if statuses else None


def _last_exit_code(container: Obj | None) -> int | None:
    if not container:
        return None
    last = (container.get("lastState") or {}).get("terminated") or {}
    code = last.get("exitCode")
    return int(code) if code is not None else None


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


def _later(first: str, second: str) -> bool:
    """Whether timestamp ``first`` is strictly after ``second`` (False when one is missing)."""
    if not first or not second:
        return False
    return parse_time(first) > parse_time(second)


def _latest(events: Iterable[Obj]) -> Obj | None:
    ordered = sorted(
        events,
        key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""),
    )
    return ordered[-1] if ordered else None


def parse_time(text: str) -> datetime:
    """An RFC 3339 timestamp of the API server as an aware UTC datetime."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)
