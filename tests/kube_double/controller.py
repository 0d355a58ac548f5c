"""Fake StatefulSet controller, garbage collector and volume controller.

StatefulSet controller, as the real one behaves for the cases we test:

- pods ``{set}-{ordinal}`` in order (OrderedReady: the next one only once the
  previous is Running and Ready), each first getting its claims
  ``{template}-{set}-{ordinal}`` from ``volumeClaimTemplates`` (template
  labels plus the selector's labels);
- pods labelled ``controller-revision-hash={set}-{hash}`` (see
  :mod:`revision`), ``statefulset.kubernetes.io/pod-name`` and
  ``apps.kubernetes.io/pod-index``, owned by the set. A pod the API server
  refuses (a revision label over 63 characters) is reported as a Warning
  ``FailedCreate`` event on the set and retried, never created (K01) -- while
  the claim created just before it stays;
- a deleted pod is re-created; a claim missing for a pending pod is re-created;
- ``persistentVolumeClaimRetentionPolicy.whenDeleted: Delete`` makes the set own
  its claims, so the garbage collector deletes them with the set; with the
  default ``Retain`` claims outlive the set;
- status: replicas, readyReplicas, currentReplicas, updatedReplicas,
  availableReplicas, observedGeneration, current/updateRevision.

Garbage collector: deletes objects all of whose owners are gone (matched by
uid), deletes the dependents of an owner deleted in the foreground and then
drops its ``foregroundDeletion`` finalizer.

Volume controller: binds PVCs of an existing StorageClass (the default one
when none is named, also retroactively), reports ``FailedBinding`` /
``ProvisioningFailed`` otherwise, and implements PVC protection: a claim being
deleted keeps its ``kubernetes.io/pvc-protection`` finalizer while a scheduled
pod still uses it.
"""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING, Any, Final

from .kubelet import claim_names, qos_class
from .registry import FOREGROUND, PVC_PROTECTION
from .resources import PERSISTENTVOLUMECLAIMS, PODS, STATEFULSETS, STORAGECLASSES, ResourceType
from .revision import revision_label
from .selectors import labels_match, selector_from_object
from .status import ApiError, JsonObject

if TYPE_CHECKING:
    from .cluster import Cluster

STATEFULSET_CONTROLLER: Final = "statefulset-controller"
VOLUME_CONTROLLER: Final = "persistentvolume-controller"
REVISION_LABEL: Final = "controller-revision-hash"
POD_NAME_LABEL: Final = "statefulset.kubernetes.io/pod-name"
POD_INDEX_LABEL: Final = "apps.kubernetes.io/pod-index"


def _controller_uid(obj: JsonObject) -> str | None:
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid"))
    return None


def _ordinal(set_name: str, pod_name: str) -> int | None:
    prefix, _, suffix = pod_name.rpartition("-")
    if prefix != set_name or not suffix.isdigit():
        return None
    return int(suffix)


def is_running_and_ready(pod: JsonObject) -> bool:
    status = pod.get("status") or {}
    if status.get("phase") != "Running" or pod["metadata"].get("deletionTimestamp"):
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


def _owner_ref(sts: JsonObject, *, controller: bool) -> JsonObject:
    ref: JsonObject = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": sts["metadata"]["name"],
        "uid": sts["metadata"]["uid"],
    }
    if controller:
        ref["controller"] = True
        ref["blockOwnerDeletion"] = True
    return ref


class StatefulSetController:
    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        # The pods of the current pass by namespace (see sync).
        self._pods: dict[str, list[JsonObject]] = {}

    def sync(self) -> None:
        # Pods by namespace, uncopied: each set copies only the pods it may own (copying
        # every pod for every set made a pass quadratic in the number of sets).
        self._pods = {}
        for rt, obj in self._cluster.store.iter_all():
            if rt == PODS:
                self._pods.setdefault(obj["metadata"].get("namespace", ""), []).append(obj)
        for sts in self._cluster.store.list(STATEFULSETS):
            if not sts["metadata"].get("deletionTimestamp"):
                self._sync_one(sts)

    def _event(self, sts: JsonObject, kind: str, reason: str, message: str) -> None:
        self._cluster.events.record(
            STATEFULSETS,
            sts,
            type="Warning" if kind == "Warning" else "Normal",
            reason=reason,
            message=message,
            component=STATEFULSET_CONTROLLER,
        )

    def _sync_one(self, sts: JsonObject) -> None:
        registry = self._cluster.registry
        meta = sts["metadata"]
        spec = sts["spec"]
        namespace = meta["namespace"]
        name = meta["name"]
        uid = meta["uid"]
        selector = selector_from_object(spec.get("selector"))
        update_revision = revision_label(
            name,
            spec["template"],
            collision_count=int((sts.get("status") or {}).get("collisionCount") or 0),
        )

        pods: dict[int, JsonObject] = {}
        for seen in self._pods.get(namespace, []):
            if _controller_uid(seen) not in (None, uid):
                continue
            pod = self._cluster.store.get(PODS, namespace, seen["metadata"]["name"])
            if pod is None:
                continue
            owner = _controller_uid(pod)
            matches = labels_match(selector, pod["metadata"].get("labels"))
            if owner is None and matches and not pod["metadata"].get("deletionTimestamp"):
                # Adopt an orphan (e.g. left by an Orphan delete of an earlier set).
                pod["metadata"].setdefault("ownerReferences", []).append(
                    _owner_ref(sts, controller=True)
                )
                pod = registry.write_internal(PODS, pod)
                owner = uid
            if owner == uid and (ordinal := _ordinal(name, pod["metadata"]["name"])) is not None:
                pods[ordinal] = pod

        self._claim_owners(sts, set(pods))
        replicas = int(spec.get("replicas", 1))
        parallel = spec.get("podManagementPolicy") == "Parallel"

        for ordinal in range(replicas):
            existing = pods.get(ordinal)
            if existing is None:
                self._create_pod(sts, ordinal, update_revision)
                if not parallel:
                    break
                continue
            pod = existing
            if not (pod.get("spec") or {}).get("nodeName") and not pod["metadata"].get(
                "deletionTimestamp"
            ):
                self._ensure_claims(sts, ordinal)
            if not parallel and not is_running_and_ready(pod):
                break
        else:
            self._scale_down_or_roll(sts, pods, replicas, update_revision)

        self._update_status(sts, pods, update_revision)

    def _scale_down_or_roll(
        self, sts: JsonObject, pods: dict[int, JsonObject], replicas: int, update_revision: str
    ) -> None:
        registry = self._cluster.registry
        namespace = sts["metadata"]["namespace"]
        if any(p["metadata"].get("deletionTimestamp") for p in pods.values()):
            return
        extra = sorted((o for o in pods if o >= replicas), reverse=True)
        if extra:
            registry.delete_internal(PODS, namespace, pods[extra[0]]["metadata"]["name"])
            return
        policy = sts["spec"].get("persistentVolumeClaimRetentionPolicy") or {}
        if policy.get("whenScaled") == "Delete":
            self._delete_scaled_claims(sts, replicas)
        strategy = (sts["spec"].get("updateStrategy") or {}).get("type", "RollingUpdate")
        if strategy != "RollingUpdate":
            return
        outdated = sorted(
            (
                o
                for o, p in pods.items()
                if p["metadata"].get("labels", {}).get(REVISION_LABEL) != update_revision
            ),
            reverse=True,
        )
        if outdated and all(is_running_and_ready(p) for p in pods.values()):
            registry.delete_internal(PODS, namespace, pods[outdated[0]]["metadata"]["name"])

    def _claims_of(self, sts: JsonObject, ordinal: int) -> list[tuple[str, JsonObject]]:
        pod_name = f"{sts['metadata']['name']}-{ordinal}"
        return [
            (f"{template['metadata']['name']}-{pod_name}", template)
            for template in sts["spec"].get("volumeClaimTemplates") or []
        ]

    def _ensure_claims(self, sts: JsonObject, ordinal: int) -> bool:
        """Create the missing claims of one pod; False if one could not be created."""
        registry = self._cluster.registry
        meta = sts["metadata"]
        pod_name = f"{meta['name']}-{ordinal}"
        delete_with_set = (sts["spec"].get("persistentVolumeClaimRetentionPolicy") or {}).get(
            "whenDeleted"
        ) == "Delete"
        for claim_name, template in self._claims_of(sts, ordinal):
            if registry.find(PERSISTENTVOLUMECLAIMS, meta["namespace"], claim_name) is not None:
                continue
            template_meta = template.get("metadata") or {}
            labels = {
                **(template_meta.get("labels") or {}),
                **((sts["spec"].get("selector") or {}).get("matchLabels") or {}),
            }
            claim_meta: JsonObject = {
                "name": claim_name,
                "namespace": meta["namespace"],
                "labels": labels,
            }
            if template_meta.get("annotations"):
                claim_meta["annotations"] = copy.deepcopy(template_meta["annotations"])
            if delete_with_set:
                claim_meta["ownerReferences"] = [_owner_ref(sts, controller=False)]
            claim: JsonObject = {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": claim_meta,
                "spec": copy.deepcopy(template.get("spec") or {}),
            }
            try:
                registry.create_internal(PERSISTENTVOLUMECLAIMS, claim)
            except ApiError as exc:
                self._event(
                    sts,
                    "Warning",
                    "FailedCreate",
                    f"create Claim {claim_name} for Pod {pod_name} in StatefulSet {meta['name']} "
                    f"failed error: {exc.message}",
                )
                return False
            self._event(
                sts,
                "Normal",
                "SuccessfulCreate",
                f"create Claim {claim_name} Pod {pod_name} in StatefulSet {meta['name']} success",
            )
        return True

    def _create_pod(self, sts: JsonObject, ordinal: int, revision: str) -> None:
        registry = self._cluster.registry
        meta = sts["metadata"]
        spec = sts["spec"]
        pod_name = f"{meta['name']}-{ordinal}"
        if not self._ensure_claims(sts, ordinal):
            return

        template = copy.deepcopy(spec["template"])
        template_meta = template.get("metadata") or {}
        labels = {
            **(template_meta.get("labels") or {}),
            REVISION_LABEL: revision,
            POD_NAME_LABEL: pod_name,
            POD_INDEX_LABEL: str(ordinal),
        }
        pod_meta: JsonObject = {
            "name": pod_name,
            "namespace": meta["namespace"],
            "labels": labels,
            "ownerReferences": [_owner_ref(sts, controller=True)],
        }
        if template_meta.get("annotations"):
            pod_meta["annotations"] = template_meta["annotations"]
        pod_spec: JsonObject = template.get("spec") or {}
        pod_spec["hostname"] = pod_name
        if spec.get("serviceName"):
            pod_spec["subdomain"] = spec["serviceName"]
        volumes = [
            v
            for v in pod_spec.get("volumes") or []
            if v.get("name") not in self._template_names(sts)
        ]
        for claim_name, claim_template in self._claims_of(sts, ordinal):
            volumes.append(
                {
                    "name": claim_template["metadata"]["name"],
                    "persistentVolumeClaim": {"claimName": claim_name},
                }
            )
        if volumes:
            pod_spec["volumes"] = volumes
        pod: JsonObject = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": pod_meta,
            "spec": pod_spec,
            "status": {"phase": "Pending", "qosClass": qos_class(pod_spec)},
        }
        try:
            registry.create_internal(PODS, pod)
        except ApiError as exc:
            self._event(
                sts,
                "Warning",
                "FailedCreate",
                f"create Pod {pod_name} in StatefulSet {meta['name']} failed error: {exc.message}",
            )
            return
        self._event(
            sts,
            "Normal",
            "SuccessfulCreate",
            f"create Pod {pod_name} in StatefulSet {meta['name']} successful",
        )

    @staticmethod
    def _template_names(sts: JsonObject) -> set[str]:
        return {t["metadata"]["name"] for t in sts["spec"].get("volumeClaimTemplates") or []}

    def _claim_owners(self, sts: JsonObject, ordinals: set[int]) -> None:
        """Own the claims when ``whenDeleted: Delete``; disown them when the policy is Retain."""
        registry = self._cluster.registry
        meta = sts["metadata"]
        wanted = (sts["spec"].get("persistentVolumeClaimRetentionPolicy") or {}).get(
            "whenDeleted"
        ) == "Delete"
        replicas = int(sts["spec"].get("replicas", 1))
        for ordinal in ordinals | set(range(replicas)):
            for claim_name, _ in self._claims_of(sts, ordinal):
                claim = registry.find(PERSISTENTVOLUMECLAIMS, meta["namespace"], claim_name)
                if claim is None or claim["metadata"].get("deletionTimestamp"):
                    continue
                refs: list[JsonObject] = claim["metadata"].get("ownerReferences") or []
                has = any(r.get("uid") == meta["uid"] for r in refs)
                if wanted and not has:
                    refs.append(_owner_ref(sts, controller=False))
                elif not wanted and has:
                    refs = [r for r in refs if r.get("uid") != meta["uid"]]
                else:
                    continue
                if refs:
                    claim["metadata"]["ownerReferences"] = refs
                else:
                    claim["metadata"].pop("ownerReferences", None)
                registry.write_internal(PERSISTENTVOLUMECLAIMS, claim)

    def _delete_scaled_claims(self, sts: JsonObject, replicas: int) -> None:
        registry = self._cluster.registry
        namespace = sts["metadata"]["namespace"]
        prefixes = [f"{name}-{sts['metadata']['name']}-" for name in self._template_names(sts)]
        for claim in self._cluster.store.list(PERSISTENTVOLUMECLAIMS, namespace):
            claim_name = claim["metadata"]["name"]
            for prefix in prefixes:
                suffix = claim_name[len(prefix) :]
                if claim_name.startswith(prefix) and suffix.isdigit() and int(suffix) >= replicas:
                    if not claim["metadata"].get("deletionTimestamp"):
                        registry.delete_internal(PERSISTENTVOLUMECLAIMS, namespace, claim_name)

    def _update_status(
        self, sts: JsonObject, pods: dict[int, JsonObject], update_revision: str
    ) -> None:
        status: JsonObject = sts.get("status") or {}
        current_revision = status.get("currentRevision") or update_revision
        live = [p for p in pods.values() if not p["metadata"].get("deletionTimestamp")]
        revisions = [p["metadata"].get("labels", {}).get(REVISION_LABEL) for p in live]
        replicas = int(sts["spec"].get("replicas", 1))
        if len(live) == replicas and all(r == update_revision for r in revisions):
            current_revision = update_revision
        ready = sum(1 for p in pods.values() if is_running_and_ready(p))

        new_status: JsonObject = {
            "observedGeneration": sts["metadata"].get("generation", 1),
            "replicas": len(pods),
            "availableReplicas": ready,
            "currentRevision": current_revision,
            "updateRevision": update_revision,
            "collisionCount": int(status.get("collisionCount", 0)),
        }
        for field, value in (
            ("readyReplicas", ready),
            ("currentReplicas", sum(1 for r in revisions if r == current_revision)),
            ("updatedReplicas", sum(1 for r in revisions if r == update_revision)),
        ):
            if value:
                new_status[field] = value
        if new_status != status:
            sts["status"] = new_status
            self._cluster.registry.write_internal(STATEFULSETS, sts)


class GarbageCollector:
    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster

    def sync(self) -> None:
        registry = self._cluster.registry
        objects = list(self._cluster.store.iter_all())
        live: dict[str, JsonObject] = {obj["metadata"]["uid"]: obj for _, obj in objects}
        dependents: dict[str, int] = {}

        for rt, obj in objects:
            meta = obj["metadata"]
            refs = meta.get("ownerReferences") or []
            if not refs:
                continue
            for ref in refs:
                dependents[str(ref.get("uid"))] = dependents.get(str(ref.get("uid")), 0) + 1
            if meta.get("deletionTimestamp"):
                continue
            owners = [live.get(str(ref.get("uid"))) for ref in refs]
            orphaned = all(owner is None for owner in owners)
            in_foreground = any(
                owner is not None
                and owner["metadata"].get("deletionTimestamp")
                and FOREGROUND in (owner["metadata"].get("finalizers") or [])
                for owner in owners
            )
            if orphaned or in_foreground:
                self._delete(rt, meta)

        for rt, obj in objects:
            meta = obj["metadata"]
            finalizers = meta.get("finalizers") or []
            if (
                meta.get("deletionTimestamp")
                and FOREGROUND in finalizers
                and not dependents.get(meta["uid"])
            ):
                current = registry.find(rt, meta.get("namespace", ""), meta["name"])
                if current is not None:
                    current["metadata"]["finalizers"] = [f for f in finalizers if f != FOREGROUND]
                    registry.write_internal(rt, current)

    def _delete(self, rt: ResourceType, meta: JsonObject) -> None:
        try:
            self._cluster.registry.delete_internal(
                rt, meta.get("namespace", ""), meta["name"], policy="Background"
            )
        except ApiError as exc:
            if exc.code != 404:
                raise


class VolumeController:
    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self._first_seen: dict[str, float] = {}

    def _users(self, pvc: JsonObject, *, scheduled_only: bool) -> list[JsonObject]:
        namespace = pvc["metadata"]["namespace"]
        name = pvc["metadata"]["name"]
        return [
            pod
            for pod in self._cluster.store.list(PODS, namespace)
            if name in claim_names(pod)
            and (not scheduled_only or (pod.get("spec") or {}).get("nodeName"))
            and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
        ]

    def _event(
        self,
        pvc: JsonObject,
        kind: str,
        reason: str,
        message: str,
        component: str = VOLUME_CONTROLLER,
    ) -> None:
        self._cluster.events.record(
            PERSISTENTVOLUMECLAIMS,
            pvc,
            type="Warning" if kind == "Warning" else "Normal",
            reason=reason,
            message=message,
            component=component,
        )

    def sync(self) -> None:
        registry = self._cluster.registry
        now = time.monotonic()
        seen: set[str] = set()
        for pvc in self._cluster.store.list(PERSISTENTVOLUMECLAIMS):
            meta = pvc["metadata"]
            seen.add(meta["uid"])
            first_seen = self._first_seen.setdefault(meta["uid"], now)
            if meta.get("deletionTimestamp"):
                finalizers = meta.get("finalizers") or []
                if PVC_PROTECTION in finalizers and not self._users(pvc, scheduled_only=True):
                    meta["finalizers"] = [f for f in finalizers if f != PVC_PROTECTION]
                    registry.write_internal(PERSISTENTVOLUMECLAIMS, pvc)
                continue
            if (pvc.get("status") or {}).get("phase") == "Bound":
                continue
            self._bind(pvc, ready=now >= first_seen + self._cluster.timings.bind)
        for uid in [u for u in self._first_seen if u not in seen]:
            del self._first_seen[uid]

    def _bind(self, pvc: JsonObject, *, ready: bool) -> None:
        registry = self._cluster.registry
        spec: dict[str, Any] = pvc.setdefault("spec", {})
        class_name = spec.get("storageClassName")
        if class_name is None and (default := registry.default_storage_class()):
            # Retroactive default StorageClass assignment (GA in 1.28).
            spec["storageClassName"] = default
            registry.write_internal(PERSISTENTVOLUMECLAIMS, pvc)
            return
        if not class_name:
            self._event(
                pvc,
                "Normal",
                "FailedBinding",
                "no persistent volumes available for this claim and no storage class is set",
            )
            return
        sc = registry.find(STORAGECLASSES, "", class_name)
        if sc is None:
            self._event(
                pvc,
                "Warning",
                "ProvisioningFailed",
                f'storageclass.storage.k8s.io "{class_name}" not found',
            )
            return
        provisioner = str(sc.get("provisioner", "kube-double.local/provisioner"))
        if (failure := self._cluster.faults.provisioning_failure) is not None:
            self._event(pvc, "Warning", "ProvisioningFailed", failure, component=provisioner)
            return
        if sc.get("volumeBindingMode") == "WaitForFirstConsumer" and not self._users(
            pvc, scheduled_only=False
        ):
            self._event(
                pvc,
                "Normal",
                "WaitForFirstConsumer",
                "waiting for first consumer to be created before binding",
            )
            return
        if not ready:
            return
        volume = f"pvc-{pvc['metadata']['uid']}"
        annotations = pvc["metadata"].setdefault("annotations", {})
        annotations["pv.kubernetes.io/bind-completed"] = "yes"
        annotations["pv.kubernetes.io/bound-by-controller"] = "yes"
        annotations["volume.beta.kubernetes.io/storage-provisioner"] = provisioner
        annotations["volume.kubernetes.io/storage-provisioner"] = provisioner
        spec["volumeName"] = volume
        requests = (spec.get("resources") or {}).get("requests") or {}
        pvc["status"] = {
            "phase": "Bound",
            "accessModes": list(spec.get("accessModes") or []),
            "capacity": {"storage": requests.get("storage", "1Gi")},
        }
        stored = registry.write_internal(PERSISTENTVOLUMECLAIMS, pvc)
        self._event(
            stored,
            "Normal",
            "ProvisioningSucceeded",
            f"Successfully provisioned volume {volume}",
            component=provisioner,
        )
