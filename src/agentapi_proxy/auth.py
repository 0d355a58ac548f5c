"""API keys, users and permissions.

Keys come from a JSON file in the shape of the original project's
``api_keys`` list. Only SHA-256 digests of the keys are held in memory, and
lookups compare digests in constant time. No key is ever logged.

Permissions: ``session:create``, ``session:list``, ``session:access`` (an
agent's state, logs and traffic), ``session:delete``, and ``*`` for all. An
agent belongs to the user who created it; other users get NOT_FOUND for it
(so ids of other users' agents are not disclosed), and the ``admin`` role sees
and may do everything.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agentapi_proxy.errors import PermissionDenied, Unauthenticated
from agentapi_proxy.settings import AuthSettings, SettingsError

logger = logging.getLogger(__name__)

ADMIN_ROLE = "admin"


class Permission(enum.Enum):
    CREATE = "session:create"
    LIST = "session:list"
    ACCESS = "session:access"
    DELETE = "session:delete"


ALL_PERMISSIONS = "*"
KNOWN_PERMISSIONS = {p.value for p in Permission} | {ALL_PERMISSIONS}


@dataclass(frozen=True)
class Principal:
    user_id: str
    role: str
    permissions: frozenset[str]

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN_ROLE

    def require(self, permission: Permission) -> None:
        """Raises PermissionDenied unless the principal holds ``permission``."""
        if self.is_admin or ALL_PERMISSIONS in self.permissions:
            return
        if permission.value not in self.permissions:
            raise PermissionDenied(
                f"user {self.user_id!r} lacks the permission {permission.value!r}; "
                "ask an admin to add it to your API key"
            )

    def may_see(self, owner: str) -> bool:
        return self.is_admin or owner == self.user_id


# Used when authentication is off: one local user who may do everything.
LOCAL_USER = Principal(user_id="", role=ADMIN_ROLE, permissions=frozenset({ALL_PERMISSIONS}))


@dataclass(frozen=True)
class _Key:
    digest: bytes
    principal: Principal
    expires_at: datetime | None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_keys(data: Any, *, source: str) -> list[_Key]:
    """The keys of an ``api_keys`` document. Raises SettingsError naming the bad entry."""
    entries = data.get("api_keys") if isinstance(data, Mapping) else data
    if not isinstance(entries, list):
        raise SettingsError(f'{source}: expected {{"api_keys": [...]}}')
    keys = []
    for index, entry in enumerate(entries):
        where = f"{source}: api_keys[{index}]"
        if not isinstance(entry, Mapping):
            raise SettingsError(f"{where} must be an object")
        key, user_id = entry.get("key"), entry.get("user_id")
        if not isinstance(key, str) or len(key) < 16:
            raise SettingsError(f"{where}.key must be a string of at least 16 characters")
        if not isinstance(user_id, str) or not user_id:
            raise SettingsError(f"{where}.user_id must be a non-empty string")
        role = entry.get("role", "user")
        permissions = entry.get("permissions", [])
        if not isinstance(role, str):
            raise SettingsError(f"{where}.role must be a string")
        if not isinstance(permissions, list) or not all(
            isinstance(p, str) and p in KNOWN_PERMISSIONS for p in permissions
        ):
            raise SettingsError(
                f"{where}.permissions must be a list of {sorted(KNOWN_PERMISSIONS)}"
            )
        expires_at = None
        if entry.get("expires_at"):
            try:
                expires_at = datetime.fromisoformat(str(entry["expires_at"]).replace("Z", "+00:00"))
            except ValueError:
                raise SettingsError(f"{where}.expires_at is not an RFC 3339 time") from None
            if expires_at.tzinfo is None:
                expires_at = expires_at.replace(tzinfo=UTC)
        keys.append(
            _Key(
                digest=_digest(key),
                principal=Principal(user_id=user_id, role=role, permissions=frozenset(permissions)),
                expires_at=expires_at,
            )
        )
    return keys


class KeyStore:
    """The accepted API keys; re-reads its file when the file changes."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp: tuple[int, int] | None = None
        self._keys: list[_Key] = []
        self._reload()

    def _reload(self) -> None:
        try:
            stat = self._path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp == self._stamp:
                return
            data = json.loads(self._path.read_text())
        except (OSError, ValueError) as exc:
            if self._stamp is None:
                raise SettingsError(f"cannot read auth.api_keys_file {self._path}: {exc}") from exc
            logger.error("keeping the previous API keys: cannot read %s: %s", self._path, exc)
            return
        try:
            self._keys = parse_keys(data, source=str(self._path))
        except SettingsError as exc:
            if self._stamp is None:
                raise
            logger.error("keeping the previous API keys: %s", exc)
            return
        self._stamp = stamp
        logger.info("loaded %d API keys from %s", len(self._keys), self._path)

    def authenticate(self, presented: str, *, now: datetime | None = None) -> Principal:
        """The key's principal. Raises Unauthenticated for an unknown or expired key."""
        self._reload()
        digest = _digest(presented)
        found: _Key | None = None
        # Compare with every key so the time taken does not depend on which one matched.
        for candidate in self._keys:
            if hmac.compare_digest(candidate.digest, digest):
                found = candidate
        if found is None:
            raise Unauthenticated("the API key is not valid")
        if found.expires_at is not None and found.expires_at <= (now or datetime.now(UTC)):
            raise Unauthenticated("the API key has expired; ask for a new one")
        return found.principal


def presented_key(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The key from ``x-api-key`` or ``authorization: Bearer`` metadata, if any."""
    for name, value in metadata:
        text = value.decode() if isinstance(value, bytes) else value
        if name == "x-api-key" and text:
            return text
        if name == "authorization" and text[:7].lower() == "bearer " and text[7:].strip():
            return text[7:].strip()
    return None


class Authenticator:
    """Turns request metadata into a Principal, or raises."""

    def __init__(self, store: KeyStore | None) -> None:
        self._store = store

    @property
    def enabled(self) -> bool:
        return self._store is not None

    def principal(self, metadata: Iterable[tuple[str, str | bytes]]) -> Principal:
        if self._store is None:
            return LOCAL_USER
        key = presented_key(metadata)
        if key is None:
            raise Unauthenticated(
                "an API key is required: send it as 'X-API-Key: KEY' or 'Authorization: Bearer KEY'"
            )
        return self._store.authenticate(key)


def is_loopback(address: str) -> bool:
    """Whether ``host:port`` names a loopback address: an IP literal, or ``localhost``.

    A host name that merely starts like one (``127.example.com``) may resolve anywhere.
    """
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def authenticator_from_settings(settings: AuthSettings, *, listen: Iterable[str]) -> Authenticator:
    """Raises SettingsError for a missing keys file, or for open ports without authentication.

    ``listen`` are the addresses this process serves on.
    """
    if settings.enabled:
        if not settings.api_keys_file:
            raise SettingsError("auth.enabled is true but auth.api_keys_file is empty")
        return Authenticator(KeyStore(Path(os.path.expanduser(settings.api_keys_file))))
    exposed = [address for address in listen if not is_loopback(address)]
    if exposed and not settings.allow_unauthenticated_remote:
        raise SettingsError(
            f"authentication is off, so listening on {', '.join(exposed)} would let anyone on "
            "the network run agents: enable auth (auth.enabled, auth.api_keys_file), listen "
            "on 127.0.0.1, or set auth.allow_unauthenticated_remote=true"
        )
    logger.warning(
        "authentication is disabled: every caller is the local admin%s",
        "" if exposed else " (listening on loopback only)",
    )
    return Authenticator(None)
