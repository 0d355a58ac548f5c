"""API semantics on top of the store: what create, update, patch and delete mean.

Mirrors the real API server's generic registry: server-set metadata (uid,
creationTimestamp, generation, resourceVersion), admission (PVC protection
finalizer, default StorageClass, Service cluster IPs), defaulting,
validation, optimistic concurrency (409 on a stale resourceVersion),
finalizers and graceful deletion (``deletionTimestamp`` first, removal when
the last finalizer goes), and the three propagation policies.

Controllers use the ``*_internal`` methods: no RBAC, no immutability checks,
but objects they create (pods) are validated like any other, which is how a
too-long ``controller-revision-hash`` label makes pod creation fail (K01).
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import secrets
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, Final

import yaml

from . import defaults, patch, validation
from .resources import (
    NAMESPACES,
    PERSISTENTVOLUMECLAIMS,
    PODS,
    SERVICES,
    STATEFULSETS,
    STORAGECLASSES,
    ResourceType,
)
from .selectors import fields_match, labels_match, parse_field_selector, parse_label_selector
from .status import (
    MODIFIED_CONFLICT,
    ApiError,
    FieldError,
    JsonObject,
    already_exists,
    bad_request,
    conflict,
    expired,
    invalid,
    not_found,
    status_object,
    success_status,
    unsupported_media_type,
)
from .store import Store
from .timestamps import rfc3339

logger = logging.getLogger(__name__)

PVC_PROTECTION: Final = "kubernetes.io/pvc-protection"
FOREGROUND: Final = "foregroundDeletion"
ORPHAN: Final = "orphan"
DEFAULT_CLASS_ANNOTATION: Final = "storageclass.kubernetes.io/is-default-class"
_NAME_ALPHABET: Final = "bcdfghjklmnpqrstvwxz2456789"
_PROPAGATION: Final = ("Foreground", "Background", "Orphan")


def _ordered(obj: JsonObject) -> JsonObject:
    """kind, apiVersion, metadata first, as the real server serializes."""
    head: JsonObject = {k: obj[k] for k in ("kind", "apiVersion", "metadata") if k in obj}
    return {**head, **{k: v for k, v in obj.items() if k not in head}}


def _without_rv(obj: JsonObject) -> JsonObject:
    clone = copy.deepcopy(obj)
    clone.get("metadata", {}).pop("resourceVersion", None)
    return clone


def _encode_continue(resource_version: int, start: str) -> str:
    raw = json.dumps({"rv": resource_version, "start": start}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_continue(token: str) -> tuple[int, str]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        return int(data["rv"]), str(data["start"])
    except (ValueError, KeyError, TypeError) as exc:
        raise bad_request(f"continue key is not valid: {exc}") from exc


class Registry:
    """The verbs of the API, for the HTTP handlers and the controllers alike."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._next_cluster_ip = 10

    # --- reads ---------------------------------------------------------------------------

    def get(self, rt: ResourceType, namespace: str, name: str) -> JsonObject:
        obj = self.store.get(rt, namespace, name)
        if obj is None:
            raise not_found(rt.plural, rt.group, name)
        return obj

    def find(self, rt: ResourceType, namespace: str, name: str) -> JsonObject | None:
        return self.store.get(rt, namespace, name)

    def list(
        self,
        rt: ResourceType,
        namespace: str | None,
        *,
        label_selector: str = "",
        field_selector: str = "",
        limit: int | None = None,
        continue_token: str | None = None,
        resource_version: str | None = None,
        resource_version_match: str | None = None,
    ) -> JsonObject:
        """A ``{Kind}List`` at the current resourceVersion (no historical snapshots)."""
        labels = parse_label_selector(label_selector)
        fields = parse_field_selector(field_selector, rt.field_labels)
        if resource_version_match == "Exact" and resource_version:
            try:
                self.store.check_watchable(int(resource_version))
            except ApiError as exc:
                raise expired("The resourceVersion for the provided list is too old.") from exc

        items = [
            obj
            for obj in self.store.list(rt, namespace)
            if labels_match(labels, obj["metadata"].get("labels")) and fields_match(fields, obj)
        ]
        start = ""
        if continue_token:
            token_rv, start = _decode_continue(continue_token)
            try:
                self.store.check_watchable(token_rv)
            except ApiError as exc:
                raise expired(
                    "The provided continue parameter is too old to display a consistent list "
                    "result. You can start a new list without the continue parameter, or use the "
                    "continue token in this response to retrieve the remainder of the results. "
                    "Continuing with the provided token results in an inconsistent list - objects "
                    "that were created, modified, or deleted between the time the first chunk "
                    "was returned and now may show up in the list."
                ) from exc
            items = [
                obj
                for obj in items
                if f"{obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}" > start
            ]

        meta: JsonObject = {"resourceVersion": str(self.store.resource_version)}
        if limit is not None and limit > 0 and len(items) > limit:
            last = items[limit - 1]["metadata"]
            meta["continue"] = _encode_continue(
                self.store.resource_version, f"{last.get('namespace', '')}/{last['name']}"
            )
            meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        for item in items:
            # Items of a typed list carry no kind/apiVersion on the wire.
            item.pop("kind", None)
            item.pop("apiVersion", None)
        return {
            "kind": rt.list_kind,
            "apiVersion": rt.api_version,
            "metadata": meta,
            "items": items,
        }

    # --- body handling -------------------------------------------------------------------

    def _prepare(self, rt: ResourceType, namespace: str, body: Any) -> JsonObject:
        if not isinstance(body, dict):
            raise bad_request(
                f"couldn't get version/kind; json parse error: cannot unmarshal "
                f"{type(body).__name__} into Go value of type struct"
            )
        obj = copy.deepcopy(body)
        api_version = obj.get("apiVersion") or rt.api_version
        kind = obj.get("kind") or rt.kind
        if api_version != rt.api_version or kind != rt.kind:
            raise bad_request(
                f"the API version in the data ({api_version}) does not match the expected API "
                f"version ({rt.api_version})"
                if api_version != rt.api_version
                else f'{kind} in version "{rt.version}" cannot be handled as a {rt.kind}: '
                f"the kind in the data ({kind}) does not match the expected kind ({rt.kind})"
            )
        obj["apiVersion"] = api_version
        obj["kind"] = kind
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise bad_request(
                f'{rt.kind} in version "{rt.version}" cannot be handled as a {rt.kind}'
            )
        if rt.namespaced:
            if meta.get("namespace") and meta["namespace"] != namespace:
                raise bad_request(
                    "the namespace of the provided object does not match the namespace sent on "
                    "the request"
                )
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        return obj

    def _require_namespace(self, rt: ResourceType, namespace: str) -> None:
        if rt.namespaced and self.store.get(NAMESPACES, "", namespace) is None:
            raise not_found("namespaces", "", namespace)

    # --- create --------------------------------------------------------------------------

    def create(
        self, rt: ResourceType, namespace: str, body: Any, *, dry_run: bool = False
    ) -> JsonObject:
        """POST: 201 with the stored object; 409 AlreadyExists, 422 Invalid, 404 namespace."""
        obj = self._prepare(rt, namespace, body)
        self._require_namespace(rt, namespace)
        return self._create(rt, obj, dry_run=dry_run)

    def create_internal(self, rt: ResourceType, obj: JsonObject) -> JsonObject:
        """A controller creates ``obj``; validated like a client's (raises ApiError)."""
        namespace = obj.get("metadata", {}).get("namespace", "")
        return self._create(rt, self._prepare(rt, namespace, obj), dry_run=False)

    def _create(self, rt: ResourceType, obj: JsonObject, *, dry_run: bool) -> JsonObject:
        meta = obj["metadata"]
        validation.check_decodable(rt, obj)
        if meta.get("resourceVersion"):
            raise bad_request("resourceVersion should not be set on objects to be created")
        if not meta.get("name") and meta.get("generateName"):
            suffix = "".join(secrets.choice(_NAME_ALPHABET) for _ in range(5))
            meta["name"] = f"{meta['generateName']}{suffix}"
        for field in ("uid", "deletionTimestamp", "deletionGracePeriodSeconds", "managedFields"):
            meta.pop(field, None)
        meta["creationTimestamp"] = rfc3339()
        if rt.tracks_generation:
            meta["generation"] = 1
        if rt is STATEFULSETS:
            obj["status"] = {"replicas": 0, "availableReplicas": 0}
        elif rt.has_status and rt is not PODS:
            obj.pop("status", None)

        self._admit_create(rt, obj)
        defaults.apply_defaults(rt, obj)
        validation.validate(rt, obj)

        if self.store.get(rt, meta.get("namespace", ""), meta["name"]) is not None:
            raise already_exists(rt.plural, rt.group, meta["name"])
        meta["uid"] = str(uuid.uuid4())
        obj = _ordered(obj)
        if dry_run:
            return obj
        return self.store.insert(rt, obj)

    def _admit_create(self, rt: ResourceType, obj: JsonObject) -> None:
        meta = obj["metadata"]
        spec = obj.setdefault("spec", {}) if rt in (PERSISTENTVOLUMECLAIMS, SERVICES) else None
        if rt is PERSISTENTVOLUMECLAIMS and spec is not None:
            finalizers = meta.setdefault("finalizers", [])
            if PVC_PROTECTION not in finalizers:
                finalizers.append(PVC_PROTECTION)
            if "storageClassName" not in spec and (default := self.default_storage_class()):
                spec["storageClassName"] = default
        if rt is SERVICES and spec is not None:
            if spec.get("type", "ClusterIP") != "ExternalName":
                if not spec.get("clusterIP"):
                    spec["clusterIP"] = self._allocate_cluster_ip()
                spec.setdefault("clusterIPs", [spec["clusterIP"]])
                spec.setdefault("ipFamilies", ["IPv4"])
                spec.setdefault("ipFamilyPolicy", "SingleStack")

    def _allocate_cluster_ip(self) -> str:
        self._next_cluster_ip += 1
        number = self._next_cluster_ip
        return f"10.96.{number // 250}.{number % 250 + 1}"

    def default_storage_class(self) -> str | None:
        for sc in self.store.list(STORAGECLASSES):
            annotations = sc["metadata"].get("annotations") or {}
            if annotations.get(DEFAULT_CLASS_ANNOTATION) == "true":
                return str(sc["metadata"]["name"])
        return None

    # --- update and patch ----------------------------------------------------------------

    def update(
        self, rt: ResourceType, namespace: str, name: str, body: Any, *, dry_run: bool = False
    ) -> JsonObject:
        """PUT: 200 with the stored object; 409 on a stale resourceVersion; 404 if missing."""
        obj = self._prepare(rt, namespace, body)
        meta = obj["metadata"]
        if not meta.get("name"):
            meta["name"] = name
        elif meta["name"] != name:
            raise bad_request(
                f"the name of the object ({meta['name']}) does not match the name on the URL "
                f"({name})"
            )
        old = self.get(rt, namespace, name)
        return self._update(rt, old, obj, dry_run=dry_run)

    def _update(
        self, rt: ResourceType, old: JsonObject, obj: JsonObject, *, dry_run: bool
    ) -> JsonObject:
        meta = obj["metadata"]
        old_meta = old["metadata"]
        validation.check_decodable(rt, obj)
        wanted_rv = meta.get("resourceVersion")
        if wanted_rv and wanted_rv != old_meta["resourceVersion"]:
            raise conflict(rt.plural, rt.group, old_meta["name"], MODIFIED_CONFLICT)
        if meta.get("uid") and meta["uid"] != old_meta["uid"]:
            raise conflict(
                rt.plural,
                rt.group,
                old_meta["name"],
                f"Precondition failed: UID in precondition: {meta['uid']}, "
                f"UID in object meta: {old_meta['uid']}",
            )
        for field in (
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
        ):
            if field in old_meta:
                meta[field] = old_meta[field]
            else:
                meta.pop(field, None)
        meta["resourceVersion"] = old_meta["resourceVersion"]
        if rt.has_status:
            if "status" in old:
                obj["status"] = copy.deepcopy(old["status"])
            else:
                obj.pop("status", None)
        if rt is SERVICES:
            old_spec = old.get("spec") or {}
            spec = obj.setdefault("spec", {})
            for field in ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"):
                if field in old_spec and not spec.get(field):
                    spec[field] = copy.deepcopy(old_spec[field])

        defaults.apply_defaults(rt, obj)
        validation.validate(rt, obj, old=old)
        if rt.tracks_generation and obj.get("spec") != old.get("spec"):
            meta["generation"] = int(old_meta.get("generation", 1)) + 1
        obj = _ordered(obj)
        if _without_rv(obj) == _without_rv(old) or dry_run:
            # The real server skips no-op writes: same resourceVersion, no watch event.
            return obj if dry_run else old
        return self._write(rt, obj)

    def _write(self, rt: ResourceType, obj: JsonObject) -> JsonObject:
        """Store ``obj``; an object being deleted whose last finalizer went is removed."""
        meta = obj["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            stored = self.store.get(rt, meta.get("namespace", ""), meta["name"])
            if stored is not None and rt is not PODS:
                self.store.replace(rt, obj)
                return self.store.remove(rt, meta.get("namespace", ""), meta["name"])
        return self.store.replace(rt, obj)

    def patch(
        self,
        rt: ResourceType,
        namespace: str,
        name: str,
        raw: bytes,
        *,
        content_type: str,
        field_manager: str | None = None,
        dry_run: bool = False,
    ) -> tuple[JsonObject, bool]:
        """PATCH in any of the four formats; returns (object, created). Apply may create."""
        media = content_type.split(";", 1)[0].strip().lower()
        if media not in patch.PATCH_TYPES:
            raise unsupported_media_type(media, patch.PATCH_TYPES)
        try:
            document: Any = (
                yaml.safe_load(raw.decode()) if media == patch.APPLY_PATCH_YAML else json.loads(raw)
            )
        except (ValueError, yaml.YAMLError) as exc:
            raise bad_request(f"error decoding patch: {exc}") from exc

        if media == patch.APPLY_PATCH_YAML:
            if not field_manager:
                raise ApiError(
                    status_object(
                        422,
                        "Invalid",
                        'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: '
                        "is required for apply patch",
                    )
                )
            old_or_none = self.find(rt, namespace, name)
            if old_or_none is None:
                body = self._prepare(rt, namespace, document)
                body["metadata"].setdefault("name", name)
                self._require_namespace(rt, namespace)
                return self._create(rt, body, dry_run=dry_run), True
            patched = patch.strategic_merge_patch(old_or_none, document)
            return self._update(
                rt, old_or_none, self._prepare(rt, namespace, patched), dry_run=dry_run
            ), False

        old = self.get(rt, namespace, name)
        if media == patch.JSON_PATCH:
            result = patch.json_patch(old, document)
        elif not isinstance(document, dict):
            raise bad_request(
                "json: cannot unmarshal array into Go value of type map[string]interface {}"
            )
        elif media == patch.MERGE_PATCH:
            result = patch.merge_patch(old, document)
        else:
            result = patch.strategic_merge_patch(old, document)
        obj = self._prepare(rt, namespace, result)
        if obj["metadata"].get("name") != name:
            raise bad_request("metadata.name: Invalid value: the name in the patch does not match")
        return self._update(rt, old, obj, dry_run=dry_run), False

    # --- delete --------------------------------------------------------------------------

    def delete(
        self,
        rt: ResourceType,
        namespace: str,
        name: str,
        options: Mapping[str, Any] | None = None,
        *,
        dry_run: bool = False,
    ) -> JsonObject:
        """DELETE: the object (pods, services, PVCs, or anything still being finalized)
        or a Success Status. Pods go away gracefully; PVCs wait for their finalizer."""
        options = options or {}
        old = self.get(rt, namespace, name)
        meta = old["metadata"]

        preconditions = options.get("preconditions") or {}
        if (uid := preconditions.get("uid")) and uid != meta["uid"]:
            raise conflict(
                rt.plural,
                rt.group,
                name,
                f"Precondition failed: UID in precondition: {uid}, "
                f"UID in object meta: {meta['uid']}",
            )
        if (rv := preconditions.get("resourceVersion")) and rv != meta["resourceVersion"]:
            raise conflict(
                rt.plural,
                rt.group,
                name,
                f"Precondition failed: ResourceVersion in precondition: {rv}, "
                f"ResourceVersion in meta: {meta['resourceVersion']}",
            )
        policy = options.get("propagationPolicy")
        if policy is None and options.get("orphanDependents") is not None:
            policy = "Orphan" if options["orphanDependents"] else "Background"
        if policy is not None and policy not in _PROPAGATION:
            raise invalid(
                "DeleteOptions",
                "meta.k8s.io",
                "",
                [FieldError.not_supported("propagationPolicy", policy, [*_PROPAGATION, "nil"])],
            )
        grace = options.get("gracePeriodSeconds")
        if grace is not None and grace < 0:
            grace = 0
        if dry_run:
            return old if rt.returns_deleted_object else self._success(rt, old)
        return self.delete_internal(rt, namespace, name, policy=policy, grace=grace)

    def delete_internal(
        self,
        rt: ResourceType,
        namespace: str,
        name: str,
        *,
        policy: str | None = None,
        grace: int | None = None,
    ) -> JsonObject:
        """Delete as a controller or the garbage collector would; see :meth:`delete`."""
        old = self.get(rt, namespace, name)
        meta = old["metadata"]
        finalizers: list[str] = list(meta.get("finalizers") or [])

        if meta.get("deletionTimestamp"):
            if rt is PODS and grace == 0:
                return self.remove_now(rt, namespace, name) or old
            return old
        if policy == "Orphan":
            self.orphan_dependents(meta["uid"])
        elif policy == "Foreground" and FOREGROUND not in finalizers:
            finalizers.append(FOREGROUND)
            meta["finalizers"] = finalizers

        if rt is PODS:
            if grace is None:
                grace = int((old.get("spec") or {}).get("terminationGracePeriodSeconds", 30))
            if not (old.get("spec") or {}).get("nodeName"):
                grace = 0
            if grace > 0 or finalizers:
                meta["deletionTimestamp"] = rfc3339(time.time() + grace)
                meta["deletionGracePeriodSeconds"] = grace
                return self.store.replace(rt, old)
        elif finalizers:
            meta["deletionTimestamp"] = rfc3339()
            meta["deletionGracePeriodSeconds"] = 0
            return self.store.replace(rt, old)

        final = self.store.remove(rt, namespace, name)
        return final if rt.returns_deleted_object else self._success(rt, final)

    @staticmethod
    def _success(rt: ResourceType, obj: JsonObject) -> JsonObject:
        meta = obj["metadata"]
        return success_status(name=meta["name"], group=rt.group, kind=rt.plural, uid=meta["uid"])

    def remove_now(self, rt: ResourceType, namespace: str, name: str) -> JsonObject | None:
        """Remove regardless of finalizers and grace (the kubelet's final delete)."""
        if self.store.get(rt, namespace, name) is None:
            return None
        return self.store.remove(rt, namespace, name)

    def orphan_dependents(self, owner_uid: str) -> None:
        for rt, obj in list(self.iter_dependents(owner_uid)):
            clone = copy.deepcopy(obj)
            refs = [r for r in clone["metadata"]["ownerReferences"] if r.get("uid") != owner_uid]
            if refs:
                clone["metadata"]["ownerReferences"] = refs
            else:
                clone["metadata"].pop("ownerReferences")
            self.store.replace(rt, clone)

    def iter_dependents(self, owner_uid: str) -> Iterator[tuple[ResourceType, JsonObject]]:
        for rt, obj in self.store.iter_all():
            refs = obj["metadata"].get("ownerReferences") or []
            if any(ref.get("uid") == owner_uid for ref in refs):
                yield rt, obj

    # --- internal writes -----------------------------------------------------------------

    def write_internal(
        self, rt: ResourceType, obj: JsonObject, *, check_schema: bool = True
    ) -> JsonObject:
        """Store a controller's change to an existing object (status, finalizers, binding).

        Skipped when nothing changed. The schema check catches bugs of the double itself.
        """
        meta = obj["metadata"]
        current = self.store.get(rt, meta.get("namespace", ""), meta["name"])
        if current is None:
            raise not_found(rt.plural, rt.group, meta["name"])
        if _without_rv(current) == _without_rv(obj):
            return current
        if check_schema and (errors := validation.schema_errors(obj)):
            raise invalid(rt.kind, rt.group, meta["name"], errors)
        obj["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        return self._write(rt, obj)
