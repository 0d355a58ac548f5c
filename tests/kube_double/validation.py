"""Admission checks of received objects, in the order the real API server runs them.

1. Decoding: quantities are parsed while the body is decoded, so a malformed
   one (``cpu: 12xyz``) is 400 BadRequest "... cannot be handled as a ...".
2. The OpenAPI schema of the served Kubernetes version, through the
   ``kubernetes-validate`` package in strict mode (unknown fields rejected).
   The real server (fieldValidation=Warn, the default) would drop an unknown
   field with a warning header; the double rejects it with 422 on purpose, so
   a typo in a driver's object shows up in tests instead of vanishing.
3. The rules the schema does not hold (names, labels, enums, cross-field
   rules, immutable fields), with the real messages, as 422 Invalid.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any, Final

import jsonschema
import kubernetes_validate
from kubernetes_validate.utils import schema_contents
from referencing import Registry, Resource

from . import names
from .quantity import QuantityError, parse_quantity
from .resources import (
    CONFIGMAPS,
    PERSISTENTVOLUMECLAIMS,
    PODS,
    SERVICES,
    STATEFULSETS,
    NameRule,
    ResourceType,
)
from .selectors import labels_match, selector_from_object
from .status import FieldError, JsonObject, bad_request, invalid

SCHEMA_VERSION: Final = kubernetes_validate.latest_version()

_STANDARD_RESOURCES: Final = frozenset({"cpu", "memory", "ephemeral-storage", "storage"})
_STANDARD_FINALIZERS: Final = frozenset({"kubernetes", "orphan", "foregroundDeletion"})
_ACCESS_MODES: Final = ("ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod")
_CONFIG_KEY: Final = re.compile(r"[-._a-zA-Z0-9]+")
_IANA_SVC_NAME: Final = re.compile(r"[-a-z0-9]+")
CONFIGMAP_SIZE_LIMIT: Final = 1024 * 1024
_ENV_NAME_MSG: Final = (
    "a valid environment variable name must consist only of printable ASCII characters "
    "other than '='"
)
_CONFIG_KEY_MSG: Final = (
    "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. "
    "'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')"
)

_STS_MUTABLE_SPEC: Final = frozenset(
    {
        "replicas",
        "ordinals",
        "template",
        "updateStrategy",
        "revisionHistoryLimit",
        "persistentVolumeClaimRetentionPolicy",
        "minReadySeconds",
    }
)


def field_path(parts: Iterable[object]) -> str:
    """``spec.template.spec.containers[0].image`` from a JSON path."""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


# --- 1. decoding ----------------------------------------------------------------------


def _quantity_maps(obj: Any) -> Iterable[Mapping[str, Any]]:
    """Every map whose values are quantities (resources requests/limits, sizeLimit, ...)."""
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if key == "resources" and isinstance(value, Mapping):
                for part in ("requests", "limits"):
                    if isinstance(value.get(part), Mapping):
                        yield value[part]
            if key in ("capacity", "allocatable", "overhead", "hard") and isinstance(
                value, Mapping
            ):
                yield value
            if key == "emptyDir" and isinstance(value, Mapping) and "sizeLimit" in value:
                yield {"sizeLimit": value["sizeLimit"]}
            yield from _quantity_maps(value)
    elif isinstance(obj, list):
        for item in obj:
            yield from _quantity_maps(item)


def check_decodable(rt: ResourceType, obj: JsonObject) -> None:
    """Raise 400 BadRequest for what the real server fails to decode."""
    for quantities in _quantity_maps(obj):
        for value in quantities.values():
            try:
                parse_quantity(value)
            except QuantityError as exc:
                raise bad_request(
                    f'{rt.kind} in version "{rt.version}" cannot be handled as a {rt.kind}: {exc}'
                ) from exc


# --- 2. schema ------------------------------------------------------------------------


def schema_errors(obj: JsonObject) -> list[FieldError]:
    """The first error of ``obj`` against the bundled OpenAPI schema (strict), if any."""
    try:
        _schema_validator(str(obj["kind"]), str(obj["apiVersion"])).validate(obj)
    except jsonschema.ValidationError as exc:
        return [_from_schema_error(exc)]
    return []


_SCHEMA_FOLDER: Final = f"kubernetes-json-schema/v{SCHEMA_VERSION}-local-strict"


@functools.cache
def _schema_definitions() -> Resource[Any]:
    return Resource.from_contents(
        schema_contents(f"{_SCHEMA_FOLDER}/_definitions.json", SCHEMA_VERSION)
    )


@functools.cache
def _schema_validator(kind: str, api_version: str) -> Any:
    """What ``kubernetes_validate.validate(obj, SCHEMA_VERSION, strict=True)`` validates
    with (same files, same validator class), built once per kind.

    ``validate`` itself parses the whole bundled definitions file on every call,
    which made the double spend most of its time there under load (the fault
    suite's hundreds of concurrent creates).
    """
    # apps/v1 -> apps-v1, rbac.authorization.k8s.io/v1 -> rbac-v1 (kubernetes_validate's names).
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    schema = schema_contents(
        f"{_SCHEMA_FOLDER}/{kind.lower()}-{group_version}.json", SCHEMA_VERSION
    )
    registry = _schema_definitions() @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _from_schema_error(exc: jsonschema.ValidationError) -> FieldError:
    path = list(exc.path)
    here = field_path(path)
    if exc.validator == "required" and isinstance(exc.instance, Mapping):
        missing = [p for p in exc.validator_value if p not in exc.instance]
        return FieldError.required(field_path([*path, missing[0] if missing else "?"]))
    if exc.validator == "additionalProperties" and isinstance(exc.instance, Mapping):
        allowed = set((exc.schema or {}).get("properties", {}))
        extra = sorted(k for k in exc.instance if k not in allowed) or ["?"]
        unknown = field_path([*path, extra[0]])
        return FieldError.forbidden(unknown, f'unknown field "{unknown}"')
    return FieldError.invalid(here, exc.instance, exc.message)


# --- 3. rules -------------------------------------------------------------------------


def meta_errors(
    rt: ResourceType, meta: Mapping[str, Any], *, path: str = "metadata"
) -> list[FieldError]:
    errors: list[FieldError] = []
    name = meta.get("name") or ""
    generate_name = meta.get("generateName") or ""
    if not name and not generate_name:
        errors.append(FieldError.required(f"{path}.name", "name or generateName is required"))
    elif name:
        errors += [
            FieldError.invalid(f"{path}.name", name, m)
            for m in names.name_messages(rt.name_rule, name)
        ]
    else:
        # A prefix may end with a dash; check it as if a suffix followed.
        probe = generate_name + "x" if rt.name_rule is not NameRule.PATH_SEGMENT else generate_name
        errors += [
            FieldError.invalid(f"{path}.generateName", generate_name, m)
            for m in names.name_messages(rt.name_rule, probe)
        ]
    errors += names.labels_errors(meta.get("labels"), f"{path}.labels")
    errors += names.annotations_errors(meta.get("annotations"), f"{path}.annotations")

    for index, finalizer in enumerate(meta.get("finalizers") or []):
        if "/" not in finalizer and finalizer not in _STANDARD_FINALIZERS:
            errors.append(
                FieldError.invalid(
                    f"{path}.finalizers[{index}]",
                    finalizer,
                    "name is neither a standard finalizer name nor is it fully qualified",
                )
            )
    owners = meta.get("ownerReferences") or []
    if sum(1 for ref in owners if ref.get("controller")) > 1:
        errors.append(
            FieldError.invalid(
                f"{path}.ownerReferences",
                owners,
                "Only one reference can have Controller set to true",
            )
        )
    return errors


def _port_name_messages(name: str) -> list[str]:
    messages = []
    if len(name) > 15:
        messages.append("must be no more than 15 characters")
    if not _IANA_SVC_NAME.fullmatch(name):
        messages.append("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)")
    if not re.search(r"[a-z]", name):
        messages.append("must contain at least one letter (a-z)")
    if "--" in name:
        messages.append("must not contain consecutive hyphens")
    if name.startswith("-") or name.endswith("-"):
        messages.append("must not begin or end with a hyphen")
    return messages


def _resource_errors(container: Mapping[str, Any], path: str) -> list[FieldError]:
    errors: list[FieldError] = []
    resources = container.get("resources") or {}
    values: dict[str, dict[str, Decimal]] = {}
    for part in ("requests", "limits"):
        values[part] = {}
        for name, raw in (resources.get(part) or {}).items():
            where = f"{path}.resources.{part}[{name}]"
            if (
                name not in _STANDARD_RESOURCES
                and "/" not in name
                and not name.startswith("hugepages-")
            ):
                errors.append(
                    FieldError.invalid(
                        where, name, "must be a standard resource type or fully qualified"
                    )
                )
            quantity = parse_quantity(raw)
            if quantity < 0:
                errors.append(FieldError.invalid(where, raw, "must be greater than or equal to 0"))
            values[part][name] = quantity
    for name, request in values["requests"].items():
        limit = values["limits"].get(name)
        if limit is not None and request > limit:
            errors.append(
                FieldError.invalid(
                    f"{path}.resources.requests",
                    str(resources["requests"][name]),
                    f"must be less than or equal to {name} limit of {resources['limits'][name]}",
                )
            )
    return errors


def pod_spec_errors(
    spec: Mapping[str, Any],
    path: str,
    *,
    claim_names: Sequence[str] = (),
    in_template: bool = False,
) -> list[FieldError]:
    errors: list[FieldError] = []
    volumes = spec.get("volumes") or []
    volume_names: list[str] = []
    for index, volume in enumerate(volumes):
        name = volume.get("name", "")
        where = f"{path}.volumes[{index}].name"
        errors += [FieldError.invalid(where, name, m) for m in names.dns1123_label_messages(name)]
        if name in volume_names:
            errors.append(FieldError.duplicate(where, name))
        volume_names.append(name)
    mountable = set(volume_names) | set(claim_names)

    containers = spec.get("containers") or []
    if not containers:
        errors.append(FieldError.required(f"{path}.containers"))
    seen: set[str] = set()
    for field in ("initContainers", "containers"):
        for index, container in enumerate(spec.get(field) or []):
            where = f"{path}.{field}[{index}]"
            name = container.get("name", "")
            errors += [
                FieldError.invalid(f"{where}.name", name, m)
                for m in names.dns1123_label_messages(name)
            ]
            if name in seen:
                errors.append(FieldError.duplicate(f"{where}.name", name))
            seen.add(name)
            if not container.get("image"):
                errors.append(FieldError.required(f"{where}.image"))
            port_names: set[str] = set()
            for p_index, port in enumerate(container.get("ports") or []):
                p_where = f"{where}.ports[{p_index}]"
                number = port.get("containerPort", 0)
                if not 1 <= number <= 65535:
                    errors.append(
                        FieldError.invalid(
                            f"{p_where}.containerPort",
                            number,
                            "must be between 1 and 65535, inclusive",
                        )
                    )
                if port_name := port.get("name"):
                    errors += [
                        FieldError.invalid(f"{p_where}.name", port_name, m)
                        for m in _port_name_messages(port_name)
                    ]
                    if port_name in port_names:
                        errors.append(FieldError.duplicate(f"{p_where}.name", port_name))
                    port_names.add(port_name)
                protocol = port.get("protocol", "TCP")
                if protocol not in ("TCP", "UDP", "SCTP"):
                    errors.append(
                        FieldError.not_supported(
                            f"{p_where}.protocol", protocol, ["SCTP", "TCP", "UDP"]
                        )
                    )
            for e_index, env in enumerate(container.get("env") or []):
                env_name = env.get("name", "")
                if (
                    not env_name
                    or "=" in env_name
                    or not env_name.isprintable()
                    or not env_name.isascii()
                ):
                    errors.append(
                        FieldError.invalid(
                            f"{where}.env[{e_index}].name",
                            env_name,
                            _ENV_NAME_MSG,
                        )
                    )
            for m_index, mount in enumerate(container.get("volumeMounts") or []):
                if mount.get("name") not in mountable:
                    errors.append(
                        FieldError.not_found(
                            f"{where}.volumeMounts[{m_index}].name", mount.get("name")
                        )
                    )
            policy = container.get("imagePullPolicy", "IfNotPresent")
            if policy not in ("Always", "IfNotPresent", "Never"):
                errors.append(
                    FieldError.not_supported(
                        f"{where}.imagePullPolicy", policy, ["Always", "IfNotPresent", "Never"]
                    )
                )
            errors += _resource_errors(container, where)

    restart = spec.get("restartPolicy", "Always")
    allowed = ["Always"] if in_template else ["Always", "OnFailure", "Never"]
    if restart not in allowed:
        errors.append(FieldError.not_supported(f"{path}.restartPolicy", restart, allowed))
    for field in ("hostname", "subdomain"):
        if value := spec.get(field):
            errors += [
                FieldError.invalid(f"{path}.{field}", value, m)
                for m in names.dns1123_label_messages(value)
            ]
    return errors


def _claim_spec_errors(spec: Mapping[str, Any], path: str) -> list[FieldError]:
    errors: list[FieldError] = []
    modes = spec.get("accessModes") or []
    if not modes:
        errors.append(
            FieldError.required(f"{path}.accessModes", "at least 1 access mode is required")
        )
    for mode in modes:
        if mode not in _ACCESS_MODES:
            errors.append(FieldError.not_supported(f"{path}.accessModes", mode, _ACCESS_MODES))
    requests = (spec.get("resources") or {}).get("requests") or {}
    if "storage" not in requests:
        errors.append(FieldError.required(f"{path}.resources[storage]"))
    elif parse_quantity(requests["storage"]) <= 0:
        errors.append(
            FieldError.invalid(
                f"{path}.resources[storage]", requests["storage"], "must be greater than zero"
            )
        )
    mode = spec.get("volumeMode", "Filesystem")
    if mode not in ("Block", "Filesystem"):
        errors.append(FieldError.not_supported(f"{path}.volumeMode", mode, ["Block", "Filesystem"]))
    return errors


def _statefulset_errors(obj: JsonObject) -> list[FieldError]:
    spec = obj.get("spec") or {}
    errors: list[FieldError] = []
    replicas = spec.get("replicas", 1)
    if replicas < 0:
        errors.append(
            FieldError.invalid("spec.replicas", replicas, "must be greater than or equal to 0")
        )
    if (ready := spec.get("minReadySeconds", 0)) < 0:
        errors.append(
            FieldError.invalid("spec.minReadySeconds", ready, "must be greater than or equal to 0")
        )
    policy = spec.get("podManagementPolicy", "OrderedReady")
    if policy not in ("OrderedReady", "Parallel"):
        errors.append(
            FieldError.not_supported(
                "spec.podManagementPolicy", policy, ["OrderedReady", "Parallel"]
            )
        )
    strategy = (spec.get("updateStrategy") or {}).get("type", "RollingUpdate")
    if strategy not in ("RollingUpdate", "OnDelete"):
        errors.append(
            FieldError.not_supported(
                "spec.updateStrategy.type", strategy, ["OnDelete", "RollingUpdate"]
            )
        )
    retention = spec.get("persistentVolumeClaimRetentionPolicy") or {}
    for field in ("whenDeleted", "whenScaled"):
        value = retention.get(field, "Retain")
        if value not in ("Retain", "Delete"):
            errors.append(
                FieldError.not_supported(
                    f"spec.persistentVolumeClaimRetentionPolicy.{field}",
                    value,
                    ["Retain", "Delete"],
                )
            )
    if service_name := spec.get("serviceName"):
        errors += [
            FieldError.invalid("spec.serviceName", service_name, m)
            for m in names.dns1123_label_messages(service_name)
        ]

    selector = spec.get("selector")
    template = spec.get("template") or {}
    template_meta = template.get("metadata") or {}
    template_labels = template_meta.get("labels") or {}
    if not selector or not (selector.get("matchLabels") or selector.get("matchExpressions")):
        errors.append(
            FieldError.invalid(
                "spec.selector", selector or {}, "empty selector is invalid for statefulset"
            )
        )
    elif not labels_match(selector_from_object(selector), template_labels):
        errors.append(
            FieldError.invalid(
                "spec.template.metadata.labels",
                template_labels,
                "`selector` does not match template `labels`",
            )
        )
    errors += names.labels_errors(template_meta.get("labels"), "spec.template.metadata.labels")
    errors += names.annotations_errors(
        template_meta.get("annotations"), "spec.template.metadata.annotations"
    )

    claim_names: list[str] = []
    for index, claim in enumerate(spec.get("volumeClaimTemplates") or []):
        where = f"spec.volumeClaimTemplates[{index}]"
        claim_meta = claim.get("metadata") or {}
        claim_name = claim_meta.get("name", "")
        if not claim_name:
            errors.append(
                FieldError.required(f"{where}.metadata.name", "name or generateName is required")
            )
        else:
            errors += [
                FieldError.invalid(f"{where}.metadata.name", claim_name, m)
                for m in names.dns1123_subdomain_messages(claim_name)
            ]
        errors += names.labels_errors(claim_meta.get("labels"), f"{where}.metadata.labels")
        errors += _claim_spec_errors(claim.get("spec") or {}, f"{where}.spec")
        claim_names.append(claim_name)
    errors += pod_spec_errors(
        template.get("spec") or {}, "spec.template.spec", claim_names=claim_names, in_template=True
    )
    return errors


def _service_errors(obj: JsonObject) -> list[FieldError]:
    spec = obj.get("spec") or {}
    errors: list[FieldError] = []
    service_type = spec.get("type", "ClusterIP")
    types = ["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"]
    if service_type not in types:
        errors.append(FieldError.not_supported("spec.type", service_type, types))
    ports = spec.get("ports") or []
    headless = spec.get("clusterIP") == "None"
    if not ports and not headless and service_type != "ExternalName":
        errors.append(FieldError.required("spec.ports"))
    port_names: set[str] = set()
    for index, port in enumerate(ports):
        where = f"spec.ports[{index}]"
        name = port.get("name", "")
        if len(ports) > 1 and not name:
            errors.append(FieldError.required(f"{where}.name"))
        if name:
            errors += [
                FieldError.invalid(f"{where}.name", name, m)
                for m in names.dns1123_label_messages(name)
            ]
            if name in port_names:
                errors.append(FieldError.duplicate(f"{where}.name", name))
            port_names.add(name)
        number = port.get("port", 0)
        if not 1 <= number <= 65535:
            errors.append(
                FieldError.invalid(
                    f"{where}.port", number, "must be between 1 and 65535, inclusive"
                )
            )
        target = port.get("targetPort")
        if isinstance(target, int) and not 1 <= target <= 65535:
            errors.append(
                FieldError.invalid(
                    f"{where}.targetPort", target, "must be between 1 and 65535, inclusive"
                )
            )
        elif isinstance(target, str):
            errors += [
                FieldError.invalid(f"{where}.targetPort", target, m)
                for m in _port_name_messages(target)
            ]
        protocol = port.get("protocol", "TCP")
        if protocol not in ("TCP", "UDP", "SCTP"):
            errors.append(
                FieldError.not_supported(f"{where}.protocol", protocol, ["SCTP", "TCP", "UDP"])
            )
    errors += names.labels_errors(spec.get("selector"), "spec.selector")
    return errors


def _configmap_errors(obj: JsonObject) -> list[FieldError]:
    errors: list[FieldError] = []
    total = 0
    keys: set[str] = set()
    for field in ("data", "binaryData"):
        for key, value in (obj.get(field) or {}).items():
            if len(key) > 253 or not _CONFIG_KEY.fullmatch(key):
                errors.append(
                    FieldError.invalid(
                        f"{field}[{key}]",
                        key,
                        _CONFIG_KEY_MSG,
                    )
                )
            if key in keys:
                errors.append(
                    FieldError.invalid(f"{field}[{key}]", key, "duplicate of key present in data")
                )
            keys.add(key)
            total += len(key) + len(str(value))
    if total > CONFIGMAP_SIZE_LIMIT:
        errors.append(FieldError.too_long("[]", CONFIGMAP_SIZE_LIMIT))
    return errors


def _pod_errors(obj: JsonObject) -> list[FieldError]:
    return pod_spec_errors(obj.get("spec") or {}, "spec")


def rule_errors(rt: ResourceType, obj: JsonObject) -> list[FieldError]:
    errors = meta_errors(rt, obj.get("metadata") or {})
    if rt is STATEFULSETS:
        errors += _statefulset_errors(obj)
    elif rt is SERVICES:
        errors += _service_errors(obj)
    elif rt is CONFIGMAPS:
        errors += _configmap_errors(obj)
    elif rt is PERSISTENTVOLUMECLAIMS:
        errors += _claim_spec_errors(obj.get("spec") or {}, "spec")
    elif rt is PODS:
        errors += _pod_errors(obj)
    return errors


def update_errors(rt: ResourceType, old: JsonObject, new: JsonObject) -> list[FieldError]:
    """Changes the real server refuses on update (immutable fields)."""
    errors: list[FieldError] = []
    old_spec = old.get("spec") or {}
    new_spec = new.get("spec") or {}
    if rt is STATEFULSETS:
        frozen_old = {k: v for k, v in old_spec.items() if k not in _STS_MUTABLE_SPEC}
        frozen_new = {k: v for k, v in new_spec.items() if k not in _STS_MUTABLE_SPEC}
        if frozen_old != frozen_new:
            errors.append(
                FieldError.forbidden(
                    "spec",
                    "updates to statefulset spec for fields other than 'replicas', 'ordinals', "
                    "'template', 'updateStrategy', 'revisionHistoryLimit', "
                    "'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden",
                )
            )
    elif rt is SERVICES:
        if old_spec.get("clusterIP") and new_spec.get("clusterIP") != old_spec.get("clusterIP"):
            errors.append(
                FieldError.invalid(
                    "spec.clusterIP", new_spec.get("clusterIP", ""), "field is immutable"
                )
            )
    elif rt is PERSISTENTVOLUMECLAIMS:

        def without_requests(spec: Mapping[str, Any]) -> dict[str, Any]:
            copy = dict(spec)
            resources = dict(copy.get("resources") or {})
            resources.pop("requests", None)
            copy["resources"] = resources
            copy.pop("volumeAttributesClassName", None)
            return copy

        if without_requests(old_spec) != without_requests(new_spec):
            errors.append(
                FieldError.forbidden(
                    "spec",
                    "spec is immutable after creation except resources.requests and "
                    "volumeAttributesClassName for bound claims",
                )
            )
    elif rt is CONFIGMAPS and old.get("immutable"):
        for field in ("data", "binaryData"):
            if old.get(field) != new.get(field):
                errors.append(
                    FieldError.forbidden(field, "field is immutable when `immutable` is set")
                )
        if new.get("immutable") is not True:
            errors.append(
                FieldError.forbidden("immutable", "field is immutable when `immutable` is set")
            )
    elif rt is PODS:
        if {k: v for k, v in old_spec.items() if k != "containers"} != {
            k: v for k, v in new_spec.items() if k != "containers"
        } or [c.get("name") for c in old_spec.get("containers", [])] != [
            c.get("name") for c in new_spec.get("containers", [])
        ]:
            errors.append(
                FieldError.forbidden(
                    "spec",
                    "pod updates may not change fields other than `spec.containers[*].image`",
                )
            )

    old_meta = old.get("metadata") or {}
    new_meta = new.get("metadata") or {}
    if old_meta.get("deletionTimestamp"):
        added = set(new_meta.get("finalizers") or []) - set(old_meta.get("finalizers") or [])
        if added:
            errors.append(
                FieldError.forbidden(
                    "metadata.finalizers",
                    "no new finalizers can be added if the object is being deleted",
                )
            )
    return errors


def validate(rt: ResourceType, obj: JsonObject, *, old: JsonObject | None = None) -> None:
    """Raise 422 Invalid (or 400 for undecodable quantities) unless ``obj`` is acceptable."""
    check_decodable(rt, obj)
    name = (obj.get("metadata") or {}).get("name") or (obj.get("metadata") or {}).get(
        "generateName", ""
    )
    errors = schema_errors(obj)
    if errors:
        raise invalid(rt.kind, rt.group, name, errors)
    errors = rule_errors(rt, obj)
    if old is not None:
        errors += update_errors(rt, old, obj)
    if errors:
        raise invalid(rt.kind, rt.group, name, errors)
