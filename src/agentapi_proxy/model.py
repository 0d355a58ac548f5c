"""The core's view of an agent, independent of the wire format and the driver."""

from __future__ import annotations

import enum
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime


class State(enum.Enum):
    PENDING = "pending"
    STARTING = "starting"
    READY = "ready"
    UNREADY = "unready"
    FAILED = "failed"
    STOPPING = "stopping"
    DELETED = "deleted"


class Mode(enum.Enum):
    PROCESS = "process"
    STATEFULSET = "statefulset"


@dataclass(frozen=True)
class AgentSpec:
    """What a create request asks for; two creates are identical when their specs are equal."""

    agent_id: str
    session_id: str
    owner: str = ""
    env: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AgentInfo:
    spec: AgentSpec
    mode: Mode
    state: State
    create_time: datetime
    reason: str = ""
    message: str = ""
    # host:port as reached from the control plane.
    address: str = ""
    ready_time: datetime | None = None
    exit_code: int | None = None
    restart_count: int = 0
    log_tail: str = ""

    @property
    def agent_id(self) -> str:
        return self.spec.agent_id


@dataclass(frozen=True)
class LogOptions:
    """The options of ``kubectl logs``."""

    follow: bool = False
    tail_lines: int | None = None
    since_time: datetime | None = None
    timestamps: bool = False
    previous: bool = False
    limit_bytes: int | None = None


@dataclass(frozen=True)
class StreamEnd:
    """Last item of a log stream that ended for a reason the reader should see."""

    reason: str
    message: str


@dataclass(frozen=True)
class Endpoint:
    """How the control plane reaches an agent's HTTP server."""

    base_url: str
    # Host header the agent accepts (real agentapi only accepts localhost by default).
    host: str
    headers: Mapping[str, str] = field(default_factory=dict)
    # TLS settings for the connection; None means plain HTTP or default verification.
    ssl: ssl.SSLContext | None = None
