"""Dynaconf loader for ``AGENTAPI_`` environment variables.

Maps each variable onto the settings key path it names (see
:func:`agentapi_proxy.settings.env_names`) so that single-underscore names
from the design document nest, and merges it key by key over the files.
"""

from __future__ import annotations

from typing import Any

from dynaconf.loaders.base import SourceMetadata


def load(
    obj: Any,
    env: str | None = None,
    silent: bool = True,
    key: str | None = None,
    validate: bool = False,
    identifier: str = "global",
    filename: str | None = None,
) -> None:
    values: dict[str, tuple[tuple[str, ...], str]] = obj.get("AGENTAPI_ENV_VALUES") or {}
    for name, (path, value) in sorted(values.items()):
        nested: dict[str, Any] = {path[-1]: value}
        for part in reversed(path[:-1]):
            nested = {part: nested}
        obj.update(
            nested,
            loader_identifier=SourceMetadata("env", name, "global"),
            validate=False,
            dynaconf_merge=True,
        )
