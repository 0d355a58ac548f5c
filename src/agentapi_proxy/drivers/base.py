"""The contract every driver fulfils; the servicer only talks to this."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator

from agentapi_proxy.model import AgentInfo, AgentSpec, Endpoint, LogOptions, Mode, StreamEnd


class Driver(abc.ABC):
    mode: Mode

    @abc.abstractmethod
    async def start(self) -> None:
        """Find the agents that exist already (after a restart) and resume watching them."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop background work. Agents keep running."""

    @abc.abstractmethod
    async def create(self, spec: AgentSpec) -> tuple[AgentInfo, bool]:
        """Start an agent; returns it and whether it was created now.

        Idempotent: an existing agent with an equal spec is returned with
        ``False``; a different spec raises AlreadyExists. Whatever was made
        before a failure is removed again before the error is raised.
        """

    @abc.abstractmethod
    async def get(self, agent_id: str) -> AgentInfo:
        """Raises NotFound."""

    @abc.abstractmethod
    async def list_agents(self, session_id: str | None = None) -> list[AgentInfo]:
        """Every agent, or those of one session, sorted by id."""

    @abc.abstractmethod
    async def delete(self, agent_id: str) -> AgentInfo:
        """Stop the agent and remove what it owns; returns its last state. Raises NotFound."""

    @abc.abstractmethod
    def watch(self, agent_id: str) -> AsyncIterator[AgentInfo]:
        """The current state, then each change; ends after a DELETED state.

        Intermediate states may be skipped when the reader is slower than the
        changes (the latest state always arrives). Raises NotFound.
        """

    @abc.abstractmethod
    async def logs(self, agent_id: str, options: LogOptions) -> AsyncIterator[bytes | StreamEnd]:
        """Open the log; returns an iterator of chunks of whole lines (very long lines split).

        Every error a caller can act on is raised here, before the first
        chunk: NotFound, FailedPrecondition for ``previous`` without a
        previous run or a container that cannot start. With ``follow`` the
        iterator waits for new data and ends when the agent is deleted,
        yielding a StreamEnd first.
        """

    @abc.abstractmethod
    async def endpoint(self, agent_id: str) -> Endpoint:
        """Where to send the agent's HTTP traffic. Raises NotFound, or
        FailedPrecondition/Unavailable when it cannot take traffic."""
