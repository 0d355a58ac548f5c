"""The Kubernetes objects of one agent in provision mode, built without a cluster."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from agentapi_proxy.drivers import statefulset_objects as so
from agentapi_proxy.errors import FailedPrecondition, InvalidArgument
from agentapi_proxy.model import AgentSpec
from agentapi_proxy.settings import Settings, load_settings

K8S_VERSION = kubernetes_validate.latest_version()

SPEC = AgentSpec(
    agent_id="r1",
    session_id="my-session",
    owner="alice@example.com",
    env={"ANTHROPIC_MODEL": "claude", "EMPTY": "", "UNICODE": "日本語"},
    labels={"team": "infra", "example.com/tier": "gold", "empty": ""},
)


@pytest.fixture
def load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """load_settings seeing only the given environment and files in tmp_path."""
    if Path("/etc/agentapi").exists():
        pytest.skip("/etc/agentapi exists on this machine and would change the settings")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("AGENTAPI_CONFIG_FILE", raising=False)

    def load_from(environ: Mapping[str, str] | None = None) -> Settings:
        return load_settings(environ=dict(environ or {}), cwd=tmp_path)

    return load_from


def container_of(sts: so.StatefulSet) -> so.Container:
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    return container


def validate_strict(obj: Mapping[str, Any]) -> None:
    kubernetes_validate.validate(dict(obj), K8S_VERSION, strict=True)


# --- names --------------------------------------------------------------------


def test_names_follow_the_design_document() -> None:
    assert so.statefulset_name("r1") == "agent-r1"
    assert so.service_name("r1") == "agent-r1-headless"
    assert so.pod_name("r1") == "agent-r1-0"
    assert so.pvc_name("r1") == "data-agent-r1-0"
    assert so.configmap_name("r1") == "agent-r1-config"


def test_built_objects_carry_those_names_and_the_pvc_name_follows_from_them() -> None:
    configmap, service, sts = so.build_objects(Settings(), SPEC)

    assert configmap["metadata"]["name"] == "agent-r1-config"
    assert service["metadata"]["name"] == "agent-r1-headless"
    assert sts["metadata"]["name"] == "agent-r1"
    assert sts["spec"]["serviceName"] == "agent-r1-headless"
    # The controller names pods {sts}-{ordinal} and claims {template}-{pod}.
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert f"{sts['metadata']['name']}-0" == so.pod_name("r1")
    assert f"{claim['metadata']['name']}-{so.pod_name('r1')}" == "data-agent-r1-0"
    assert container_of(sts)["envFrom"] == [{"configMapRef": {"name": "agent-r1-config"}}]


# --- settings reach the objects -----------------------------------------------


def test_defaults_are_those_of_the_design_document(load: Any) -> None:
    configmap, service, sts = so.build_objects(load(), SPEC)

    for obj in (configmap, service, sts):
        assert obj["metadata"]["namespace"] == "agentapi-proxy"
    container = container_of(sts)
    assert container["image"] == "agentapi-proxy:latest"
    assert container["resources"] == {
        "requests": {"cpu": "100m", "memory": "256Mi"},
        "limits": {"cpu": "500m", "memory": "512Mi"},
    }
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"] == {"requests": {"storage": "1Gi"}}
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_environment_overrides_reach_the_statefulset(load: Any) -> None:
    # The "custom settings" example of the design document, plus namespace and image.
    settings = load(
        {
            "AGENTAPI_PROVISION_MODE_ENABLED": "true",
            "AGENTAPI_PROVISION_MODE_NAMESPACE": "team-a",
            "AGENTAPI_PROVISION_MODE_IMAGE": "registry.example.com/agent:1.2",
            "AGENTAPI_PROVISION_MODE_RESOURCES_CPU_REQUEST": "500m",
            "AGENTAPI_PROVISION_MODE_RESOURCES_CPU_LIMIT": "2000m",
            "AGENTAPI_PROVISION_MODE_RESOURCES_MEMORY_REQUEST": "1Gi",
            "AGENTAPI_PROVISION_MODE_RESOURCES_MEMORY_LIMIT": "2Gi",
            "AGENTAPI_PROVISION_MODE_RESOURCES_STORAGE_SIZE": "5Gi",
            "AGENTAPI_PROVISION_MODE_CONTAINER_PORT": "8000",
            "AGENTAPI_PROVISION_MODE_PROBE_PATH": "/healthz",
        }
    )
    configmap, service, sts = so.build_objects(settings, SPEC)

    for obj in (configmap, service, sts):
        assert obj["metadata"]["namespace"] == "team-a"
    container = container_of(sts)
    assert container["image"] == "registry.example.com/agent:1.2"
    assert container["resources"] == {
        "requests": {"cpu": "500m", "memory": "1Gi"},
        "limits": {"cpu": "2000m", "memory": "2Gi"},
    }
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "5Gi"

    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    for probe in (container["livenessProbe"], container["readinessProbe"]):
        assert probe["httpGet"]["path"] == "/healthz"
        assert probe["httpGet"]["port"] == "http"
    assert {"name": "AGENTAPI_PORT", "value": "8000"} in container["env"]
    assert configmap["data"]["AGENTAPI_PORT"] == "8000"
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}
    ]


@pytest.mark.parametrize(("policy", "when_deleted"), [("delete", "Delete"), ("retain", "Retain")])
def test_pvc_delete_policy_sets_the_retention_policy(
    load: Any, policy: str, when_deleted: str
) -> None:
    sts = so.build_statefulset(load({"AGENTAPI_PROVISION_MODE_PVC_DELETE_POLICY": policy}), SPEC)

    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": when_deleted,
        "whenScaled": "Retain",
    }
    validate_strict(sts)


# --- K10: nested keys from files and environment merge --------------------------


def test_k10_env_overrides_one_key_of_a_yaml_file_and_keeps_its_siblings(
    load: Any, tmp_path: Path
) -> None:
    (tmp_path / "config.yaml").write_text(
        "provision_mode: {resources: {cpu_request: 500m, memory_request: 256Mi}}\n"
    )
    settings = load({"AGENTAPI_PROVISION_MODE_RESOURCES_CPU_REQUEST": "100m"})

    assert settings.provision_mode.resources.cpu_request == "100m"
    assert settings.provision_mode.resources.memory_request == "256Mi"
    sts = so.build_statefulset(settings, SPEC)
    assert container_of(sts)["resources"]["requests"] == {"cpu": "100m", "memory": "256Mi"}
    validate_strict(sts)


def test_k10_with_both_json_and_yaml_files(load: Any, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps(
            {"provision_mode": {"resources": {"cpu_request": "250m", "memory_limit": "1Gi"}}}
        )
    )
    (tmp_path / "config.yaml").write_text(
        "provision_mode: {resources: {cpu_request: 500m, memory_request: 256Mi}}\n"
    )
    settings = load({"AGENTAPI_PROVISION_MODE_RESOURCES_CPU_REQUEST": "100m"})

    resources = settings.provision_mode.resources
    assert (resources.cpu_request, resources.memory_request) == ("100m", "256Mi")
    # The JSON file's key survives the YAML file: merged, not replaced.
    assert resources.memory_limit == "1Gi"
    sts = so.build_statefulset(settings, SPEC)
    # No stray keys: exactly cpu and memory, as requests and as limits.
    assert container_of(sts)["resources"] == {
        "requests": {"cpu": "100m", "memory": "256Mi"},
        "limits": {"cpu": "500m", "memory": "1Gi"},
    }
    validate_strict(sts)


# --- the objects are valid Kubernetes objects -----------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        SPEC,
        AgentSpec(agent_id="a", session_id="s"),
        AgentSpec(agent_id="a" * 46, session_id="s" * 63, owner="o" * 300),
    ],
    ids=["full", "minimal", "longest"],
)
def test_every_object_validates_against_the_kubernetes_schema(spec: AgentSpec) -> None:
    settings = Settings()
    objects: list[Mapping[str, Any]] = [
        *so.build_objects(settings, spec),
        so.build_configmap(settings, spec, owner_uid="5f0c6a2e-0d1b-4c36-9d4e-1f2a3b4c5d6e"),
        so.build_service(settings, spec, owner_uid="5f0c6a2e-0d1b-4c36-9d4e-1f2a3b4c5d6e"),
        so.build_statefulset(settings, spec, command=["agentapi", "server", "--", "claude"]),
    ]

    for obj in objects:
        validate_strict(obj)


def test_the_schema_check_can_fail() -> None:
    sts: dict[str, Any] = json.loads(json.dumps(so.build_statefulset(Settings(), SPEC)))
    sts["spec"]["template"]["spec"]["containers"][0]["resourceLimits"] = {"cpu": "1"}

    with pytest.raises(kubernetes_validate.ValidationError):
        validate_strict(sts)


def test_the_statefulset_runs_one_pod_that_its_selector_and_service_find() -> None:
    _, service, sts = so.build_objects(Settings(), SPEC)

    assert sts["spec"]["replicas"] == 1
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True

    container = container_of(sts)
    assert container["name"] == "agent"
    assert container["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def test_the_container_gets_ids_port_and_the_spec_env() -> None:
    container = container_of(so.build_statefulset(Settings(), SPEC))

    env = {item["name"]: item["value"] for item in container["env"]}
    assert len(env) == len(container["env"]), "duplicate env names"
    assert env == {
        "AGENT_ID": "r1",
        "SESSION_ID": "my-session",
        "AGENTAPI_PORT": "3284",
        **SPEC.env,
    }


def test_the_configmap_holds_the_agent_settings() -> None:
    configmap = so.build_configmap(Settings(), SPEC)

    assert configmap["data"] == {
        "AGENT_ID": "r1",
        "SESSION_ID": "my-session",
        "AGENTAPI_PORT": "3284",
        "AGENT_OWNER": "alice@example.com",
    }


def test_owner_uid_makes_the_statefulset_own_service_and_configmap() -> None:
    uid = "5f0c6a2e-0d1b-4c36-9d4e-1f2a3b4c5d6e"

    for obj in (
        so.build_service(Settings(), SPEC, owner_uid=uid),
        so.build_configmap(Settings(), SPEC, owner_uid=uid),
    ):
        (ref,) = obj["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"]) == ("StatefulSet", "agent-r1", uid)
    assert "ownerReferences" not in so.build_service(Settings(), SPEC)["metadata"]


# --- labels, annotations, selectors -------------------------------------------


def labelled_metadata(spec: AgentSpec = SPEC) -> Iterator[tuple[str, Mapping[str, Any]]]:
    configmap, service, sts = so.build_objects(Settings(), spec)
    yield "configmap", configmap["metadata"]
    yield "service", service["metadata"]
    yield "statefulset", sts["metadata"]
    yield "pod template", sts["spec"]["template"]["metadata"]
    yield "claim template", sts["spec"]["volumeClaimTemplates"][0]["metadata"]


def test_every_object_carries_our_labels_and_the_spec_labels() -> None:
    for where, meta in labelled_metadata():
        assert meta["labels"] == {
            "app.kubernetes.io/name": "agentapi-agent",
            "app.kubernetes.io/managed-by": "agentapi-proxy",
            "agentapi-proxy/agent-id": "r1",
            "agentapi-proxy/session-id": "my-session",
            **SPEC.labels,
        }, where


@pytest.mark.parametrize(
    "key",
    [
        "app.kubernetes.io/name",
        "app.kubernetes.io/managed-by",
        "agentapi-proxy/agent-id",
        "agentapi-proxy/session-id",
        "agentapi-proxy/anything",
        "controller-revision-hash",
        "statefulset.kubernetes.io/pod-name",
    ],
)
def test_spec_labels_cannot_replace_ours(key: str) -> None:
    spec = AgentSpec(agent_id="r1", session_id="s", labels={key: "mine"})

    with pytest.raises(InvalidArgument, match="reserved"):
        so.build_objects(Settings(), spec)


@pytest.mark.parametrize(
    ("key", "value"),
    [("", "v"), ("bad key", "v"), ("-x", "v"), ("k", "x" * 64), ("k", "a b"), ("Bad_/k", "v")],
)
def test_labels_kubernetes_would_refuse_are_rejected_before_building(key: str, value: str) -> None:
    with pytest.raises(InvalidArgument):
        so.build_objects(Settings(), AgentSpec(agent_id="r1", session_id="s", labels={key: value}))


@pytest.mark.parametrize("name", ["AGENT_ID", "SESSION_ID", "AGENTAPI_PORT", "AGENT_OWNER"])
def test_spec_env_cannot_replace_the_variables_we_set(name: str) -> None:
    spec = AgentSpec(agent_id="r1", session_id="s", env={name: "x"})

    with pytest.raises(InvalidArgument, match=name):
        so.build_statefulset(Settings(), spec)


def test_invalid_env_names_are_rejected() -> None:
    with pytest.raises(InvalidArgument):
        so.build_statefulset(Settings(), AgentSpec(agent_id="r1", session_id="s", env={"1X": ""}))


def test_a_spec_too_large_for_annotations_is_rejected() -> None:
    big = {f"VAR_{i}": "x" * 1000 for i in range(300)}

    with pytest.raises(InvalidArgument, match="annotations"):
        so.build_statefulset(Settings(), AgentSpec(agent_id="r1", session_id="s", env=big))


def test_every_object_rebuilds_the_spec_from_the_cluster() -> None:
    for where, meta in labelled_metadata():
        # As read back from the API server: a JSON round trip, extra server-set fields.
        obj = json.loads(json.dumps({"kind": "X", "metadata": meta}))
        obj["metadata"]["labels"]["controller-revision-hash"] = "agent-r1-5d8f9c7b6"
        obj["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied"] = "{}"
        assert so.spec_from_annotations(obj) == SPEC, where


def test_spec_hash_is_equal_exactly_for_equal_specs() -> None:
    same = AgentSpec(
        agent_id="r1",
        session_id="my-session",
        owner="alice@example.com",
        env=dict(reversed(list(SPEC.env.items()))),
        labels=dict(SPEC.labels),
    )
    assert so.spec_hash(same) == so.spec_hash(SPEC)

    variants = [
        AgentSpec("r2", SPEC.session_id, SPEC.owner, SPEC.env, SPEC.labels),
        AgentSpec("r1", "other", SPEC.owner, SPEC.env, SPEC.labels),
        AgentSpec("r1", SPEC.session_id, "bob", SPEC.env, SPEC.labels),
        AgentSpec("r1", SPEC.session_id, SPEC.owner, {**SPEC.env, "EMPTY": "x"}, SPEC.labels),
        AgentSpec("r1", SPEC.session_id, SPEC.owner, SPEC.env, {}),
    ]
    hashes = {so.spec_hash(v) for v in variants}
    assert len(hashes) == len(variants)
    assert so.spec_hash(SPEC) not in hashes

    sts = so.build_statefulset(Settings(), SPEC)
    assert sts["metadata"]["annotations"][so.ANNOTATION_SPEC_HASH] == so.spec_hash(same)


@pytest.mark.parametrize(
    "damage",
    [
        lambda meta: meta["labels"].pop("agentapi-proxy/agent-id"),
        lambda meta: meta["annotations"].pop("agentapi-proxy/spec-hash"),
        lambda meta: meta["annotations"].update({"agentapi-proxy/env": "not json"}),
        lambda meta: meta["annotations"].update({"agentapi-proxy/env": '{"A": 1}'}),
        lambda meta: meta["annotations"].update({"agentapi-proxy/owner": "mallory"}),
        lambda meta: meta.pop("annotations"),
    ],
    ids=["no-id", "no-hash", "bad-json", "not-strings", "edited-owner", "no-annotations"],
)
def test_objects_not_built_here_are_reported_not_misread(damage: Any) -> None:
    obj: dict[str, Any] = json.loads(json.dumps(so.build_statefulset(Settings(), SPEC)))
    damage(obj["metadata"])

    with pytest.raises(FailedPrecondition, match="agent-r1") as caught:
        so.spec_from_annotations(obj)
    assert caught.value.reason == "MalformedAgentObject"


def matches(selector: str, labels: Mapping[str, str]) -> bool:
    terms = dict(term.split("=", 1) for term in selector.split(","))
    return all(labels.get(key) == value for key, value in terms.items())


def test_selectors_find_exactly_the_objects_they_name() -> None:
    mine = so.build_statefulset(Settings(), SPEC)["metadata"]["labels"]
    other = so.build_statefulset(Settings(), AgentSpec(agent_id="r2", session_id="other"))
    theirs = other["metadata"]["labels"]
    unmanaged = {"app.kubernetes.io/name": "agentapi-proxy"}

    assert matches(so.selector_all(), mine) and matches(so.selector_all(), theirs)
    assert not matches(so.selector_all(), unmanaged)
    assert matches(so.selector_for_agent("r1"), mine)
    assert not matches(so.selector_for_agent("r1"), theirs)
    assert matches(so.selector_for_session("my-session"), mine)
    assert not matches(so.selector_for_session("my-session"), theirs)


@pytest.mark.parametrize("bad", ["r1,app.kubernetes.io/name=x", "r1 ", "R1", ""])
def test_agent_selector_refuses_ids_that_would_change_its_meaning(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        so.selector_for_agent(bad)


@pytest.mark.parametrize("bad", ["s1,app.kubernetes.io/name=x", "s1 ", "s=1", ""])
def test_session_selector_refuses_ids_that_would_change_its_meaning(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        so.selector_for_session(bad)


# --- K01: name limits that only show up later -----------------------------------

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


def assert_label_fits(key: str, value: str) -> None:
    assert len(value) <= 63 and LABEL_VALUE.fullmatch(value), (key, value)


def test_k01_a_46_character_id_gives_names_and_labels_kubernetes_accepts() -> None:
    agent_id = "a" * 46
    spec = AgentSpec(agent_id=agent_id, session_id="s" * 63, labels={"team": "t" * 63})
    configmap, service, sts = so.build_objects(Settings(), spec)

    assert len(sts["metadata"]["name"]) <= 52 and DNS_LABEL.fullmatch(sts["metadata"]["name"])
    # Service names are DNS-1035 labels; the pod name is also the pod's hostname.
    svc = service["metadata"]["name"]
    assert len(svc) <= 63 and DNS_1035.fullmatch(svc)
    pod = so.pod_name(agent_id)
    assert len(pod) <= 63 and DNS_LABEL.fullmatch(pod)
    for name in (so.pvc_name(agent_id), configmap["metadata"]["name"]):
        assert len(name) <= 253 and DNS_SUBDOMAIN.fullmatch(name)

    # Labels the StatefulSet controller adds to the pod, with the longest revision hash.
    added = {
        "controller-revision-hash": f"{sts['metadata']['name']}-{'h' * 10}",
        "statefulset.kubernetes.io/pod-name": pod,
        "apps.kubernetes.io/pod-index": "0",
    }
    for _, meta in labelled_metadata(spec):
        for key, value in {**meta["labels"], **added}.items():
            assert_label_fits(key, value)
    for obj in (configmap, service, sts):
        validate_strict(obj)


def test_k01_a_47_character_id_is_rejected_before_anything_is_built() -> None:
    agent_id = "a" * 47
    spec = AgentSpec(agent_id=agent_id, session_id="s")
    settings = Settings()

    for build in (so.build_objects, so.build_statefulset, so.build_service, so.build_configmap):
        with pytest.raises(InvalidArgument, match="47"):
            build(settings, spec)
    for name in (so.statefulset_name, so.service_name, so.pod_name, so.pvc_name):
        with pytest.raises(InvalidArgument):
            name(agent_id)
    with pytest.raises(InvalidArgument):
        so.configmap_name(agent_id)
