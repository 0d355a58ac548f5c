"""Provision mode end to end: a real control plane against the Kubernetes test double.

Every test drives a real ``agentapi-proxy control-plane`` process over gRPC,
with provision mode on and its kubeconfig pointing at the double
(:mod:`tests.kube_double`), which the real ``kubernetes`` client cannot tell
from an API server. The double grants exactly
:data:`~agentapi_proxy.drivers.statefulset_objects.REQUIRED_RBAC_RULES`, and
each double checks at the end that every call it saw is covered by them.

Most tests share one double and one control plane (module scope) and use
agent ids of their own; faults are reset after each test.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from agentapi_proxy.drivers import statefulset as driver_module
from agentapi_proxy.drivers import statefulset_objects as so
from agentapi_proxy.drivers.statefulset import StatefulSetDriver, load_kube_configuration
from agentapi_proxy.drivers.statefulset_state import Observed, observe
from agentapi_proxy.model import AgentSpec, State
from agentapi_proxy.settings import ProvisionModeSettings, Settings
from agentapi_proxy.stateboard import StateBoard
from agentapi_proxy.v1 import agent_service_pb2 as pb
from agentapi_proxy.v1 import agent_service_pb2_grpc as pb_grpc
from tests.harness import ProxyProcess, running_proxy, stub
from tests.kube_double import KubeDouble, PolicyRule, Timings
from tests.kube_double.status import JsonObject

NAMESPACE = "agents-test"
IMAGE = "registry.example.test/agentapi-agent:v1"
HOLD = "tests.agentapi-proxy/hold"
# Calls the tests make themselves (as kubectl would), not the driver.
TEST_OWN_CALLS = {("", "persistentvolumeclaims", "patch")}
# K10: a settings file sets these, the environment overrides cpu_request only.
CONFIG_YAML = """\
provision_mode:
  resources:
    cpu_request: 500m
    memory_request: 300Mi
    storage_size: 2Gi
"""

Stub = pb_grpc.AgentServiceStub


# --- fixtures -------------------------------------------------------------------------------


def granted_rules() -> list[PolicyRule]:
    return [
        PolicyRule(verbs=rule.verbs, api_groups=(rule.api_group,), resources=(rule.resource,))
        for rule in so.REQUIRED_RBAC_RULES
    ]


def uncovered(used: set[tuple[str, str, str]]) -> set[tuple[str, str, str]]:
    """The (group, resource, verb) calls no rule of REQUIRED_RBAC_RULES grants."""
    return {
        (group, resource, verb)
        for group, resource, verb in used
        if not any(
            rule.api_group == group and rule.resource == resource and verb in rule.verbs
            for rule in so.REQUIRED_RBAC_RULES
        )
    }


@contextlib.contextmanager
def kube_double(directory: Path, **kwargs: Any) -> Iterator[KubeDouble]:
    """A double that grants only the required rules and checks they covered every call."""
    with KubeDouble(directory, namespace=NAMESPACE, **kwargs) as double:
        double.set_rbac_rules(granted_rules())
        yield double
        assert double.internal_errors == []
        assert uncovered(double.permissions_used() - TEST_OWN_CALLS) == set()


def provision_env(kube: KubeDouble, **extra: str) -> dict[str, str]:
    return {
        "AGENTAPI_PROVISION_MODE_ENABLED": "true",
        "AGENTAPI_PROVISION_MODE_KUBECONFIG": str(kube.kubeconfig),
        "AGENTAPI_PROVISION_MODE_NAMESPACE": kube.namespace,
        "AGENTAPI_PROVISION_MODE_IMAGE": IMAGE,
        **extra,
    }


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeDouble]:
    with kube_double(tmp_path_factory.mktemp("kube")) as double:
        yield double


@pytest.fixture(scope="module")
def plane(kube: KubeDouble, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    state = tmp_path_factory.mktemp("plane")
    config = state / "settings.yaml"
    config.write_text(CONFIG_YAML)
    env = provision_env(
        kube,
        AGENTAPI_CONFIG_FILE=str(config),
        AGENTAPI_PROVISION_MODE_RESOURCES_CPU_REQUEST="100m",
    )
    with running_proxy(state, env=env, command="control-plane") as proxy:
        yield proxy
    assert_clean_log(proxy)


def assert_clean_log(proxy: ProxyProcess) -> None:
    """No failure of the control plane's own went unnoticed by the tests."""
    log = proxy.log_text()
    for bad in ("Traceback", " ERROR ", "never awaited", "Task was destroyed", "pool is full"):
        assert bad not in log, log


@pytest.fixture(scope="module")
def second_plane(
    kube: KubeDouble, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """Another control plane on the same namespace, keeping volumes of deleted agents."""
    env = provision_env(kube, AGENTAPI_PROVISION_MODE_PVC_DELETE_POLICY="retain")
    state = tmp_path_factory.mktemp("second-plane")
    with running_proxy(state, env=env, command="control-plane") as proxy:
        yield proxy
    assert_clean_log(proxy)


@pytest.fixture(autouse=True)
def reset_faults(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "kube" not in request.fixturenames:
        return
    double: KubeDouble = request.getfixturevalue("kube")
    double.clear_errors()
    double.set_rbac_rules(granted_rules())
    double.clear_image_pull_failure(IMAGE)
    double.set_insufficient(None)
    double.fail_provisioning(None)
    if not double.list("storageclasses"):
        double.set_default_storage_class("standard")


@pytest.fixture
async def agents(plane: ProxyProcess) -> AsyncIterator[Stub]:
    channel, stub_ = stub(plane.grpc_target)
    try:
        yield stub_
    finally:
        await channel.close()


@pytest.fixture
def api(kube: KubeDouble) -> Iterator[k8s.CoreV1Api]:
    """The test's own client, for what a user would do with kubectl (it may patch claims)."""
    kube.set_rbac_rules(
        [*granted_rules(), PolicyRule(("patch",), ("",), ("persistentvolumeclaims",))]
    )
    configuration = k8s.Configuration()
    k8s_config.load_kube_config(
        config_file=str(kube.kubeconfig), client_configuration=configuration
    )
    with k8s.ApiClient(configuration) as api_client:
        yield k8s.CoreV1Api(api_client)


# --- helpers --------------------------------------------------------------------------------


async def create(agents: Stub, agent_id: str, session_id: str = "s1", **kw: Any) -> pb.Agent:
    response = await agents.CreateAgent(
        pb.CreateAgentRequest(session_id=session_id, agent_id=agent_id, **kw)
    )
    assert response.created
    return response.agent


async def wait_ready(agents: Stub, agent_id: str) -> pb.Agent:
    response = await agents.WaitAgent(
        pb.WaitAgentRequest(agent_id=agent_id, timeout=Duration(seconds=30))
    )
    assert response.agent.state == pb.AGENT_STATE_READY
    return response.agent


async def watch_until(
    agents: Stub, agent_id: str, accept: Callable[[pb.Agent], bool], *, seconds: float = 30
) -> pb.Agent:
    """The first state WatchAgent shows that ``accept`` takes; the deadline is a hang guard."""
    seen: list[tuple[str, str]] = []
    call = agents.WatchAgent(pb.WatchAgentRequest(agent_id=agent_id))
    try:
        async with asyncio.timeout(seconds):
            async for message in call:
                seen.append((pb.AgentState.Name(message.agent.state), message.agent.reason))
                if accept(message.agent):
                    return message.agent
    except TimeoutError:
        pass
    finally:
        call.cancel()
    raise AssertionError(f"agent {agent_id}: wanted state not seen; saw {seen}")


async def expect_error(call: Any, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value


async def read_logs(agents: Stub, agent_id: str, **options: Any) -> bytes:
    call = agents.StreamLogs(pb.StreamLogsRequest(agent_id=agent_id, **options))
    return b"".join([message.data async for message in call])


async def delete_quietly(agents: Stub, *agent_ids: str) -> None:
    for agent_id in agent_ids:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await agents.DeleteAgent(pb.DeleteAgentRequest(agent_id=agent_id))


def retry_after(error: grpc.aio.AioRpcError) -> float:
    metadata = dict(error.trailing_metadata() or ())
    assert "retry-after" in metadata, f"UNAVAILABLE without a retry hint: {error.details()}"
    return float(metadata["retry-after"])


# --- create ---------------------------------------------------------------------------------


class TestCreate:
    async def test_objects_are_named_as_the_design_says_with_the_settings_resources(
        self, kube: KubeDouble, agents: Stub
    ) -> None:
        agent = await create(agents, "obj1", env={"GREETING": "hi"}, labels={"team": "a"})
        assert agent.mode == pb.RUNTIME_MODE_STATEFULSET
        assert agent.state in (pb.AGENT_STATE_PENDING, pb.AGENT_STATE_STARTING)

        sts = kube.get("statefulsets", "agent-obj1")
        assert sts is not None and sts["spec"]["replicas"] == 1
        assert sts["spec"]["serviceName"] == "agent-obj1-headless"
        (container,) = sts["spec"]["template"]["spec"]["containers"]
        assert container["image"] == IMAGE
        # K10: the environment overrides cpu_request; the file's memory_request is kept.
        assert container["resources"]["requests"] == {"cpu": "100m", "memory": "300Mi"}
        assert {"name": "GREETING", "value": "hi"} in container["env"]
        service = kube.get("services", "agent-obj1-headless")
        assert service is not None and service["spec"]["clusterIP"] == "None"
        assert kube.get("configmaps", "agent-obj1-config") is not None

        ready = await wait_ready(agents, "obj1")
        assert ready.address == f"agent-obj1-0.agent-obj1-headless.{NAMESPACE}.svc:3284"
        assert ready.ready_time.seconds > 0
        pod = kube.get("pods", "agent-obj1-0")
        assert pod is not None and pod["status"]["phase"] == "Running"
        claim = kube.get("persistentvolumeclaims", "data-agent-obj1-0")
        assert claim is not None and claim["status"]["phase"] == "Bound"
        assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
        await delete_quietly(agents, "obj1")

    async def test_create_is_idempotent_for_the_same_spec_only(
        self, kube: KubeDouble, agents: Stub
    ) -> None:
        await create(agents, "idem1", env={"A": "1"})
        again = await agents.CreateAgent(
            pb.CreateAgentRequest(session_id="s1", agent_id="idem1", env={"A": "1"})
        )
        assert not again.created and again.agent.agent_id == "idem1"

        error = await expect_error(
            agents.CreateAgent(
                pb.CreateAgentRequest(session_id="s1", agent_id="idem1", env={"A": "2"})
            ),
            grpc.StatusCode.ALREADY_EXISTS,
        )
        assert "different spec" in (error.details() or "")
        assert [s["metadata"]["name"] for s in kube.list("statefulsets")].count("agent-idem1") == 1
        got = await agents.GetAgent(pb.GetAgentRequest(agent_id="idem1"))
        assert dict(got.agent.env) == {"A": "1"}
        await delete_quietly(agents, "idem1")

    async def test_k01_too_long_id_is_refused_before_any_write_and_46_works(
        self, kube: KubeDouble, agents: Stub
    ) -> None:
        kube.clear_requests()
        error = await expect_error(
            agents.CreateAgent(pb.CreateAgentRequest(session_id="s1", agent_id="a" * 47)),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert "52" in (error.details() or "")
        assert [r for r in kube.requests() if r.verb in {"create", "update", "patch"}] == []
        assert kube.get("statefulsets", "agent-" + "a" * 47) is None

        # The revision hash length depends on the pod template, so vary the spec.
        ids = [f"{c}" * 46 for c in "bcdef"]
        for n, agent_id in enumerate(ids):
            await create(agents, agent_id, env={"N": str(n) * (n + 1)}, labels={"v": str(n)})
        for agent_id in ids:
            pod = await asyncio.to_thread(
                kube.wait_for,
                lambda agent_id=agent_id: kube.get("pods", f"agent-{agent_id}-0"),
                what=f"pod of {agent_id[:5]}...",
            )
            assert len(pod["metadata"]["labels"]["controller-revision-hash"]) <= 63
        assert kube.events(reason="FailedCreate") == []
        await delete_quietly(agents, *ids)

    async def test_rbac_denied_is_permission_denied_naming_the_permission_and_leaves_nothing(
        self, kube: KubeDouble, agents: Stub
    ) -> None:
        kube.deny("create", "statefulsets", group="apps")
        error = await expect_error(
            agents.CreateAgent(pb.CreateAgentRequest(session_id="s1", agent_id="rbac1")),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        details = error.details() or ""
        assert 'cannot create resource "statefulsets"' in details
        assert 'API group "apps"' in details
        # What was made before the refusal is removed again.
        assert kube.get("configmaps", "agent-rbac1-config") is None
        assert kube.get("services", "agent-rbac1-headless") is None

        kube.allow("create", "statefulsets", group="apps")
        await create(agents, "rbac1")
        await wait_ready(agents, "rbac1")
        await delete_quietly(agents, "rbac1")

    async def test_unavailable_api_server_is_unavailable_with_a_retry_hint_then_recovers(
        self, kube: KubeDouble, agents: Stub
    ) -> None:
        await create(agents, "down1")
        await wait_ready(agents, "down1")

        kube.set_unavailable(True)
        for call in (
            agents.GetAgent(pb.GetAgentRequest(agent_id="down1")),
            agents.ListAgents(pb.ListAgentsRequest()),
            agents.CreateAgent(pb.CreateAgentRequest(session_id="s1", agent_id="down2")),
        ):
            error = await expect_error(call, grpc.StatusCode.UNAVAILABLE)
            assert retry_after(error) > 0
            assert "not available" in (error.details() or "")
        kube.set_unavailable(False)

        got = await agents.GetAgent(pb.GetAgentRequest(agent_id="down1"))
        assert got.agent.state == pb.AGENT_STATE_READY
        # The watches resumed: a new agent's progress reaches WaitAgent again.
        await create(agents, "down2")
        await wait_ready(agents, "down2")
        await delete_quietly(agents, "down1", "down2")


# --- reading the cluster --------------------------------------------------------------------


class TestClusterIsTheSourceOfTruth:
    async def test_a_second_control_plane_sees_and_changes_the_same_agents(
        self, agents: Stub, second_plane: ProxyProcess
    ) -> None:
        await create(agents, "share1", session_id="shared")
        await create(agents, "share2", session_id="other")
        await wait_ready(agents, "share1")

        channel, other = stub(second_plane.grpc_target)
        try:
            listed = await other.ListAgents(pb.ListAgentsRequest())
            assert {"share1", "share2"} <= {a.agent_id for a in listed.agents}
            in_session = await other.ListAgents(pb.ListAgentsRequest(session_id="shared"))
            assert [a.agent_id for a in in_session.agents] == ["share1"]
            got = await other.GetAgent(pb.GetAgentRequest(agent_id="share1"))
            assert got.agent.state == pb.AGENT_STATE_READY
            assert got.agent.session_id == "shared"

            # A delete through the other replica ends this replica's watch.
            watch = agents.WatchAgent(pb.WatchAgentRequest(agent_id="share1"))
            first = await anext(aiter(watch))
            assert first.agent.state == pb.AGENT_STATE_READY
            await other.DeleteAgent(pb.DeleteAgentRequest(agent_id="share1"))
            async with asyncio.timeout(30):
                states = [message.agent.state async for message in watch]
            assert states[-1] == pb.AGENT_STATE_DELETED
        finally:
            await channel.close()
        await delete_quietly(agents, "share2")

    async def test_list_costs_the_same_number_of_api_calls_for_any_number_of_agents(
        self, kube: KubeDouble, agents: Stub
    ) -> None:
        async def calls_of_one_list() -> list[str]:
            kube.clear_requests()
            listed = await agents.ListAgents(pb.ListAgentsRequest(session_id="count"))
            assert all(a.state == pb.AGENT_STATE_READY for a in listed.agents)
            return sorted(
                f"{r.verb} {r.full_resource}"
                for r in kube.requests()
                if "session-id=count" in r.query.get("labelSelector", "")
            )

        await create(agents, "count0", session_id="count")
        await wait_ready(agents, "count0")
        with_one = await calls_of_one_list()

        more = [f"count{n}" for n in range(1, 6)]
        await asyncio.gather(*(create(agents, agent_id, session_id="count") for agent_id in more))
        await asyncio.gather(*(wait_ready(agents, agent_id) for agent_id in more))
        with_six = await calls_of_one_list()

        assert (
            with_one
            == with_six
            == [
                "list persistentvolumeclaims",
                "list pods",
                "list statefulsets",
            ]
        )
        await delete_quietly(agents, "count0", *more)

    async def test_list_pages_through_every_agent_once_in_id_order(self, agents: Stub) -> None:
        ids = [f"page{n}" for n in range(7)]
        await asyncio.gather(*(create(agents, agent_id, session_id="paged") for agent_id in ids))
        try:
            seen: list[str] = []
            request = pb.ListAgentsRequest(session_id="paged", page_size=3)
            pages = 0
            while True:
                page = await agents.ListAgents(request)
                pages += 1
                assert len(page.agents) <= 3
                seen += [agent.agent_id for agent in page.agents]
                if not page.next_page_token:
                    break
                request.page_token = page.next_page_token
            assert seen == sorted(ids)
            assert pages == 3

            everything = await agents.ListAgents(pb.ListAgentsRequest(session_id="paged"))
            assert [a.agent_id for a in everything.agents] == sorted(ids)
            assert everything.next_page_token == ""
        finally:
            await delete_quietly(agents, *ids)

    @pytest.mark.parametrize(
        ("request_fields", "complaint"),
        [
            ({"page_size": -1}, "page_size must not be negative"),
            ({"page_token": "not-a-token"}, "is not a next_page_token"),
            ({"page_token": "e30"}, "is not a next_page_token"),  # base64 of {}
            # Nested 5,000 deep: json.loads would raise RecursionError.
            ({"page_token": "W1tb" * 1666}, "is not a next_page_token"),
            # {"v": true, "after": "", "session": ""}: a bool is not the version number.
            (
                {"page_token": "eyJ2IjogdHJ1ZSwgImFmdGVyIjogIiIsICJzZXNzaW9uIjogIiJ9"},
                "is not a next_page_token",
            ),
        ],
    )
    async def test_bad_paging_is_invalid_argument(
        self, agents: Stub, request_fields: dict[str, Any], complaint: str
    ) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await agents.ListAgents(pb.ListAgentsRequest(**request_fields))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert complaint in (caught.value.details() or "")

    async def test_a_page_token_only_continues_the_listing_it_came_from(self, agents: Stub) -> None:
        ids = ["tok0", "tok1"]
        await asyncio.gather(*(create(agents, agent_id, session_id="tokens") for agent_id in ids))
        try:
            first = await agents.ListAgents(pb.ListAgentsRequest(session_id="tokens", page_size=1))
            assert first.next_page_token
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await agents.ListAgents(
                    pb.ListAgentsRequest(session_id="other", page_token=first.next_page_token)
                )
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "another session_id" in (caught.value.details() or "")
        finally:
            await delete_quietly(agents, *ids)


# --- delete ---------------------------------------------------------------------------------


class TestCutShort:
    """The control plane killed (kill -9) in the middle of a create or a delete."""

    @staticmethod
    def companions(kube: KubeDouble, agent_id: str) -> list[JsonObject | None]:
        return [
            kube.get("configmaps", so.configmap_name(agent_id)),
            kube.get("services", so.service_name(agent_id)),
        ]

    async def test_a_create_cut_short_is_completed_by_the_restart(
        self, kube: KubeDouble, tmp_path: Path
    ) -> None:
        # The ConfigMap's create hangs long enough to kill the control plane after the
        # StatefulSet exists and before its companions do.
        kube.set_latency(4.0, verb="create", resource="configmaps")
        env = provision_env(kube)
        with running_proxy(tmp_path / "first", env=env, command="control-plane") as first:
            channel, agents = stub(first.grpc_target)
            try:
                creating = asyncio.ensure_future(create(agents, "cut1"))
                await asyncio.to_thread(
                    kube.wait_for,
                    lambda: kube.get("statefulsets", so.statefulset_name("cut1")),
                    what="the StatefulSet",
                )
                first.stop(signal.SIGKILL)
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await creating
            finally:
                await channel.close()
        kube.set_latency(0, verb="create", resource="configmaps")
        statefulset = kube.get("statefulsets", so.statefulset_name("cut1"))
        assert statefulset is not None

        with running_proxy(tmp_path / "second", env=env, command="control-plane") as second:
            channel, agents = stub(second.grpc_target)
            try:
                # The restart adds what the create had not made, owned by the StatefulSet.
                for made in await asyncio.to_thread(
                    kube.wait_for,
                    lambda: all(self.companions(kube, "cut1")) and self.companions(kube, "cut1"),
                    what="the ConfigMap and Service",
                ):
                    assert made is not None
                    refs = made["metadata"]["ownerReferences"]
                    assert [(r["kind"], r["uid"]) for r in refs] == [
                        ("StatefulSet", statefulset["metadata"]["uid"])
                    ]
                assert (await wait_ready(agents, "cut1")).state == pb.AGENT_STATE_READY
                again = await agents.CreateAgent(
                    pb.CreateAgentRequest(session_id="s1", agent_id="cut1")
                )
                assert not again.created
                await agents.DeleteAgent(pb.DeleteAgentRequest(agent_id="cut1"))
            finally:
                await channel.close()
            assert_clean_log(second)
        await asyncio.to_thread(
            kube.wait_for,
            lambda: not any(self.companions(kube, "cut1")),
            what="the companions to go",
        )

    async def test_a_delete_cut_short_leaves_no_object_behind(
        self, kube: KubeDouble, tmp_path: Path
    ) -> None:
        env = provision_env(kube)
        with running_proxy(tmp_path / "first", env=env, command="control-plane") as first:
            channel, agents = stub(first.grpc_target)
            try:
                await create(agents, "cut2")
                await wait_ready(agents, "cut2")
                # The Service's delete hangs: kill the control plane while it waits.
                kube.set_latency(4.0, verb="delete", resource="services")
                deleting = asyncio.ensure_future(
                    agents.DeleteAgent(pb.DeleteAgentRequest(agent_id="cut2"))
                )
                await asyncio.to_thread(
                    kube.wait_for,
                    lambda: kube.get("statefulsets", so.statefulset_name("cut2")) is None,
                    what="the StatefulSet to go",
                )
                first.stop(signal.SIGKILL)
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await deleting
            finally:
                kube.set_latency(0, verb="delete", resource="services")
                await channel.close()

        # The garbage collector removes what the StatefulSet owned; nothing is left.
        await asyncio.to_thread(
            kube.wait_for,
            lambda: (
                not any(self.companions(kube, "cut2"))
                and kube.get("pods", so.pod_name("cut2")) is None
            ),
            what="every object of the agent to go",
        )
        with running_proxy(tmp_path / "second", env=env, command="control-plane") as second:
            channel, agents = stub(second.grpc_target)
            try:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await agents.GetAgent(pb.GetAgentRequest(agent_id="cut2"))
                assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            finally:
                await channel.close()


class TestDelete:
    async def test_delete_removes_every_object_and_the_claim(
        self, kube: KubeDouble, agents: Stub
    ) -> None:
        await create(agents, "del1")
        await wait_ready(agents, "del1")

        deleted = await agents.DeleteAgent(pb.DeleteAgentRequest(agent_id="del1"))
        assert deleted.agent.state == pb.AGENT_STATE_DELETED
        assert kube.get("statefulsets", "agent-del1") is None
        assert kube.get("services", "agent-del1-headless") is None
        assert kube.get("configmaps", "agent-del1-config") is None
        await asyncio.to_thread(
            kube.wait_for,
            lambda: (
                kube.get("persistentvolumeclaims", "data-agent-del1-0") is None
                and kube.get("pods", "agent-del1-0") is None
            ),
            what="claim and pod of del1 gone",
        )
        await expect_error(
            agents.GetAgent(pb.GetAgentRequest(agent_id="del1")), grpc.StatusCode.NOT_FOUND
        )
        await expect_error(
            agents.DeleteAgent(pb.DeleteAgentRequest(agent_id="del1")), grpc.StatusCode.NOT_FOUND
        )

    async def test_k02_reusing_an_id_while_its_claim_is_deleted_is_unavailable_not_stuck(
        self, kube: KubeDouble, agents: Stub, api: k8s.CoreV1Api
    ) -> None:
        await create(agents, "r1")
        await wait_ready(agents, "r1")
        old_claim = kube.get("persistentvolumeclaims", "data-agent-r1-0")
        assert old_claim is not None
        # Hold the claim in "Terminating" for as long as this test wants.
        await asyncio.to_thread(
            api.patch_namespaced_persistent_volume_claim,
            "data-agent-r1-0",
            NAMESPACE,
            [{"op": "add", "path": "/metadata/finalizers/-", "value": HOLD}],
        )
        await agents.DeleteAgent(pb.DeleteAgentRequest(agent_id="r1"))

        error = await expect_error(
            agents.CreateAgent(pb.CreateAgentRequest(session_id="s1", agent_id="r1")),
            grpc.StatusCode.UNAVAILABLE,
        )
        assert "data-agent-r1-0" in (error.details() or "")
        assert retry_after(error) > 0
        assert kube.get("statefulsets", "agent-r1") is None

        claim = kube.get("persistentvolumeclaims", "data-agent-r1-0")
        assert claim is not None
        await asyncio.to_thread(
            api.patch_namespaced_persistent_volume_claim,
            "data-agent-r1-0",
            NAMESPACE,
            [
                {
                    "op": "replace",
                    "path": "/metadata/finalizers",
                    "value": [f for f in claim["metadata"]["finalizers"] if f != HOLD],
                }
            ],
        )
        # The client does what the hint says until the old claim is gone.
        for _ in range(30):
            try:
                await create(agents, "r1")
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                await asyncio.sleep(min(retry_after(exc), 0.5))
        await wait_ready(agents, "r1")
        new_claim = kube.get("persistentvolumeclaims", "data-agent-r1-0")
        assert new_claim is not None and new_claim["status"]["phase"] == "Bound"
        assert new_claim["metadata"]["uid"] != old_claim["metadata"]["uid"]
        await delete_quietly(agents, "r1")

    async def test_k02_immediate_reuse_without_help_ends_ready(
        self, kube: KubeDouble, agents: Stub
    ) -> None:
        await create(agents, "r2")
        await wait_ready(agents, "r2")
        await agents.DeleteAgent(pb.DeleteAgentRequest(agent_id="r2"))
        for _ in range(60):
            try:
                await create(agents, "r2")
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                await asyncio.sleep(min(retry_after(exc), 0.2))
        await wait_ready(agents, "r2")
        await delete_quietly(agents, "r2")

    async def test_retain_policy_keeps_the_claim_for_the_next_agent_with_the_id(
        self, kube: KubeDouble, second_plane: ProxyProcess
    ) -> None:
        channel, other = stub(second_plane.grpc_target)
        try:
            await create(other, "keep1")
            await wait_ready(other, "keep1")
            claim = kube.get("persistentvolumeclaims", "data-agent-keep1-0")
            assert claim is not None

            await other.DeleteAgent(pb.DeleteAgentRequest(agent_id="keep1"))
            assert kube.get("statefulsets", "agent-keep1") is None
            await asyncio.to_thread(
                kube.wait_for,
                lambda: kube.get("pods", "agent-keep1-0") is None,
                what="pod of keep1 gone",
            )
            kept = kube.get("persistentvolumeclaims", "data-agent-keep1-0")
            assert kept is not None and not kept["metadata"].get("deletionTimestamp")

            await create(other, "keep1")
            await wait_ready(other, "keep1")
            reused = kube.get("persistentvolumeclaims", "data-agent-keep1-0")
            assert reused is not None
            assert reused["metadata"]["uid"] == claim["metadata"]["uid"]
            await other.DeleteAgent(pb.DeleteAgentRequest(agent_id="keep1"))
        finally:
            await channel.close()


# --- troubleshooting: every problem is a state and a reason ---------------------------------


class TestTroubleshooting:
    async def test_image_pull_failure_is_failed_with_the_pull_error(
        self, kube: KubeDouble, agents: Stub
    ) -> None:
        kube.fail_image_pull(IMAGE)
        await create(agents, "pull1")
        failed = await watch_until(agents, "pull1", lambda a: a.state == pb.AGENT_STATE_FAILED)
        assert failed.reason in {"ErrImagePull", "ImagePullBackOff"}
        assert "image" in failed.message and "not found" in failed.message

        error = await expect_error(
            agents.WaitAgent(pb.WaitAgentRequest(agent_id="pull1")),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        assert "ImagePull" in (error.details() or "") or "ErrImagePull" in (error.details() or "")
        # K03: a follower of a container that cannot start is told why.
        error = await expect_error(
            read_logs(agents, "pull1", follow=True), grpc.StatusCode.FAILED_PRECONDITION
        )
        assert re.search(r"ErrImagePull|ImagePullBackOff", error.details() or "")
        await delete_quietly(agents, "pull1")

    async def test_missing_storage_class_is_pending_until_one_exists(
        self, kube: KubeDouble, agents: Stub
    ) -> None:
        kube.set_default_storage_class(None)
        await create(agents, "nosc1")
        pending = await watch_until(agents, "nosc1", lambda a: a.reason == "NoStorageClass")
        assert pending.state == pb.AGENT_STATE_PENDING
        assert "StorageClass" in pending.message
        error = await expect_error(
            read_logs(agents, "nosc1", follow=True), grpc.StatusCode.FAILED_PRECONDITION
        )
        assert "NoStorageClass" in (error.details() or "")

        kube.set_default_storage_class("standard")
        await wait_ready(agents, "nosc1")
        await delete_quietly(agents, "nosc1")

    async def test_failed_volume_provisioning_is_pending_with_the_provisioner_message(
        self, kube: KubeDouble, agents: Stub
    ) -> None:
        kube.fail_provisioning("not enough free space in pool fast-ssd")
        await create(agents, "prov1")
        pending = await watch_until(agents, "prov1", lambda a: a.reason == "ProvisioningFailed")
        assert pending.state == pb.AGENT_STATE_PENDING
        assert "not enough free space in pool fast-ssd" in pending.message
        assert "data-agent-prov1-0" in pending.message

        kube.fail_provisioning(None)
        await wait_ready(agents, "prov1")
        await delete_quietly(agents, "prov1")

    async def test_insufficient_capacity_is_pending_unschedulable(
        self, kube: KubeDouble, agents: Stub
    ) -> None:
        kube.set_insufficient("cpu")
        await create(agents, "cap1")
        pending = await watch_until(agents, "cap1", lambda a: a.reason == "Unschedulable")
        assert pending.state == pb.AGENT_STATE_PENDING
        assert "Insufficient cpu" in pending.message
        error = await expect_error(read_logs(agents, "cap1"), grpc.StatusCode.FAILED_PRECONDITION)
        assert "Unschedulable" in (error.details() or "")

        kube.set_insufficient(None)
        await wait_ready(agents, "cap1")
        await delete_quietly(agents, "cap1")

    async def test_crash_loop_is_failed_with_exit_code_and_previous_logs_show_the_last_run(
        self, kube: KubeDouble, agents: Stub
    ) -> None:
        await create(agents, "crash1")
        await wait_ready(agents, "crash1")
        error = await expect_error(
            read_logs(agents, "crash1", previous=True), grpc.StatusCode.FAILED_PRECONDITION
        )
        assert "no previous run" in (error.details() or "")

        kube.crash_loop("agent-crash1-0", exit_code=3, last_words="panic: the disk is full\n")
        failed = await watch_until(
            agents, "crash1", lambda a: a.reason == "CrashLoopBackOff" and a.restart_count >= 1
        )
        assert failed.state == pb.AGENT_STATE_FAILED
        assert failed.exit_code == 3 and failed.restart_count >= 1
        assert "exit code 3" in failed.message
        # GetAgent shows how the failed run ended, as in legacy mode.
        got = (await agents.GetAgent(pb.GetAgentRequest(agent_id="crash1"))).agent
        assert got.state == pb.AGENT_STATE_FAILED
        assert got.log_tail.endswith("panic: the disk is full\n")

        kube.stop_crash_loop("agent-crash1-0")
        # WaitAgent gives up on FAILED; the kubelet restarts it anyway, so watch instead.
        recovered = await watch_until(agents, "crash1", lambda a: a.state == pb.AGENT_STATE_READY)
        assert recovered.restart_count >= 1
        kube.append_log("agent-crash1-0", "last words of the run before\n", previous=True)
        previous = await read_logs(agents, "crash1", previous=True)
        assert previous == b"panic: the disk is full\nlast words of the run before\n"
        await delete_quietly(agents, "crash1")

    async def test_agent_that_cannot_be_reached_answers_with_the_api_servers_error(
        self, agents: Stub
    ) -> None:
        # Nothing serves the pod's port (like a wrong Service or a network policy).
        await create(agents, "noconn1")
        await wait_ready(agents, "noconn1")
        head, body = await proxy_http(agents, "noconn1", "GET", "/status")
        assert head.status == 503
        assert b"connection refused" in body
        await delete_quietly(agents, "noconn1")


# --- logs -----------------------------------------------------------------------------------


class TestLogs:
    async def test_log_options_reach_the_pod_log_api(self, kube: KubeDouble, agents: Stub) -> None:
        await create(agents, "log1")
        await wait_ready(agents, "log1")
        kube.append_log("agent-log1-0", "one\ntwo\nthree\n")

        assert await read_logs(agents, "log1") == b"one\ntwo\nthree\n"
        assert await read_logs(agents, "log1", tail_lines=2) == b"two\nthree\n"
        assert await read_logs(agents, "log1", limit_bytes=5) == b"one\nt"
        stamped = (await read_logs(agents, "log1", timestamps=True)).decode().splitlines()
        assert [line.split(" ", 1)[1] for line in stamped] == ["one", "two", "three"]
        assert all(re.match(r"\d{4}-\d\d-\d\dT[\d:.]+Z$", line.split(" ")[0]) for line in stamped)

        queries = [r.query for r in kube.requests(resource="pods/log", name="agent-log1-0")]
        assert {"tailLines": "2"}.items() <= queries[1].items()
        assert {"limitBytes": "5"}.items() <= queries[2].items()
        assert {"timestamps": "true"}.items() <= queries[3].items()
        await delete_quietly(agents, "log1")

    async def test_a_followed_log_ends_with_a_reason_when_the_agent_is_deleted(
        self, kube: KubeDouble, agents: Stub
    ) -> None:
        await create(agents, "log2")
        await wait_ready(agents, "log2")
        kube.append_log("agent-log2-0", "started\n")
        call = agents.StreamLogs(pb.StreamLogsRequest(agent_id="log2", follow=True))
        stream = aiter(call)
        assert (await anext(stream)).data == b"started\n"
        kube.append_log("agent-log2-0", "later\n")
        assert (await anext(stream)).data == b"later\n"

        await agents.DeleteAgent(pb.DeleteAgentRequest(agent_id="log2"))
        async with asyncio.timeout(30):
            rest = [message async for message in stream]
        assert rest and rest[-1].end.reason == "AgentDeleted"
        assert await call.code() == grpc.StatusCode.OK


class TestSlowApiServer:
    async def test_k04_a_slow_call_does_not_hold_up_the_others(
        self, kube: KubeDouble, agents: Stub
    ) -> None:
        await create(agents, "fast1")
        await wait_ready(agents, "fast1")
        kube.append_log("agent-fast1-0", "still here\n")
        follower = agents.StreamLogs(pb.StreamLogsRequest(agent_id="fast1", follow=True))
        assert (await anext(aiter(follower))).data == b"still here\n"

        kube.set_latency(4.0, verb="create", resource="configmaps")
        kube.clear_requests()
        try:

            async def create_slowly() -> pb.CreateAgentResponse:
                return await agents.CreateAgent(
                    pb.CreateAgentRequest(session_id="s1", agent_id="slow1")
                )

            slow = asyncio.create_task(create_slowly())
            await asyncio.to_thread(
                kube.wait_for,
                lambda: kube.requests(verb="create", resource="configmaps"),
                what="the slow create to reach the API server",
            )
            got = await agents.GetAgent(pb.GetAgentRequest(agent_id="fast1"))
            listed = await agents.ListAgents(pb.ListAgentsRequest())
            logs = await read_logs(agents, "fast1")
            assert got.agent.state == pb.AGENT_STATE_READY
            assert "fast1" in {a.agent_id for a in listed.agents}
            assert logs == b"still here\n"
            assert not slow.done(), "the other calls waited for the slow one"
        finally:
            kube.set_latency(0, verb="create", resource="configmaps")
        assert (await slow).created
        follower.cancel()
        await delete_quietly(agents, "fast1", "slow1")


# --- agent traffic --------------------------------------------------------------------------


async def proxy_http(
    agents: Stub, agent_id: str, method: str, path: str, body: bytes = b""
) -> tuple[pb.HTTPResponseHead, bytes]:
    async def requests() -> AsyncIterator[pb.ProxyHTTPRequest]:
        headers = [pb.HTTPHeader(name="Content-Type", value="application/json")] if body else []
        head = pb.HTTPRequestHead(agent_id=agent_id, method=method, path=path, headers=headers)
        yield pb.ProxyHTTPRequest(head=head, body=body, end_of_body=True)

    messages = [message async for message in agents.ProxyHTTP(requests())]
    return messages[0].head, b"".join(m.body for m in messages)


@pytest.fixture
def reference_agent() -> Iterator[int]:
    """A real reference agent on 127.0.0.1, standing in for the agent pod's container."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agentapi_proxy.reference_agent",
            "--port",
            "0",
            "--allowed-hosts",
            "*",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        port = 0
        for line in process.stdout:
            if match := re.search(r"listening on http://127\.0\.0\.1:(\d+)", line):
                port = int(match[1])
                break
        assert port, "the reference agent did not start"
        yield port
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


class TestTraffic:
    async def test_proxy_http_reaches_the_agent_through_the_api_servers_pod_proxy(
        self, kube: KubeDouble, agents: Stub, reference_agent: int
    ) -> None:
        await create(agents, "web1")
        await wait_ready(agents, "web1")
        kube.serve_pod("agent-web1-0", ("127.0.0.1", reference_agent))

        head, body = await proxy_http(agents, "web1", "GET", "/status")
        assert head.status == 200, body
        assert b'"status"' in body
        head, body = await proxy_http(
            agents, "web1", "POST", "/message", b'{"content": "hello", "type": "user"}'
        )
        assert head.status == 200, body
        head, body = await proxy_http(agents, "web1", "GET", "/messages")
        assert b"hello" in body

        through = kube.requests(resource="pods/proxy", name="agent-web1-0:3284")
        assert {r.verb for r in through} == {"get", "create"}
        await delete_quietly(agents, "web1")


# --- K03 with a slow image pull (a double and a control plane of its own) --------------------


@pytest.fixture
def slow_start_kube(tmp_path: Path) -> Iterator[KubeDouble]:
    """A double whose containers take 1.5 s to start, like a slow image pull."""
    with kube_double(tmp_path / "slow-kube", timings=Timings(start=1.5)) as double:
        yield double


async def test_k03_logs_followed_right_after_create_wait_for_the_container(
    tmp_path: Path, slow_start_kube: KubeDouble
) -> None:
    kube = slow_start_kube
    env = provision_env(kube)
    with running_proxy(tmp_path / "plane", env=env, command="control-plane") as plane:
        channel, agents = stub(plane.grpc_target)
        try:
            await create(agents, "early1")
            kube.append_log("agent-early1-0", "first line\n", container="agent")
            call = agents.StreamLogs(pb.StreamLogsRequest(agent_id="early1", follow=True))
            async with asyncio.timeout(30):
                first = await anext(aiter(call))
            assert first.data == b"first line\n"
            # The follower asked for the log once, after the container started.
            opened = kube.requests(resource="pods/log", name="agent-early1-0")
            assert len(opened) == 1 and opened[0].query.get("follow") == "true"
            call.cancel()
            await agents.DeleteAgent(pb.DeleteAgentRequest(agent_id="early1"))
        finally:
            await channel.close()


# --- switching modes ------------------------------------------------------------------------


@pytest.fixture
def own_kube(tmp_path: Path) -> Iterator[KubeDouble]:
    with kube_double(tmp_path / "own-kube") as double:
        yield double


async def test_provision_mode_refuses_to_start_while_legacy_agents_exist(
    tmp_path: Path, own_kube: KubeDouble
) -> None:
    state = tmp_path / "state"
    with running_proxy(state, command="control-plane") as legacy:
        channel, agents = stub(legacy.grpc_target)
        try:
            for agent_id in ("legacy1", "legacy2"):
                await agents.CreateAgent(pb.CreateAgentRequest(session_id="s1", agent_id=agent_id))
        finally:
            await channel.close()
        # The legacy control plane stops; its agents keep running, as after any restart.
        legacy.stop()

        switched = ProxyProcess(state, env=provision_env(own_kube), command="control-plane")
        try:
            with pytest.raises(RuntimeError) as refused:
                switched.start()
            assert switched.proc is not None and switched.proc.wait(30) == 2
        finally:
            if switched.proc is not None and switched.proc.poll() is None:
                switched.stop()
        message = str(refused.value)
        assert "legacy1, legacy2" in message
        assert "provision mode" in message and "DeleteAgent" in message
        assert own_kube.requests() == []


async def test_legacy_mode_refuses_to_start_while_provision_agents_exist(
    tmp_path: Path, own_kube: KubeDouble
) -> None:
    with running_proxy(
        tmp_path / "provision", env=provision_env(own_kube), command="control-plane"
    ) as provision:
        channel, agents = stub(provision.grpc_target)
        try:
            await agents.CreateAgent(pb.CreateAgentRequest(session_id="s1", agent_id="kube1"))
        finally:
            await channel.close()

    # Switched back without deleting: the kubeconfig is still configured.
    env = provision_env(own_kube, AGENTAPI_PROVISION_MODE_ENABLED="false")
    switched = ProxyProcess(tmp_path / "legacy", env=env, command="control-plane")
    try:
        with pytest.raises(RuntimeError) as refused:
            switched.start()
        assert switched.proc is not None and switched.proc.wait(30) == 2
    finally:
        if switched.proc is not None and switched.proc.poll() is None:
            switched.stop()
    assert "kube1" in str(refused.value) and "DeleteAgent" in str(refused.value)


# --- watches (the driver in this process, to shorten its watch timeout) ---------------------


async def board_state(board: StateBoard, agent_id: str, state: State) -> None:
    """Wait until the board shows ``state`` (DELETED: forgets the agent); a hang guard."""
    async with asyncio.timeout(30):
        while True:
            info = board.get(agent_id)
            if (info is None and state is State.DELETED) or (info and info.state is state):
                return
            await asyncio.sleep(0.02)


def delete_statefulset(kube: KubeDouble, name: str) -> None:
    """What ``kubectl delete statefulset`` does, with the test's own client."""
    configuration = k8s.Configuration()
    k8s_config.load_kube_config(
        config_file=str(kube.kubeconfig), client_configuration=configuration
    )
    with k8s.ApiClient(configuration) as api_client:
        k8s.AppsV1Api(api_client).delete_namespaced_stateful_set(name, NAMESPACE)


async def test_an_expired_watch_lists_again_and_changes_keep_reaching_the_board(
    own_kube: KubeDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(driver_module, "WATCH_SECONDS", 1)
    kube = own_kube
    settings = Settings(
        provision_mode=ProvisionModeSettings(
            enabled=True, namespace=NAMESPACE, image=IMAGE, kubeconfig=str(kube.kubeconfig)
        )
    )
    configuration, in_cluster = load_kube_configuration(str(kube.kubeconfig))
    board = StateBoard()
    driver = StatefulSetDriver(
        settings, board=board, configuration=configuration, in_cluster=in_cluster
    )
    await driver.start()
    try:
        await driver.create(AgentSpec(agent_id="w1", session_id="s1"))
        await board_state(board, "w1", State.READY)

        # The StatefulSet watch breaks (each lasts a second) while w2 is created ...
        kube.inject_error(503, verb="watch", resource="statefulsets")
        await asyncio.to_thread(
            kube.wait_for,
            lambda: [r for r in kube.requests(verb="watch") if r.status == 503],
            what="a refused watch",
        )
        await driver.create(AgentSpec(agent_id="w2", session_id="s1"))
        await board_state(board, "w2", State.READY)
        # ... and the API server forgets the versions it missed: resuming gets 410 Gone.
        lists = len(kube.requests(verb="list", resource="statefulsets"))
        kube.compact()
        kube.clear_errors()
        await asyncio.to_thread(
            kube.wait_for,
            lambda: len(kube.requests(verb="list", resource="statefulsets")) > lists,
            what="a new list after 410 Gone",
        )
        # A StatefulSet deleted behind the driver's back reaches the board through the new watch.
        await asyncio.to_thread(delete_statefulset, kube, "agent-w1")
        await board_state(board, "w1", State.DELETED)
        await driver.delete("w2")
    finally:
        await driver.close()


async def test_shutdown_ends_open_log_followers_with_unavailable(
    tmp_path: Path, own_kube: KubeDouble
) -> None:
    kube = own_kube
    env = provision_env(kube, AGENTAPI_SERVER_SHUTDOWN_GRACE_SECONDS="30")
    with running_proxy(tmp_path / "plane", env=env, command="control-plane") as plane:
        channel, agents = stub(plane.grpc_target)
        try:
            await create(agents, "bye1")
            await wait_ready(agents, "bye1")
            kube.append_log("agent-bye1-0", "hello\n")
            follower = agents.StreamLogs(pb.StreamLogsRequest(agent_id="bye1", follow=True))
            assert (await anext(aiter(follower))).data == b"hello\n"

            # Well within the 30 s grace period: the driver ends the stream itself.
            stopping = asyncio.create_task(asyncio.to_thread(plane.stop, timeout=10))
            assert await follower.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in (await follower.details() or "")
            assert await stopping == 0
        finally:
            await channel.close()


# --- the state of an agent from its objects (pure) ------------------------------------------


def sts_obj(uid: str = "sts-2") -> dict[str, Any]:
    return {"metadata": {"name": "agent-r1", "uid": uid}}


def pod_obj(owner: str = "sts-2", **status: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "agent-r1-0",
            "uid": "pod-1",
            "ownerReferences": [{"uid": owner, "controller": True}],
        },
        "status": status,
    }


def warning(uid: str, reason: str, message: str) -> dict[str, Any]:
    return {
        "type": "Warning",
        "reason": reason,
        "message": message,
        "involvedObject": {"uid": uid},
        "lastTimestamp": "2026-01-01T00:00:00Z",
    }


class TestObserve:
    def test_warnings_about_an_earlier_agent_with_the_same_names_do_not_count(self) -> None:
        old = warning("sts-1", "FailedCreate", "pods already exists")
        assert observe(sts_obj(), None, None, [old]).state is State.PENDING
        new = warning("sts-2", "FailedCreate", "exceeded quota: pods=1")
        failed = observe(sts_obj(), None, None, [old, new])
        assert (failed.state, failed.reason) == (State.FAILED, "FailedCreate")
        assert "quota" in failed.message

    def test_the_pod_of_an_earlier_statefulset_is_reported_as_still_stopping(self) -> None:
        observed = observe(sts_obj(), pod_obj(owner="sts-1", phase="Running"), None)
        assert (observed.state, observed.reason) == (State.PENDING, "OldPodTerminating")

    def test_unready_only_after_having_been_ready_in_this_run(self) -> None:
        container = {
            "name": "agent",
            "restartCount": 0,
            "state": {"running": {"startedAt": "2026-01-01T00:00:05Z"}},
        }

        def with_ready_false_since(moment: str) -> Observed:
            condition = {"type": "Ready", "status": "False", "lastTransitionTime": moment}
            pod = pod_obj(phase="Running", conditions=[condition], containerStatuses=[container])
            return observe(sts_obj(), pod, None)

        assert with_ready_false_since("2026-01-01T00:00:01Z").state is State.STARTING
        unready = with_ready_false_since("2026-01-01T00:00:09Z")
        assert (unready.state, unready.reason) == (State.UNREADY, "ProbeFailed")
