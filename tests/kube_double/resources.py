"""The API resources the double serves, described once and used by every layer."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final


class NameRule(Enum):
    """Which Kubernetes name syntax ``metadata.name`` of a kind follows."""

    DNS1123_SUBDOMAIN = "subdomain"  # ConfigMap, PVC, Pod: <= 253, dots allowed
    DNS1123_LABEL = "label"  # StatefulSet (since 1.26): <= 63, no dots
    DNS1035_LABEL = "dns1035"  # Service: <= 63, starts with a letter
    PATH_SEGMENT = "segment"  # Event: anything that is a valid URL path segment


_META_FIELDS: Final = frozenset({"metadata.name", "metadata.namespace"})


@dataclass(frozen=True)
class ResourceType:
    """One served resource, e.g. ``apps/v1 statefulsets``."""

    group: str
    version: str
    plural: str
    singular: str
    kind: str
    namespaced: bool
    verbs: frozenset[str]
    name_rule: NameRule = NameRule.DNS1123_SUBDOMAIN
    short_names: tuple[str, ...] = ()
    # Field selectors the real API server supports for this kind, besides metadata.*.
    extra_field_labels: frozenset[str] = frozenset()
    subresources: frozenset[str] = frozenset()
    # DELETE answers with the object (pods, services, PVCs) instead of a Status.
    returns_deleted_object: bool = False
    # Clients may POST it (pods only come from the fake StatefulSet controller).
    client_creatable: bool = True
    # Writes to the main resource keep the stored status (status is a subresource).
    has_status: bool = False
    tracks_generation: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def qualified(self) -> str:
        """``statefulsets.apps`` or ``pods``, as in error messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def field_labels(self) -> frozenset[str]:
        return _META_FIELDS | self.extra_field_labels

    def url_prefix(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"


_RW: Final = frozenset(
    {"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"}
)
_RO: Final = frozenset({"get", "list", "watch"})

STATEFULSETS: Final = ResourceType(
    group="apps",
    version="v1",
    plural="statefulsets",
    singular="statefulset",
    kind="StatefulSet",
    namespaced=True,
    verbs=_RW,
    name_rule=NameRule.DNS1123_LABEL,
    short_names=("sts",),
    subresources=frozenset({"status"}),
    has_status=True,
    tracks_generation=True,
)
SERVICES: Final = ResourceType(
    group="",
    version="v1",
    plural="services",
    singular="service",
    kind="Service",
    namespaced=True,
    verbs=_RW - {"deletecollection"},
    name_rule=NameRule.DNS1035_LABEL,
    short_names=("svc",),
    subresources=frozenset({"status"}),
    returns_deleted_object=True,
    has_status=True,
)
CONFIGMAPS: Final = ResourceType(
    group="",
    version="v1",
    plural="configmaps",
    singular="configmap",
    kind="ConfigMap",
    namespaced=True,
    verbs=_RW,
    short_names=("cm",),
)
PERSISTENTVOLUMECLAIMS: Final = ResourceType(
    group="",
    version="v1",
    plural="persistentvolumeclaims",
    singular="persistentvolumeclaim",
    kind="PersistentVolumeClaim",
    namespaced=True,
    verbs=_RW,
    short_names=("pvc",),
    subresources=frozenset({"status"}),
    returns_deleted_object=True,
    has_status=True,
)
PODS: Final = ResourceType(
    group="",
    version="v1",
    plural="pods",
    singular="pod",
    kind="Pod",
    namespaced=True,
    verbs=_RW,
    short_names=("po",),
    extra_field_labels=frozenset(
        {
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        }
    ),
    subresources=frozenset({"status", "log", "proxy"}),
    returns_deleted_object=True,
    client_creatable=False,
    has_status=True,
)
EVENTS: Final = ResourceType(
    group="",
    version="v1",
    plural="events",
    singular="event",
    kind="Event",
    namespaced=True,
    verbs=_RW,
    name_rule=NameRule.PATH_SEGMENT,
    short_names=("ev",),
    extra_field_labels=frozenset(
        {
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        }
    ),
)
NAMESPACES: Final = ResourceType(
    group="",
    version="v1",
    plural="namespaces",
    singular="namespace",
    kind="Namespace",
    namespaced=False,
    verbs=_RO,
    name_rule=NameRule.DNS1123_LABEL,
    short_names=("ns",),
    extra_field_labels=frozenset({"status.phase"}),
    has_status=True,
)
STORAGECLASSES: Final = ResourceType(
    group="storage.k8s.io",
    version="v1",
    plural="storageclasses",
    singular="storageclass",
    kind="StorageClass",
    namespaced=False,
    verbs=_RO,
    short_names=("sc",),
)
SELFSUBJECTACCESSREVIEWS: Final = ResourceType(
    group="authorization.k8s.io",
    version="v1",
    plural="selfsubjectaccessreviews",
    singular="selfsubjectaccessreview",
    kind="SelfSubjectAccessReview",
    namespaced=False,
    verbs=frozenset({"create"}),
)

ALL_RESOURCES: Final = (
    STATEFULSETS,
    SERVICES,
    CONFIGMAPS,
    PERSISTENTVOLUMECLAIMS,
    PODS,
    EVENTS,
    NAMESPACES,
    STORAGECLASSES,
    SELFSUBJECTACCESSREVIEWS,
)

# Stored resources, by (group, plural); reviews are answered, never stored.
STORED: Final = {(rt.group, rt.plural): rt for rt in ALL_RESOURCES if "get" in rt.verbs}
BY_PLURAL: Final = {rt.plural: rt for rt in ALL_RESOURCES}

GROUP_VERSIONS: Final = {
    "apps": "v1",
    "storage.k8s.io": "v1",
    "authorization.k8s.io": "v1",
}


def lookup(group: str, version: str, plural: str) -> ResourceType | None:
    for rt in ALL_RESOURCES:
        if rt.group == group and rt.version == version and rt.plural == plural:
            return rt
    return None
