"""Pure builders of the Kubernetes objects behind one agent in provision mode.

Settings and an :class:`~agentapi_proxy.model.AgentSpec` go in, plain dicts in
the shape of the Kubernetes JSON payloads come out (camelCase keys, as the API
server and ``kubectl`` show them). Nothing here does I/O or imports the
kubernetes client; the client accepts these dicts as request bodies as they are.

For agent ``{id}`` the driver creates, in ``provision_mode.namespace``:

- ConfigMap ``agent-{id}-config``: the agent's settings, loaded with ``envFrom``;
- headless Service ``agent-{id}-headless``: stable DNS for the pod, ready or not;
- StatefulSet ``agent-{id}`` with one replica, so Pod ``agent-{id}-0`` and, from
  the volume claim template ``data``, PVC ``data-agent-{id}-0`` mounted at /data.

The cluster is the source of truth. Every object carries the same labels (ours
plus the spec's) and annotations from which :func:`spec_from_annotations`
rebuilds the spec, so any control-plane replica can list, adopt and compare
agents after a restart. The spec hash annotation makes create idempotent: equal
specs give equal hashes, so "exists with the same hash" is success and "exists
with another hash" is AlreadyExists.

PVC retention (``provision_mode.pvc_delete_policy``): ``delete`` sets the
StatefulSet's ``persistentVolumeClaimRetentionPolicy.whenDeleted: Delete``, so
the StatefulSet controller makes the StatefulSet own the PVC and the garbage
collector removes it with the StatefulSet; ``retain`` sets ``Retain`` and the
data survives the agent, to be reused by the next agent with the same id. The
field is beta since Kubernetes 1.27 and GA in 1.32; older API servers drop it
silently, so with ``delete`` the driver also deletes ``data-agent-{id}-0``
itself (RBAC allows it) and must not report a re-created agent before the old
claim is gone (case K02).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal, NamedTuple, NotRequired, TypedDict

from agentapi_proxy.errors import FailedPrecondition, InvalidArgument
from agentapi_proxy.ids import (
    AGENT_NAME_PREFIX,
    validate_agent_id,
    validate_env_name,
    validate_session_id,
)
from agentapi_proxy.model import AgentSpec
from agentapi_proxy.settings import Settings

# --- label and annotation keys ------------------------------------------------

LABEL_NAME: Final = "app.kubernetes.io/name"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
LABEL_AGENT_ID: Final = "agentapi-proxy/agent-id"
LABEL_SESSION_ID: Final = "agentapi-proxy/session-id"
AGENT_APP_NAME: Final = "agentapi-agent"
MANAGER_NAME: Final = "agentapi-proxy"

ANNOTATION_OWNER: Final = "agentapi-proxy/owner"
ANNOTATION_ENV: Final = "agentapi-proxy/env"
ANNOTATION_LABELS: Final = "agentapi-proxy/labels"
ANNOTATION_SPEC_HASH: Final = "agentapi-proxy/spec-hash"

# Keys a spec's labels may not use: ours, and those the StatefulSet controller
# writes on the pod itself (a template value would be overwritten, silently).
RESERVED_LABEL_KEYS: Final = frozenset(
    {LABEL_NAME, LABEL_MANAGED_BY, LABEL_AGENT_ID, LABEL_SESSION_ID, "controller-revision-hash"}
)
RESERVED_LABEL_PREFIXES: Final = (
    "agentapi-proxy/",
    "statefulset.kubernetes.io/",
    "apps.kubernetes.io/",
)

# --- the agent container ------------------------------------------------------

CONTAINER_NAME: Final = "agent"
PORT_NAME: Final = "http"
VOLUME_NAME: Final = "data"
DATA_MOUNT_PATH: Final = "/data"

ENV_AGENT_ID: Final = "AGENT_ID"
ENV_SESSION_ID: Final = "SESSION_ID"
# The port variable real agentapi reads; the reference agent accepts it too.
ENV_PORT: Final = "AGENTAPI_PORT"
ENV_OWNER: Final = "AGENT_OWNER"
RESERVED_ENV_NAMES: Final = frozenset({ENV_AGENT_ID, ENV_SESSION_ID, ENV_PORT, ENV_OWNER})

# The API server refuses an object whose annotations total more than 256 KiB.
ANNOTATIONS_MAX_BYTES: Final = 256 * 1024

_LABEL_NAME_PART = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


# --- typed shapes of the raw payloads -----------------------------------------


class OwnerReference(TypedDict):
    apiVersion: str
    kind: str
    name: str
    uid: str
    controller: bool
    blockOwnerDeletion: bool


class ObjectMeta(TypedDict):
    name: str
    namespace: str
    labels: dict[str, str]
    annotations: dict[str, str]
    ownerReferences: NotRequired[list[OwnerReference]]


class TemplateMeta(TypedDict):
    labels: dict[str, str]
    annotations: dict[str, str]


class ClaimTemplateMeta(TypedDict):
    name: str
    labels: dict[str, str]
    annotations: dict[str, str]


class EnvVar(TypedDict):
    name: str
    value: str


class ConfigMapEnvSource(TypedDict):
    name: str


class EnvFromSource(TypedDict):
    configMapRef: ConfigMapEnvSource


class ContainerPort(TypedDict):
    name: str
    containerPort: int
    protocol: Literal["TCP"]


class ResourceRequirements(TypedDict):
    requests: dict[str, str]
    limits: dict[str, str]


class HTTPHeader(TypedDict):
    name: str
    value: str


class HTTPGetAction(TypedDict):
    path: str
    # A port name (IntOrString); the probes follow the container port by name.
    port: str
    httpHeaders: list[HTTPHeader]


class Probe(TypedDict):
    httpGet: HTTPGetAction
    periodSeconds: int
    timeoutSeconds: int
    failureThreshold: int


class VolumeMount(TypedDict):
    name: str
    mountPath: str


class Container(TypedDict):
    name: str
    image: str
    imagePullPolicy: Literal["Always", "IfNotPresent", "Never"]
    command: NotRequired[list[str]]
    workingDir: str
    ports: list[ContainerPort]
    env: list[EnvVar]
    envFrom: list[EnvFromSource]
    resources: ResourceRequirements
    livenessProbe: Probe
    readinessProbe: Probe
    volumeMounts: list[VolumeMount]


class PodSpec(TypedDict):
    containers: list[Container]
    automountServiceAccountToken: bool
    enableServiceLinks: bool


class PodTemplateSpec(TypedDict):
    metadata: TemplateMeta
    spec: PodSpec


class LabelSelector(TypedDict):
    matchLabels: dict[str, str]


class VolumeResourceRequirements(TypedDict):
    requests: dict[str, str]


class PersistentVolumeClaimSpec(TypedDict):
    accessModes: list[Literal["ReadWriteOnce"]]
    resources: VolumeResourceRequirements


class PersistentVolumeClaimTemplate(TypedDict):
    metadata: ClaimTemplateMeta
    spec: PersistentVolumeClaimSpec


RetentionPolicyValue = Literal["Delete", "Retain"]


class PVCRetentionPolicy(TypedDict):
    whenDeleted: RetentionPolicyValue
    whenScaled: RetentionPolicyValue


class StatefulSetSpec(TypedDict):
    replicas: int
    serviceName: str
    selector: LabelSelector
    template: PodTemplateSpec
    volumeClaimTemplates: list[PersistentVolumeClaimTemplate]
    persistentVolumeClaimRetentionPolicy: PVCRetentionPolicy


class StatefulSet(TypedDict):
    apiVersion: Literal["apps/v1"]
    kind: Literal["StatefulSet"]
    metadata: ObjectMeta
    spec: StatefulSetSpec


class ServicePort(TypedDict):
    name: str
    port: int
    targetPort: str
    protocol: Literal["TCP"]


class ServiceSpec(TypedDict):
    clusterIP: Literal["None"]
    selector: dict[str, str]
    ports: list[ServicePort]
    publishNotReadyAddresses: bool


class Service(TypedDict):
    apiVersion: Literal["v1"]
    kind: Literal["Service"]
    metadata: ObjectMeta
    spec: ServiceSpec


class ConfigMap(TypedDict):
    apiVersion: Literal["v1"]
    kind: Literal["ConfigMap"]
    metadata: ObjectMeta
    data: dict[str, str]


class AgentObjects(NamedTuple):
    """The objects of one agent, in the order the driver creates them."""

    configmap: ConfigMap
    service: Service
    statefulset: StatefulSet


# --- RBAC the StatefulSet driver needs ----------------------------------------


class RbacRule(NamedTuple):
    """One resource of one API group and the verbs the driver uses on it."""

    api_group: str
    resource: str
    verbs: tuple[str, ...]
    why: str


# deploy/ grants exactly these (tests/test_deploy_manifests.py checks both ways).
REQUIRED_RBAC_RULES: Final[tuple[RbacRule, ...]] = (
    RbacRule(
        "apps",
        "statefulsets",
        ("create", "get", "list", "watch", "delete", "patch"),
        "one StatefulSet per agent; watched for state, patched to adopt or relabel",
    ),
    RbacRule("", "services", ("create", "get", "list", "delete"), "headless Service per agent"),
    RbacRule("", "configmaps", ("create", "get", "list", "delete"), "settings per agent"),
    RbacRule(
        "",
        "persistentvolumeclaims",
        ("get", "list", "delete"),
        "claims come from the volume claim template; deleted when the policy is delete",
    ),
    RbacRule("", "pods", ("get", "list", "watch"), "the agent pod's phase, conditions, restarts"),
    RbacRule("", "pods/log", ("get",), "StreamLogs, like kubectl logs"),
    RbacRule(
        "",
        "pods/proxy",
        ("get", "create"),
        "agent traffic through the API server when the control plane runs outside the cluster",
    ),
    RbacRule("", "events", ("get", "list", "watch"), "why: image pull, PVC binding, scheduling"),
)


# --- names and selectors ------------------------------------------------------


def statefulset_name(agent_id: str) -> str:
    """``agent-{id}``. Raises InvalidArgument for an id Kubernetes names cannot hold."""
    return AGENT_NAME_PREFIX + validate_agent_id(agent_id)


def service_name(agent_id: str) -> str:
    """``agent-{id}-headless``. Raises InvalidArgument."""
    return f"{statefulset_name(agent_id)}-headless"


def pod_name(agent_id: str) -> str:
    """``agent-{id}-0``, the only pod of the StatefulSet. Raises InvalidArgument."""
    return f"{statefulset_name(agent_id)}-0"


def pvc_name(agent_id: str) -> str:
    """``data-agent-{id}-0``, named by the controller from the claim template. Raises
    InvalidArgument."""
    return f"{VOLUME_NAME}-{pod_name(agent_id)}"


def configmap_name(agent_id: str) -> str:
    """``agent-{id}-config``. Raises InvalidArgument."""
    return f"{statefulset_name(agent_id)}-config"


def selector_all() -> str:
    """Label selector matching every agent object this project manages."""
    return f"{LABEL_NAME}={AGENT_APP_NAME},{LABEL_MANAGED_BY}={MANAGER_NAME}"


def selector_for_agent(agent_id: str) -> str:
    """Label selector matching the objects (and the pod and PVC) of one agent.

    Raises InvalidArgument, so an id can never inject further selector terms.
    """
    return f"{selector_all()},{LABEL_AGENT_ID}={validate_agent_id(agent_id)}"


def selector_for_session(session_id: str) -> str:
    """Label selector matching the objects of every agent of one session. Raises
    InvalidArgument."""
    return f"{selector_all()},{LABEL_SESSION_ID}={validate_session_id(session_id)}"


# --- spec checks, labels, annotations -----------------------------------------


def validate_spec(spec: AgentSpec) -> None:
    """Raise InvalidArgument unless every part of ``spec`` fits the objects built from it.

    Checks the ids, the env names (none may replace the variables we set:
    :data:`RESERVED_ENV_NAMES`) and the label keys and values (Kubernetes
    syntax; none may use :data:`RESERVED_LABEL_KEYS` or
    :data:`RESERVED_LABEL_PREFIXES`).
    """
    validate_agent_id(spec.agent_id)
    validate_session_id(spec.session_id)
    for name in spec.env:
        validate_env_name(name)
        if name in RESERVED_ENV_NAMES:
            raise InvalidArgument(
                f"environment variable {name} is set by agentapi-proxy and cannot be given: "
                f"reserved names are {', '.join(sorted(RESERVED_ENV_NAMES))}"
            )
    for key, value in spec.labels.items():
        _validate_label(key, value)


def _validate_label(key: str, value: str) -> None:
    prefix, _, name = key.rpartition("/")
    if (
        not _LABEL_NAME_PART.fullmatch(name)
        or len(name) > 63
        or ("/" in key and (not _DNS_SUBDOMAIN.fullmatch(prefix) or len(prefix) > 253))
    ):
        raise InvalidArgument(
            f"label key {key[:80]!r} is not allowed: an optional DNS prefix and '/', then 1 to "
            "63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
        )
    if key in RESERVED_LABEL_KEYS or key.startswith(RESERVED_LABEL_PREFIXES):
        raise InvalidArgument(f"label key {key!r} is reserved for agentapi-proxy and Kubernetes")
    if len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
        raise InvalidArgument(
            f"label {key!r} has value {value[:80]!r}: a label value is empty or 1 to 63 "
            "letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
        )


def spec_hash(spec: AgentSpec) -> str:
    """A digest of everything in ``spec``: equal specs, and only those, give equal hashes.

    Stable across processes and releases of this module (the encoding is fixed),
    so a hash written by one control-plane replica is comparable by another.
    """
    canonical = json.dumps(
        {
            "agent_id": spec.agent_id,
            "session_id": spec.session_id,
            "owner": spec.owner,
            "env": dict(spec.env),
            "labels": dict(spec.labels),
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return "v1-" + hashlib.sha256(canonical.encode("ascii")).hexdigest()


def agent_labels(spec: AgentSpec) -> dict[str, str]:
    """The labels of every object of the agent: the spec's, then ours (which win)."""
    return {**spec.labels, **_selector_labels(spec.agent_id), LABEL_SESSION_ID: spec.session_id}


def _selector_labels(agent_id: str) -> dict[str, str]:
    # The StatefulSet selector is immutable: only labels that never change for an agent.
    return {
        LABEL_NAME: AGENT_APP_NAME,
        LABEL_MANAGED_BY: MANAGER_NAME,
        LABEL_AGENT_ID: agent_id,
    }


def agent_annotations(spec: AgentSpec) -> dict[str, str]:
    """What :func:`spec_from_annotations` needs beyond the labels. Raises InvalidArgument
    when the spec is too large for the API server's annotation limit."""
    annotations = {
        ANNOTATION_OWNER: spec.owner,
        ANNOTATION_ENV: json.dumps(dict(spec.env), sort_keys=True, ensure_ascii=True),
        ANNOTATION_LABELS: json.dumps(dict(spec.labels), sort_keys=True, ensure_ascii=True),
        ANNOTATION_SPEC_HASH: spec_hash(spec),
    }
    size = sum(len(k.encode()) + len(v.encode()) for k, v in annotations.items())
    if size > ANNOTATIONS_MAX_BYTES:
        raise InvalidArgument(
            f"agent {spec.agent_id}: env, labels and owner take {size} bytes, more than the "
            f"{ANNOTATIONS_MAX_BYTES} bytes Kubernetes allows in annotations"
        )
    return annotations


def spec_from_annotations(obj: Mapping[str, Any]) -> AgentSpec:
    """Rebuild the AgentSpec from any object built here, as read back from the cluster.

    ``obj`` is a raw object (camelCase keys, e.g. a kubernetes client model passed
    through ``ApiClient().sanitize_for_serialization``). Inverse of the builders:
    ``spec_from_annotations(build_statefulset(s, spec)) == spec``. Raises
    FailedPrecondition (reason ``MalformedAgentObject``) when our labels or
    annotations are missing or do not agree with the spec hash, e.g. after a hand edit.
    """
    metadata = obj.get("metadata") or {}
    name = metadata.get("name", "?")
    labels = metadata.get("labels") or {}
    annotations = metadata.get("annotations") or {}

    def malformed(why: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"{obj.get('kind', 'object')} {name}: {why}; it was not created by this version "
            "of agentapi-proxy or was edited by hand",
            reason="MalformedAgentObject",
        )

    try:
        spec = AgentSpec(
            agent_id=labels[LABEL_AGENT_ID],
            session_id=labels[LABEL_SESSION_ID],
            owner=annotations[ANNOTATION_OWNER],
            env=_str_mapping(json.loads(annotations[ANNOTATION_ENV])),
            labels=_str_mapping(json.loads(annotations[ANNOTATION_LABELS])),
        )
        stored_hash = annotations[ANNOTATION_SPEC_HASH]
    except KeyError as exc:
        raise malformed(f"label or annotation {exc.args[0]} is missing") from exc
    except (ValueError, TypeError) as exc:
        raise malformed(f"an annotation does not hold a JSON object of strings ({exc})") from exc
    if not isinstance(spec.owner, str) or stored_hash != spec_hash(spec):
        raise malformed(f"annotation {ANNOTATION_SPEC_HASH} does not match the other annotations")
    return spec


def _str_mapping(value: object) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise TypeError("expected a JSON object of strings")
    return value


def _metadata(name: str, settings: Settings, spec: AgentSpec) -> ObjectMeta:
    return {
        "name": name,
        "namespace": settings.provision_mode.namespace,
        "labels": agent_labels(spec),
        "annotations": agent_annotations(spec),
    }


def _owned_by_statefulset(meta: ObjectMeta, agent_id: str, owner_uid: str | None) -> None:
    if owner_uid is not None:
        meta["ownerReferences"] = [
            {
                "apiVersion": "apps/v1",
                "kind": "StatefulSet",
                "name": statefulset_name(agent_id),
                "uid": owner_uid,
                "controller": True,
                # True would need update on statefulsets/finalizers where the
                # OwnerReferencesPermissionEnforcement admission plugin runs.
                "blockOwnerDeletion": False,
            }
        ]


# --- builders -----------------------------------------------------------------


def build_configmap(
    settings: Settings, spec: AgentSpec, *, owner_uid: str | None = None
) -> ConfigMap:
    """ConfigMap ``agent-{id}-config``: the agent's settings, read by the pod via envFrom.

    With ``owner_uid`` (the StatefulSet's uid) the ConfigMap is deleted by the
    garbage collector together with the StatefulSet. Raises InvalidArgument.
    """
    validate_spec(spec)
    meta = _metadata(configmap_name(spec.agent_id), settings, spec)
    _owned_by_statefulset(meta, spec.agent_id, owner_uid)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta,
        "data": {
            ENV_AGENT_ID: spec.agent_id,
            ENV_SESSION_ID: spec.session_id,
            ENV_PORT: str(settings.provision_mode.container_port),
            ENV_OWNER: spec.owner,
        },
    }


def build_service(settings: Settings, spec: AgentSpec, *, owner_uid: str | None = None) -> Service:
    """Headless Service ``agent-{id}-headless`` that gives the pod its DNS name.

    Not-ready addresses are published so the control plane can reach an agent
    that is still starting (to probe it, or to show why it is not ready).
    ``owner_uid``: as in :func:`build_configmap`. Raises InvalidArgument.
    """
    validate_spec(spec)
    meta = _metadata(service_name(spec.agent_id), settings, spec)
    _owned_by_statefulset(meta, spec.agent_id, owner_uid)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "clusterIP": "None",
            "selector": _selector_labels(spec.agent_id),
            "ports": [
                {
                    "name": PORT_NAME,
                    "port": settings.provision_mode.container_port,
                    "targetPort": PORT_NAME,
                    "protocol": "TCP",
                }
            ],
            "publishNotReadyAddresses": True,
        },
    }


def build_statefulset(
    settings: Settings, spec: AgentSpec, *, command: Sequence[str] | None = None
) -> StatefulSet:
    """StatefulSet ``agent-{id}``: one pod running the agent image, one PVC at /data.

    ``command`` replaces the image's entrypoint when given. Raises
    InvalidArgument for a spec Kubernetes would refuse.
    """
    validate_spec(spec)
    provision = settings.provision_mode
    resources = provision.resources
    name = statefulset_name(spec.agent_id)
    labels = agent_labels(spec)
    annotations = agent_annotations(spec)

    env: list[EnvVar] = [
        {"name": ENV_AGENT_ID, "value": spec.agent_id},
        {"name": ENV_SESSION_ID, "value": spec.session_id},
        {"name": ENV_PORT, "value": str(provision.container_port)},
    ]
    env += [{"name": key, "value": value} for key, value in sorted(spec.env.items())]

    container: Container = {
        "name": CONTAINER_NAME,
        "image": provision.image,
        # The default image is built locally and loaded into the cluster (kind,
        # minikube); with "Always", implied by :latest, the node would try a registry.
        "imagePullPolicy": "IfNotPresent",
        "workingDir": DATA_MOUNT_PATH,
        "ports": [
            {"name": PORT_NAME, "containerPort": provision.container_port, "protocol": "TCP"}
        ],
        "env": env,
        "envFrom": [{"configMapRef": {"name": configmap_name(spec.agent_id)}}],
        "resources": {
            "requests": {"cpu": resources.cpu_request, "memory": resources.memory_request},
            "limits": {"cpu": resources.cpu_limit, "memory": resources.memory_limit},
        },
        # A slow answer under load must not get the agent restarted; only a hung one.
        "livenessProbe": _probe(provision.probe_path, period=10, timeout=5, failures=6),
        "readinessProbe": _probe(provision.probe_path, period=2, timeout=2, failures=3),
        "volumeMounts": [{"name": VOLUME_NAME, "mountPath": DATA_MOUNT_PATH}],
    }
    if command is not None:
        container["command"] = list(command)

    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(name, settings, spec),
        "spec": {
            "replicas": 1,
            "serviceName": service_name(spec.agent_id),
            "selector": {"matchLabels": _selector_labels(spec.agent_id)},
            "template": {
                "metadata": {"labels": dict(labels), "annotations": dict(annotations)},
                "spec": {
                    "containers": [container],
                    # Agents run untrusted code: no API credentials for them.
                    "automountServiceAccountToken": False,
                    # Service links would put {SERVICE}_PORT variables, e.g.
                    # AGENTAPI_PROXY_PORT from our own Service, into the agent's env.
                    "enableServiceLinks": False,
                },
            },
            "volumeClaimTemplates": [
                {
                    "metadata": {
                        "name": VOLUME_NAME,
                        "labels": dict(labels),
                        "annotations": dict(annotations),
                    },
                    "spec": {
                        "accessModes": ["ReadWriteOnce"],
                        "resources": {"requests": {"storage": resources.storage_size}},
                    },
                }
            ],
            "persistentVolumeClaimRetentionPolicy": _retention_policy(provision.pvc_delete_policy),
        },
    }


def build_objects(
    settings: Settings, spec: AgentSpec, *, command: Sequence[str] | None = None
) -> AgentObjects:
    """All objects of one agent, without owner references. Raises InvalidArgument."""
    return AgentObjects(
        configmap=build_configmap(settings, spec),
        service=build_service(settings, spec),
        statefulset=build_statefulset(settings, spec, command=command),
    )


def _probe(path: str, *, period: int, timeout: int, failures: int) -> Probe:
    return {
        "httpGet": {
            "path": path,
            "port": PORT_NAME,
            # Real agentapi answers only requests whose Host is an allowed host
            # (localhost by default); the kubelet would send the pod IP.
            "httpHeaders": [{"name": "Host", "value": "localhost"}],
        },
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def _retention_policy(pvc_delete_policy: str) -> PVCRetentionPolicy:
    when_deleted: RetentionPolicyValue = "Delete" if pvc_delete_policy == "delete" else "Retain"
    # replicas never changes from 1, so scaling never drops a claim.
    return {"whenDeleted": when_deleted, "whenScaled": "Retain"}
