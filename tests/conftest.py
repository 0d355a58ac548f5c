from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from agentapi_proxy.v1 import agent_service_pb2_grpc as pb_grpc
from tests.harness import ProxyProcess, running_proxy, stub


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[ProxyProcess]:
    """A real ``agentapi-proxy serve`` on ephemeral ports with the reference agent."""
    with running_proxy(tmp_path, command="control-plane") as running:
        yield running


@pytest.fixture
async def client(proxy: ProxyProcess) -> AsyncIterator[pb_grpc.AgentServiceStub]:
    channel, agents = stub(proxy.grpc_target)
    try:
        yield agents
    finally:
        await channel.close()


@pytest.fixture
def grpc_error() -> type[grpc.aio.AioRpcError]:
    return grpc.aio.AioRpcError
