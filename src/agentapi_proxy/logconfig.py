"""Logging of the control plane and the gateway: readable text, or JSON for collectors."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any

from agentapi_proxy.settings import LogSettings

# Attributes every LogRecord has; anything else was passed in ``extra``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class AgentLogger(logging.LoggerAdapter[logging.Logger]):
    """Prefixes messages with the agent id and carries it as the ``agent_id`` field."""

    def process(
        self, msg: object, kwargs: MutableMapping[str, Any]
    ) -> tuple[object, MutableMapping[str, Any]]:
        agent_id = (self.extra or {}).get("agent_id", "")
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return f"agent {agent_id}: {msg}", kwargs


def for_agent(logger: logging.Logger, agent_id: str) -> AgentLogger:
    return AgentLogger(logger, {"agent_id": agent_id})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(settings: LogSettings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())
    # aiohttp's access log is one line per request: too much at INFO for a proxy.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
