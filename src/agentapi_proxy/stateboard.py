"""The latest state of every agent, and a way to wait for the next change.

Drivers publish; WatchAgent and WaitAgent read. Each agent holds only its
latest state, so a slow watcher costs no memory: it skips intermediate states
and always sees the newest one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from agentapi_proxy.errors import NotFound
from agentapi_proxy.model import AgentInfo, State


@dataclass
class _Slot:
    info: AgentInfo
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class StateBoard:
    def __init__(self) -> None:
        self._slots: dict[str, _Slot] = {}
        self._closed = False

    def publish(self, info: AgentInfo) -> None:
        """Record the agent's new state and wake its watchers. A DELETED state removes it."""
        slot = self._slots.get(info.agent_id)
        if slot is None:
            if info.state is State.DELETED:
                return
            self._slots[info.agent_id] = _Slot(info)
            return
        if slot.info == info:
            return
        previous = slot.changed
        slot.info = info
        slot.changed = asyncio.Event()
        previous.set()
        if info.state is State.DELETED:
            del self._slots[info.agent_id]

    def get(self, agent_id: str) -> AgentInfo | None:
        slot = self._slots.get(agent_id)
        return slot.info if slot else None

    def all(self) -> list[AgentInfo]:
        return [slot.info for slot in self._slots.values()]

    def close(self) -> None:
        """End every watch (control plane shutting down)."""
        self._closed = True
        for slot in self._slots.values():
            slot.changed.set()

    async def watch(self, agent_id: str) -> AsyncIterator[AgentInfo]:
        """Current state, then each newer one; ends after DELETED or on close().

        Raises NotFound when the agent is unknown.
        """
        slot = self._slots.get(agent_id)
        if slot is None:
            raise NotFound(f"agent {agent_id!r} not found")
        seen = slot.info
        yield seen
        while seen.state is not State.DELETED and not self._closed:
            await slot.changed.wait()
            if slot.info is not seen:
                seen = slot.info
                yield seen
