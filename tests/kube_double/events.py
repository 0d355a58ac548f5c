"""core/v1 Events written by the fake controllers, deduplicated like the real recorder."""

from __future__ import annotations

import logging
import time
from typing import Literal

from .registry import Registry
from .resources import EVENTS, ResourceType
from .status import ApiError, JsonObject
from .timestamps import rfc3339

logger = logging.getLogger(__name__)

EventKind = Literal["Normal", "Warning"]


class EventRecorder:
    """Records an event per (object, type, reason, message, component); repeats bump ``count``."""

    def __init__(self, registry: Registry, *, repeat_interval: float = 1.0) -> None:
        self._registry = registry
        self._names: dict[tuple[str, str, str, str, str], tuple[str, str]] = {}
        self._last: dict[tuple[str, str, str, str, str], float] = {}
        # A condition that persists is reported again at most this often (the real
        # components back off too); without it every reconcile pass would write.
        self.repeat_interval = repeat_interval

    def record(
        self,
        rt: ResourceType,
        obj: JsonObject,
        *,
        type: EventKind,
        reason: str,
        message: str,
        component: str,
        host: str | None = None,
        field_path: str | None = None,
    ) -> None:
        meta = obj["metadata"]
        namespace = meta.get("namespace") or "default"
        key = (meta["uid"], type, reason, message, component)
        moment = time.monotonic()
        if moment - self._last.get(key, -1e9) < self.repeat_interval:
            return
        self._last[key] = moment
        now = rfc3339()

        if key in self._names:
            existing = self._registry.find(EVENTS, *self._names[key])
            if existing is not None:
                existing["count"] = int(existing.get("count", 1)) + 1
                existing["lastTimestamp"] = now
                self._registry.write_internal(EVENTS, existing, check_schema=False)
                return

        involved: JsonObject = {
            "kind": rt.kind,
            "namespace": meta.get("namespace", ""),
            "name": meta["name"],
            "uid": meta["uid"],
            "apiVersion": rt.api_version,
            "resourceVersion": meta.get("resourceVersion", ""),
        }
        if field_path:
            involved["fieldPath"] = field_path
        source: JsonObject = {"component": component}
        if host:
            source["host"] = host
        name = f"{meta['name']}.{time.time_ns():x}"
        event: JsonObject = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": namespace},
            "involvedObject": involved,
            "reason": reason,
            "message": message,
            "source": source,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "type": type,
            "reportingComponent": component,
            "reportingInstance": host or "",
        }
        try:
            self._registry.create_internal(EVENTS, event)
        except ApiError as exc:
            # The real recorder drops events it cannot write; so does the double.
            logger.warning("could not record event %s on %s: %s", reason, meta["name"], exc.message)
            return
        self._names[key] = (namespace, name)

    def forget(self, uid: str) -> None:
        for key in [k for k in self._names if k[0] == uid]:
            del self._names[key]
        for key in [k for k in self._last if k[0] == uid]:
            del self._last[key]
