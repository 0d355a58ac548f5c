"""Settings: built-in defaults < JSON/YAML files < ``AGENTAPI_`` environment variables.

Dynaconf reads and merges the files. Environment variables are read by our
own Dynaconf loader (:mod:`agentapi_proxy.settings_env`) because the design
document names nested keys with single underscores
(``AGENTAPI_PROVISION_MODE_RESOURCES_CPU_REQUEST``), which Dynaconf's own env
loader would store as one stray top-level key. Dynaconf's double-underscore
form (``AGENTAPI_PROVISION_MODE__RESOURCES__CPU_REQUEST``) works as well.

The merged values are then checked and turned into frozen dataclasses; a
bad value raises :class:`SettingsError` naming the key, the value and where
it came from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml
from dynaconf import Dynaconf

ENV_PREFIX = "AGENTAPI_"
# Names an explicit settings file (or several, comma-separated); not a setting itself.
CONFIG_FILE_ENV = "AGENTAPI_CONFIG_FILE"
CONFIG_FILE_NAMES = ("config.json", "config.yaml", "config.yml")


class SettingsError(Exception):
    """A setting has a value the control plane cannot run with."""


@dataclass(frozen=True)
class ResourceSettings:
    cpu_request: str = "100m"
    cpu_limit: str = "500m"
    memory_request: str = "256Mi"
    memory_limit: str = "512Mi"
    storage_size: str = "1Gi"


@dataclass(frozen=True)
class ProvisionModeSettings:
    enabled: bool = False
    namespace: str = "agentapi-proxy"
    image: str = "agentapi-proxy:latest"
    resources: ResourceSettings = field(default_factory=ResourceSettings)
    # Port the agent container serves on; real agentapi defaults to 3284.
    container_port: int = 3284
    # Path probed for liveness and readiness; both the reference agent and real
    # agentapi serve GET /status (agentapi has no /health route).
    probe_path: str = "/status"
    # What happens to data-agent-{id}-0 when the agent is deleted: "delete" or "retain".
    pvc_delete_policy: str = "delete"
    # Empty: in-cluster config when available, else the default kubeconfig.
    kubeconfig: str = ""
    # The agent container's command ({port}, {agent_id}, {session_id} filled in); empty
    # runs the image's entrypoint. The reference agent must listen on the pod's address,
    # and the API server's pod proxy sends the pod IP as Host, hence --allowed-hosts.
    command: str = (
        "python -m agentapi_proxy.reference_agent --host 0.0.0.0 --port {port} --allowed-hosts *"
    )


@dataclass(frozen=True)
class ProcessSettings:
    # Placeholders: {port} {agent_id} {session_id} {python} {workdir}.
    command: str = "{python} -m agentapi_proxy.reference_agent --port {port}"
    port_range: str = "3284-4283"
    stop_grace_seconds: float = 10.0
    ready_path: str = "/status"
    ready_timeout_seconds: float = 120.0
    # Working directory template; empty means a directory of the agent's own
    # under the state directory.
    workdir: str = ""
    # "never", "on-failure" (non-zero exit) or "always", with back-off like a kubelet's.
    restart_policy: str = "on-failure"
    restart_backoff_seconds: float = 1.0
    restart_backoff_max_seconds: float = 60.0

    @property
    def ports(self) -> range:
        low, high = (int(part) for part in self.port_range.split("-"))
        return range(low, high + 1)


@dataclass(frozen=True)
class ServerSettings:
    grpc_listen: str = "127.0.0.1:50051"
    # Seconds open calls get to finish on SIGTERM before they are cancelled.
    shutdown_grace_seconds: float = 5.0
    # Open streams (log follows, watches, traffic) in all, and per user: each holds a
    # file descriptor or a connection.
    max_streams: int = 8192
    max_streams_per_user: int = 1024
    # Largest gRPC message accepted; bodies and logs travel in 64 KiB chunks anyway.
    max_message_bytes: int = 4 * 1024 * 1024
    # host:port for Prometheus /metrics of a control plane run on its own; empty: off
    # (``serve`` shows them on the gateway's /metrics).
    metrics_listen: str = ""


@dataclass(frozen=True)
class GatewaySettings:
    listen: str = "127.0.0.1:8080"
    # Where the gateway finds the control plane's gRPC port.
    control_plane: str = "127.0.0.1:50051"
    # Upper bound on a JSON request body of the REST routes (proxied bodies stream).
    max_json_body_bytes: int = 1_048_576
    # A new connection must send a complete request head within this many seconds.
    header_timeout_seconds: float = 10.0
    # Client connections held open at most; 0: as many as the descriptor limit allows.
    max_connections: int = 0
    # Per client address; 0: no limit (behind a load balancer, which is one address).
    max_connections_per_client: int = 512
    # How agent traffic travels: "grpc" through the control plane (ProxyHTTP), or
    # "direct" from the gateway to the agent, which it must be able to reach.
    traffic_path: str = "grpc"
    # On the direct path, how long one authorization (GrantAgentAccess) is reused: a
    # deleted agent or a revoked key stops being reachable at most this much later.
    direct_grant_ttl_seconds: float = 5.0


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    format: str = "text"


@dataclass(frozen=True)
class AuthSettings:
    # Off by default for a single user on a laptop; then both ports must be on loopback.
    enabled: bool = False
    # JSON file {"api_keys": [{"key", "user_id", "role", "permissions", "created_at",
    # "expires_at"}]}; re-read when it changes.
    api_keys_file: str = ""
    # Allow listening beyond loopback with authentication off (trusted networks only).
    allow_unauthenticated_remote: bool = False


@dataclass(frozen=True)
class ClientSettings:
    # Control plane the ``agentapi-proxy`` client commands dial; empty: gateway.control_plane.
    address: str = ""
    # Sent as ``x-api-key``; kept out of reprs so it never reaches a log line.
    api_key: str = field(default="", repr=False)


@dataclass(frozen=True)
class Settings:
    state_dir: str = "~/.local/state/agentapi-proxy"
    server: ServerSettings = field(default_factory=ServerSettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    process: ProcessSettings = field(default_factory=ProcessSettings)
    provision_mode: ProvisionModeSettings = field(default_factory=ProvisionModeSettings)
    log: LogSettings = field(default_factory=LogSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    client: ClientSettings = field(default_factory=ClientSettings)

    @property
    def state_path(self) -> Path:
        return Path(os.path.expanduser(self.state_dir))


# --- the schema as key paths -------------------------------------------------


def leaf_paths(cls: type = Settings, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every leaf key path of the settings, e.g. ("provision_mode", "resources", "cpu_request")."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from leaf_paths(kind, (*prefix, f.name))  # type: ignore[arg-type]
        else:
            yield (*prefix, f.name)


def env_names() -> dict[str, tuple[str, ...]]:
    """Environment variable name -> key path, in both accepted spellings."""
    names: dict[str, tuple[str, ...]] = {}
    for path in leaf_paths():
        for sep in ("_", "__"):
            names[ENV_PREFIX + sep.join(path).upper()] = path
    return names


# --- loading -----------------------------------------------------------------


def find_config_files(explicit: str | None = None, *, cwd: Path | None = None) -> list[Path]:
    """Settings files in load order (later ones win).

    An explicit path (argument or ``AGENTAPI_CONFIG_FILE``) is the only file
    read and must exist; otherwise ``config.json``, ``config.yaml`` and
    ``config.yml`` are read from /etc/agentapi, ~/.agentapi and the current
    directory, in that order.
    """
    explicit = explicit or os.environ.get(CONFIG_FILE_ENV)
    if explicit:
        paths = [Path(p.strip()).expanduser() for p in explicit.split(",") if p.strip()]
        for path in paths:
            if not path.is_file():
                raise SettingsError(f"settings file {path} does not exist")
        return paths
    directories = [Path("/etc/agentapi"), Path.home() / ".agentapi", cwd or Path.cwd()]
    return [d / name for d in directories for name in CONFIG_FILE_NAMES if (d / name).is_file()]


def load_settings(
    config_file: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Settings:
    """Load, merge and check the settings. Raises SettingsError on any bad value."""
    environ = os.environ if environ is None else environ
    files = find_config_files(config_file, cwd=cwd)
    file_data = [(path, _read_file(path)) for path in files]
    for path, data in file_data:
        _reject_unknown_keys(data, source=str(path))

    env_values = _env_values(environ)
    dyn = Dynaconf(
        settings_files=[str(p) for p in files],
        core_loaders=["YAML", "JSON"],
        loaders=["agentapi_proxy.settings_env"],
        merge_enabled=True,
        environments=False,
        load_dotenv=False,
        envvar_prefix=False,
        # Read by agentapi_proxy.settings_env; passing it here keeps tests off os.environ.
        AGENTAPI_ENV_VALUES={name: list(entry) for name, entry in env_values.items()},
    )
    merged = dyn.as_dict()

    def source_of(path: tuple[str, ...]) -> str:
        for name, (env_path, _) in env_values.items():
            if env_path == path:
                return f"environment variable {name}"
        for file_path, data in reversed(file_data):
            if _lookup(data, path) is not _MISSING:
                return f"file {file_path}"
        return "built-in default"

    settings: Settings = _build(Settings, _lower_keys(merged), (), source_of)
    return settings


def _env_values(environ: Mapping[str, str]) -> dict[str, tuple[tuple[str, ...], str]]:
    names = env_names()
    return {
        name: (names[name.upper()], value)
        for name, value in environ.items()
        if name.upper() in names
    }


def unknown_env_names(environ: Mapping[str, str] | None = None) -> list[str]:
    """``AGENTAPI_`` variables that name no setting (typos, or another program's own).

    Not an error: real agentapi reads ``AGENTAPI_ALLOWED_HOSTS`` and friends from
    the same environment, so the caller warns instead.
    """
    environ = os.environ if environ is None else environ
    names = env_names()
    return sorted(
        name
        for name in environ
        if name.upper().startswith(ENV_PREFIX)
        and name.upper() not in names
        and name != CONFIG_FILE_ENV
    )


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise SettingsError(f"cannot read settings file {path}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"settings file {path} must hold a mapping at the top level")
    return data


_MISSING = object()


def _lookup(data: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = data
    for key in path:
        if not isinstance(node, Mapping):
            return _MISSING
        lowered = {str(k).lower(): v for k, v in node.items()}
        if key not in lowered:
            return _MISSING
        node = lowered[key]
    return node


def _reject_unknown_keys(data: Mapping[str, Any], *, source: str) -> None:
    known = set(leaf_paths())
    prefixes = {p[:i] for p in known for i in range(1, len(p))}

    def walk(node: Mapping[str, Any], prefix: tuple[str, ...]) -> None:
        for key, value in node.items():
            path = (*prefix, str(key).lower())
            if path in prefixes and isinstance(value, Mapping):
                walk(value, path)
            elif path not in known:
                raise SettingsError(f"unknown setting {'.'.join(path)!r} in {source}")

    walk(data, ())


def _lower_keys(data: Mapping[str, Any]) -> dict[str, Any]:
    return {
        str(k).lower(): _lower_keys(v) if isinstance(v, Mapping) else v for k, v in data.items()
    }


_QUANTITY = re.compile(
    r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei|e[0-9]+)?$"
)
_QUANTITY_KEYS = {f.name for f in dataclasses.fields(ResourceSettings)}


def _build(cls: type, data: Mapping[str, Any], prefix: tuple[str, ...], source_of: Any) -> Any:
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        path = (*prefix, f.name)
        kind = hints[f.name]
        raw = data.get(f.name, _MISSING)
        if dataclasses.is_dataclass(kind):
            if raw is not _MISSING and not isinstance(raw, Mapping):
                raise SettingsError(
                    f"setting {'.'.join(path)} must be a mapping, got {raw!r} "
                    f"(from {source_of(path)})"
                )
            values[f.name] = _build(kind, raw if raw is not _MISSING else {}, path, source_of)  # type: ignore[arg-type]
        elif raw is not _MISSING:
            values[f.name] = _convert(kind, raw, path, source_of)
    built = cls(**values)
    _check(built, prefix, source_of)
    return built


def _convert(kind: Any, raw: Any, path: tuple[str, ...], source_of: Any) -> Any:
    def fail(expected: str) -> SettingsError:
        return SettingsError(
            f"setting {'.'.join(path)} = {raw!r} is not {expected} (from {source_of(path)})"
        )

    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in {"true", "false"}:
            return raw.strip().lower() == "true"
        raise fail("a boolean (true or false)")
    if kind is int:
        if isinstance(raw, bool):
            raise fail("an integer")
        try:
            return int(str(raw).strip())
        except ValueError:
            raise fail("an integer") from None
    if kind is float:
        if isinstance(raw, bool):
            raise fail("a number")
        try:
            return float(str(raw).strip())
        except ValueError:
            raise fail("a number") from None
    if isinstance(raw, bool) or isinstance(raw, (dict, list)):
        raise fail("a string")
    return str(raw)


def _check(value: Any, prefix: tuple[str, ...], source_of: Any) -> None:
    def fail(name: str, expected: str) -> SettingsError:
        path = (*prefix, name)
        return SettingsError(
            f"setting {'.'.join(path)} = {getattr(value, name)!r} is not {expected} "
            f"(from {source_of(path)})"
        )

    if isinstance(value, ResourceSettings):
        for name in _QUANTITY_KEYS:
            if not _QUANTITY.match(getattr(value, name)):
                raise fail(name, "a Kubernetes quantity such as 100m, 512Mi or 1Gi")
    elif isinstance(value, ProvisionModeSettings):
        if value.pvc_delete_policy not in {"delete", "retain"}:
            raise fail("pvc_delete_policy", "'delete' or 'retain'")
        if not 1 <= value.container_port <= 65535:
            raise fail("container_port", "a port number (1-65535)")
        if not value.probe_path.startswith("/"):
            raise fail("probe_path", "a path starting with '/'")
    elif isinstance(value, ProcessSettings):
        match = re.fullmatch(r"(\d+)-(\d+)", value.port_range.strip())
        if not match or not 1 <= int(match[1]) <= int(match[2]) <= 65535:
            raise fail("port_range", "a port range such as 3284-4283")
        if value.stop_grace_seconds < 0:
            raise fail("stop_grace_seconds", "zero or more seconds")
        if not value.ready_path.startswith("/"):
            raise fail("ready_path", "a path starting with '/'")
        if not value.command.strip():
            raise fail("command", "a command")
        if value.restart_policy not in {"never", "on-failure", "always"}:
            raise fail("restart_policy", "one of never, on-failure, always")
        if not 0 < value.restart_backoff_seconds <= value.restart_backoff_max_seconds:
            raise fail(
                "restart_backoff_seconds", "positive and at most restart_backoff_max_seconds"
            )
    elif isinstance(value, LogSettings):
        if value.level.lower() not in {"debug", "info", "warning", "error"}:
            raise fail("level", "one of debug, info, warning, error")
        if value.format not in {"text", "json"}:
            raise fail("format", "'text' or 'json'")
    elif isinstance(value, ServerSettings) and value.max_message_bytes < 64 * 1024:
        raise fail("max_message_bytes", "at least 65536 bytes")
    elif isinstance(value, GatewaySettings):
        if value.header_timeout_seconds <= 0:
            raise fail("header_timeout_seconds", "more than 0 seconds")
        if value.max_connections < 0:
            raise fail("max_connections", "0 (from the descriptor limit) or more")
        if value.max_connections_per_client < 0:
            raise fail("max_connections_per_client", "0 (no limit) or more")
        if value.traffic_path not in {"grpc", "direct"}:
            raise fail("traffic_path", "'grpc' or 'direct'")
        if not 0 < value.direct_grant_ttl_seconds <= 60:
            raise fail("direct_grant_ttl_seconds", "more than 0 and at most 60 seconds")
    if isinstance(value, (ServerSettings, GatewaySettings)):
        for name in ("grpc_listen", "listen", "control_plane", "metrics_listen"):
            address = getattr(value, name, None)
            if name == "metrics_listen" and not address:
                continue
            if address is not None and not re.fullmatch(r".+:\d{1,5}", address):
                raise fail(name, "a host:port address")
    elif isinstance(value, ClientSettings):
        if value.address and not re.fullmatch(r".+:\d{1,5}", value.address):
            raise fail("address", "a host:port address")


def python_executable() -> str:
    return sys.executable
