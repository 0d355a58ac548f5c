"""Provision mode against a REAL Kubernetes cluster (the core scenarios of
``test_provision_mode.py``: create, get, list, logs, traffic, delete, K01).

Off unless ``AGENTAPI_TEST_KUBECONFIG`` names a kubeconfig. Then a real
``agentapi-proxy control-plane`` manages agents in namespace
``AGENTAPI_TEST_NAMESPACE`` (default ``agentapi-proxy-test``, which must
exist, with the Role of ``deploy/`` bound to the kubeconfig's user) using
image ``AGENTAPI_TEST_IMAGE`` (default ``agentapi-proxy:latest``, loaded into
the cluster, e.g. ``kind load docker-image``). Every agent gets a fresh random
id and is deleted again, even when a test fails.

    AGENTAPI_TEST_KUBECONFIG=~/.kube/config \
        .venv/bin/pytest -rs tests/test_provision_real_cluster.py
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

KUBECONFIG = os.environ.get("AGENTAPI_TEST_KUBECONFIG", "")
if not KUBECONFIG:
    pytest.skip(
        "no real cluster: set AGENTAPI_TEST_KUBECONFIG to a kubeconfig (optionally "
        "AGENTAPI_TEST_NAMESPACE, default agentapi-proxy-test, and AGENTAPI_TEST_IMAGE) "
        "to run provision mode against it",
        allow_module_level=True,
    )

import grpc  # noqa: E402
from google.protobuf.duration_pb2 import Duration  # noqa: E402
from kubernetes import client as k8s  # noqa: E402
from kubernetes import config as k8s_config  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402

from agentapi_proxy.v1 import agent_service_pb2 as pb  # noqa: E402
from agentapi_proxy.v1 import agent_service_pb2_grpc as pb_grpc  # noqa: E402
from tests.harness import ProxyProcess, running_proxy, stub  # noqa: E402

NAMESPACE = os.environ.get("AGENTAPI_TEST_NAMESPACE", "agentapi-proxy-test")
IMAGE = os.environ.get("AGENTAPI_TEST_IMAGE", "agentapi-proxy:latest")
# Image pulls and volume provisioning on a real cluster take their time.
READY_SECONDS = 300

pytestmark = pytest.mark.timeout(READY_SECONDS + 120)

Stub = pb_grpc.AgentServiceStub
T = TypeVar("T")


@pytest.fixture(scope="module")
def core() -> Iterator[k8s.CoreV1Api]:
    configuration = k8s.Configuration()
    k8s_config.load_kube_config(
        config_file=os.path.expanduser(KUBECONFIG), client_configuration=configuration
    )
    with k8s.ApiClient(configuration) as api_client:
        yield k8s.CoreV1Api(api_client)


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    env = {
        "AGENTAPI_PROVISION_MODE_ENABLED": "true",
        "AGENTAPI_PROVISION_MODE_KUBECONFIG": os.path.expanduser(KUBECONFIG),
        "AGENTAPI_PROVISION_MODE_NAMESPACE": NAMESPACE,
        "AGENTAPI_PROVISION_MODE_IMAGE": IMAGE,
    }
    state: Path = tmp_path_factory.mktemp("real-plane")
    with running_proxy(state, env=env, command="control-plane") as proxy:
        yield proxy


@pytest.fixture
async def agents(plane: ProxyProcess) -> AsyncIterator[Stub]:
    channel, stub_ = stub(plane.grpc_target)
    try:
        yield stub_
    finally:
        await channel.close()


@pytest.fixture
async def made(agents: Stub) -> AsyncIterator[list[str]]:
    """Ids of agents a test created; each is deleted afterwards, whatever happened."""
    agent_ids: list[str] = []
    yield agent_ids
    for agent_id in agent_ids:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await agents.DeleteAgent(pb.DeleteAgentRequest(agent_id=agent_id))


def fresh_id(length: int = 0) -> str:
    agent_id = "it" + secrets.token_hex(5)
    return agent_id + "a" * max(length - len(agent_id), 0)


async def create_ready(
    agents: Stub, made: list[str], agent_id: str, *, env: dict[str, str]
) -> pb.Agent:
    made.append(agent_id)
    created = await agents.CreateAgent(
        pb.CreateAgentRequest(agent_id=agent_id, session_id="real-cluster", env=env)
    )
    assert created.created
    waited = await agents.WaitAgent(
        pb.WaitAgentRequest(agent_id=agent_id, timeout=Duration(seconds=READY_SECONDS))
    )
    assert waited.agent.state == pb.AGENT_STATE_READY, waited.agent
    return waited.agent


def read_or_none(read: Callable[[], T]) -> T | None:
    try:
        return read()
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


async def test_create_get_list_logs_traffic_delete(
    agents: Stub, made: list[str], core: k8s.CoreV1Api
) -> None:
    agent_id = fresh_id()
    agent = await create_ready(agents, made, agent_id, env={"GREETING": "hi"})
    assert agent.mode == pb.RUNTIME_MODE_STATEFULSET

    pod = await asyncio.to_thread(core.read_namespaced_pod, f"agent-{agent_id}-0", NAMESPACE)
    assert pod.spec.containers[0].image == IMAGE
    claim = await asyncio.to_thread(
        core.read_namespaced_persistent_volume_claim, f"data-agent-{agent_id}-0", NAMESPACE
    )
    assert claim.status.phase == "Bound"

    got = await agents.GetAgent(pb.GetAgentRequest(agent_id=agent_id))
    assert dict(got.agent.env) == {"GREETING": "hi"}
    listed = await agents.ListAgents(pb.ListAgentsRequest(session_id="real-cluster"))
    assert agent_id in {a.agent_id for a in listed.agents}

    logs = b"".join(
        [m.data async for m in agents.StreamLogs(pb.StreamLogsRequest(agent_id=agent_id))]
    )
    assert b"listening" in logs

    async def status_request() -> AsyncIterator[pb.ProxyHTTPRequest]:
        head = pb.HTTPRequestHead(agent_id=agent_id, method="GET", path="/status")
        yield pb.ProxyHTTPRequest(head=head, end_of_body=True)

    messages = [m async for m in agents.ProxyHTTP(status_request())]
    assert messages[0].head.status == 200
    assert b'"status"' in b"".join(m.body for m in messages)

    deleted = await agents.DeleteAgent(pb.DeleteAgentRequest(agent_id=agent_id))
    assert deleted.agent.state == pb.AGENT_STATE_DELETED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await agents.GetAgent(pb.GetAgentRequest(agent_id=agent_id))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    for _ in range(READY_SECONDS):
        claim_left = await asyncio.to_thread(
            read_or_none,
            lambda: core.read_namespaced_persistent_volume_claim(
                f"data-agent-{agent_id}-0", NAMESPACE
            ),
        )
        if claim_left is None:
            break
        await asyncio.sleep(1)
    else:
        raise AssertionError(f"claim data-agent-{agent_id}-0 was not deleted")


async def test_k01_47_characters_refused_and_46_get_a_pod(
    agents: Stub, made: list[str], core: k8s.CoreV1Api
) -> None:
    too_long = fresh_id(47)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await agents.CreateAgent(pb.CreateAgentRequest(agent_id=too_long, session_id="s"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    gone = await asyncio.to_thread(
        read_or_none,
        lambda: k8s.AppsV1Api(core.api_client).read_namespaced_stateful_set(
            f"agent-{too_long}", NAMESPACE
        ),
    )
    assert gone is None

    # The revision hash length varies with the pod template: several specs, not one.
    for n in range(3):
        longest = fresh_id(46)
        made.append(longest)
        await agents.CreateAgent(
            pb.CreateAgentRequest(agent_id=longest, session_id="s", env={"N": "x" * (n + 1)})
        )
        pod_name = f"agent-{longest}-0"
        for _ in range(READY_SECONDS):
            pod = await asyncio.to_thread(
                read_or_none, functools.partial(core.read_namespaced_pod, pod_name, NAMESPACE)
            )
            if pod is not None:
                break
            await asyncio.sleep(1)
        else:
            raise AssertionError(f"no pod for the 46-character agent id {longest}")
