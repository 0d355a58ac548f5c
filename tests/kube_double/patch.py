"""The three patch formats of the API server: JSON merge, strategic merge and JSON patch.

Strategic merge knows the merge keys of the list fields our objects use
(containers by ``name``, container ports by ``containerPort``, volume mounts
by ``mountPath``, owner references by ``uid``, ``finalizers`` as a set, ...);
any other list is replaced, as in the real schema.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Final

from .status import ApiError, JsonObject, bad_request, status_object

MERGE_PATCH: Final = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH: Final = "application/strategic-merge-patch+json"
JSON_PATCH: Final = "application/json-patch+json"
APPLY_PATCH_YAML: Final = "application/apply-patch+yaml"
PATCH_TYPES: Final = (JSON_PATCH, MERGE_PATCH, APPLY_PATCH_YAML, STRATEGIC_MERGE_PATCH)

_MERGE_KEYS: Final = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "env": "name",
    "imagePullSecrets": "name",
    "resourceClaims": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "ownerReferences": "uid",
    "conditions": "type",
    "hostAliases": "ip",
    "topologySpreadConstraints": "topologyKey",
}
_PRIMITIVE_SETS: Final = frozenset({"finalizers"})


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, ``null`` deletes, anything else replaces."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _merge_key(field: str, items: list[Any]) -> str | None:
    if field == "ports":
        sample = next((item for item in items if isinstance(item, Mapping)), {})
        return "containerPort" if "containerPort" in sample else "port"
    return _MERGE_KEYS.get(field)


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Apply a strategic merge patch (with ``$patch``, ``$retainKeys`` and list directives)."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "delete":
        return None
    body = {k: v for k, v in patch.items() if k != "$patch"}
    if directive == "replace":
        return _strip_directives(body)

    result: dict[str, Any] = dict(target) if isinstance(target, Mapping) else {}
    retain = body.pop("$retainKeys", None)
    if isinstance(retain, list):
        result = {k: v for k, v in result.items() if k in retain}

    for key, value in body.items():
        if key.startswith("$setElementOrder/"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            existing = result.get(field)
            if isinstance(existing, list) and isinstance(value, list):
                result[field] = [item for item in existing if item not in value]
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, Mapping):
            merged = strategic_merge_patch(result.get(key), value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        elif isinstance(value, list):
            result[key] = _merge_list(key, result.get(key), value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def _merge_list(field: str, current: Any, patch: list[Any]) -> list[Any]:
    if any(isinstance(item, Mapping) and item.get("$patch") == "replace" for item in patch):
        return [
            _strip_directives(item)
            for item in patch
            if not (isinstance(item, Mapping) and item.get("$patch") == "replace")
        ]
    existing = list(current) if isinstance(current, list) else []
    if field in _PRIMITIVE_SETS:
        return existing + [item for item in patch if item not in existing]
    key = _merge_key(field, existing + patch)
    if key is None:
        return [_strip_directives(item) for item in patch]

    merged = [copy.deepcopy(item) for item in existing]
    for item in patch:
        if not isinstance(item, Mapping) or key not in item:
            merged.append(_strip_directives(item))
            continue
        index = next(
            (
                i
                for i, old in enumerate(merged)
                if isinstance(old, Mapping) and old.get(key) == item[key]
            ),
            None,
        )
        if item.get("$patch") == "delete":
            if index is not None:
                del merged[index]
            continue
        if index is None:
            merged.append(_strip_directives(item))
        else:
            merged[index] = strategic_merge_patch(merged[index], item)
    return merged


def _strip_directives(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _strip_directives(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [_strip_directives(v) for v in value]
    return copy.deepcopy(value)


def _rejected(detail: str) -> ApiError:
    return ApiError(
        status_object(
            422,
            "Invalid",
            f"the server rejected our request due to an error in our request: {detail}",
        )
    )


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise _rejected(f"invalid JSON pointer {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _parent(doc: Any, parts: list[str], path: str) -> Any:
    current = doc
    for part in parts[:-1]:
        if isinstance(current, dict) and part in current:
            current = current[part]
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            raise _rejected(f"path {path!r} does not exist")
    return current


def _get(doc: Any, path: str) -> Any:
    parts = _pointer(path)
    if not parts:
        return doc
    parent = _parent(doc, parts, path)
    last = parts[-1]
    if isinstance(parent, dict) and last in parent:
        return parent[last]
    if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        return parent[int(last)]
    raise _rejected(f"path {path!r} does not exist")


def _add(doc: Any, path: str, value: Any, *, replace: bool) -> Any:
    parts = _pointer(path)
    if not parts:
        return copy.deepcopy(value)
    parent = _parent(doc, parts, path)
    last = parts[-1]
    if isinstance(parent, dict):
        if replace and last not in parent:
            raise _rejected(f"replace operation does not apply: doc is missing key: {path}")
        parent[last] = copy.deepcopy(value)
    elif isinstance(parent, list):
        if last == "-" and not replace:
            parent.append(copy.deepcopy(value))
        elif last.isdigit() and int(last) <= len(parent) - (1 if replace else 0):
            if replace:
                parent[int(last)] = copy.deepcopy(value)
            else:
                parent.insert(int(last), copy.deepcopy(value))
        else:
            raise _rejected(f"index out of bounds in {path!r}")
    else:
        raise _rejected(f"path {path!r} does not exist")
    return doc


def _remove(doc: Any, path: str) -> Any:
    parts = _pointer(path)
    if not parts:
        raise _rejected("cannot remove the whole document")
    parent = _parent(doc, parts, path)
    last = parts[-1]
    if isinstance(parent, dict) and last in parent:
        del parent[last]
    elif isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        del parent[int(last)]
    else:
        raise _rejected(f"remove operation does not apply: doc is missing path: {path}")
    return doc


def json_patch(target: JsonObject, operations: Any) -> JsonObject:
    """RFC 6902 operations applied to a copy of ``target``."""
    if not isinstance(operations, list):
        raise bad_request("json: cannot unmarshal object into Go value of type jsonpatch.Patch")
    doc: Any = copy.deepcopy(target)
    for operation in operations:
        if not isinstance(operation, Mapping) or "op" not in operation:
            raise bad_request("invalid JSON patch operation: " + repr(operation)[:200])
        op = operation["op"]
        path = str(operation.get("path", ""))
        if op == "add":
            doc = _add(doc, path, operation.get("value"), replace=False)
        elif op == "replace":
            doc = _add(doc, path, operation.get("value"), replace=True)
        elif op == "remove":
            doc = _remove(doc, path)
        elif op in ("move", "copy"):
            source = str(operation.get("from", ""))
            value = copy.deepcopy(_get(doc, source))
            if op == "move":
                doc = _remove(doc, source)
            doc = _add(doc, path, value, replace=False)
        elif op == "test":
            if _get(doc, path) != operation.get("value"):
                raise _rejected(f"testing value {path} failed")
        else:
            raise bad_request(f"Unexpected kind: {op}")
    if not isinstance(doc, dict):
        raise _rejected("the patched document is not an object")
    return doc
