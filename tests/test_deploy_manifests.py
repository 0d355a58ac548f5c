"""deploy/: the manifests are valid, least-privilege, and agree with the code."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from agentapi_proxy.drivers import statefulset_objects as so
from agentapi_proxy.model import AgentSpec
from agentapi_proxy.settings import Settings, env_names, load_settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S_VERSION = kubernetes_validate.latest_version()


def documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted([*DEPLOY.glob("*.yaml"), *DEPLOY.glob("*.yml")]):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                found.append((path.name, doc))
    return found


def the(kind: str) -> dict[str, Any]:
    (doc,) = [doc for _, doc in documents() if doc["kind"] == kind]
    return doc


def settings_configmap() -> dict[str, Any]:
    deployment = the("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    names = {ref["configMapRef"]["name"] for ref in container.get("envFrom", [])}
    return next(
        doc
        for _, doc in documents()
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] in names
    )


def deployment_environment() -> dict[str, str]:
    """What the control-plane container sees: envFrom ConfigMaps, then env (which wins)."""
    (container,) = the("Deployment")["spec"]["template"]["spec"]["containers"]
    environ = dict(settings_configmap()["data"])
    environ.update({item["name"]: item["value"] for item in container.get("env", [])})
    return environ


def grants(rules: Any) -> Iterator[tuple[str, str, str]]:
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    yield group, resource, verb


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    if Path("/etc/agentapi").exists():
        pytest.skip("/etc/agentapi exists on this machine and would change the settings")
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("AGENTAPI_CONFIG_FILE", raising=False)
    return tmp_path


# --- schema ---------------------------------------------------------------------


def test_deploy_holds_the_expected_objects() -> None:
    kinds = sorted(doc["kind"] for _, doc in documents())
    assert kinds == sorted(
        [
            "Namespace",
            "ServiceAccount",
            "Role",
            "RoleBinding",
            "ConfigMap",
            "Deployment",
            "Service",
            "NetworkPolicy",
        ]
    )


@pytest.mark.parametrize(
    "doc", [pytest.param(doc, id=f"{name}:{doc['kind']}") for name, doc in documents()]
)
def test_every_document_validates_against_the_kubernetes_schema(doc: dict[str, Any]) -> None:
    # SchemaNotFoundError (an unknown kind or apiVersion) fails the test as well.
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_every_namespaced_object_is_in_the_agents_namespace() -> None:
    namespace = the("Namespace")["metadata"]["name"]

    assert namespace == Settings().provision_mode.namespace == "agentapi-proxy"
    for filename, doc in documents():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, filename


# --- RBAC -------------------------------------------------------------------------


def test_the_role_grants_exactly_what_the_driver_needs() -> None:
    role = the("Role")
    granted = list(grants(role["rules"]))
    required = {
        (rule.api_group, rule.resource, verb)
        for rule in so.REQUIRED_RBAC_RULES
        for verb in rule.verbs
    }

    assert len(granted) == len(set(granted)), "a grant is listed twice"
    missing = required - set(granted)
    beyond = set(granted) - required
    assert not missing, f"the Role lacks {sorted(missing)}"
    assert not beyond, f"the Role grants more than the driver uses: {sorted(beyond)}"
    assert not any("resourceNames" in rule or "nonResourceURLs" in rule for rule in role["rules"])


def test_no_cluster_wide_permissions() -> None:
    kinds = {doc["kind"] for _, doc in documents()}

    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}


def test_the_control_plane_runs_as_the_account_the_role_is_bound_to() -> None:
    binding = the("RoleBinding")
    account = the("ServiceAccount")["metadata"]
    pod = the("Deployment")["spec"]["template"]["spec"]

    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": the("Role")["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    ]
    assert pod["serviceAccountName"] == account["name"]
    assert pod.get("automountServiceAccountToken", True) is True


# --- the control plane Deployment ---------------------------------------------------


def test_the_deployment_runs_serve_twice_with_the_default_image() -> None:
    deployment = the("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]

    assert deployment["spec"]["replicas"] == 2
    assert container["image"] == "agentapi-proxy:latest"
    assert [*container.get("command", []), *container.get("args", [])] == [
        "agentapi-proxy",
        "serve",
    ]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_every_deployment_env_name_is_a_setting() -> None:
    known = env_names()

    unknown = sorted(name for name in deployment_environment() if name not in known)
    assert not unknown, f"not settings: {unknown}"


def test_the_deployment_settings_load_and_enable_provision_mode(isolated: Path) -> None:
    settings = load_settings(environ=deployment_environment(), cwd=isolated)

    assert settings.provision_mode.enabled is True
    assert settings.provision_mode.namespace == the("Role")["metadata"]["namespace"]
    assert settings.provision_mode.image == "agentapi-proxy:latest"
    # Stopping takes no longer than Kubernetes waits before SIGKILL.
    grace = the("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert settings.server.shutdown_grace_seconds < grace


def test_pods_get_no_service_link_variables() -> None:
    # Our Service "agentapi-proxy" would inject AGENTAPI_PROXY_SERVICE_HOST and friends,
    # which the settings loader refuses as unknown settings.
    assert the("Deployment")["spec"]["template"]["spec"]["enableServiceLinks"] is False
    sts = so.build_statefulset(Settings(), AgentSpec(agent_id="r1", session_id="s"))
    assert sts["spec"]["template"]["spec"]["enableServiceLinks"] is False


def port_of(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


def test_probes_and_ports_match_where_the_process_listens(isolated: Path) -> None:
    settings = load_settings(environ=deployment_environment(), cwd=isolated)
    (container,) = the("Deployment")["spec"]["template"]["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}

    assert ports == {
        "http": port_of(settings.gateway.listen),
        "grpc": port_of(settings.server.grpc_listen),
    }
    assert ports == {"http": 8080, "grpc": 50051}
    # In a pod the kubelet and the Service reach the container from outside localhost.
    assert settings.gateway.listen.startswith("0.0.0.0:")
    assert settings.server.grpc_listen.startswith("0.0.0.0:")

    probes = [container["readinessProbe"], container["livenessProbe"]]
    grpc_probe = next(p["grpc"] for p in probes if "grpc" in p)
    http_probe = next(p["httpGet"] for p in probes if "httpGet" in p)
    assert grpc_probe["port"] == 50051
    assert http_probe["path"] == "/healthz"
    assert ports.get(http_probe["port"], http_probe["port"]) == 8080


def test_the_service_exposes_http_and_grpc_of_the_deployment_pods() -> None:
    service = the("Service")
    deployment = the("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    container_ports = {port["name"]: port["containerPort"] for port in container["ports"]}

    exposed = {
        port["name"]: (port["port"], container_ports[port["targetPort"]])
        for port in service["spec"]["ports"]
    }
    assert exposed == {"http": (8080, 8080), "grpc": (50051, 50051)}
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_the_network_policy_admits_only_the_control_plane_to_agents() -> None:
    policy = the("NetworkPolicy")["spec"]
    agent = so.build_statefulset(Settings(), AgentSpec(agent_id="r1", session_id="s"))
    agent_labels = agent["spec"]["template"]["metadata"]["labels"]
    control_plane_labels = the("Deployment")["spec"]["template"]["metadata"]["labels"]

    assert policy["podSelector"]["matchLabels"].items() <= agent_labels.items()
    assert not policy["podSelector"]["matchLabels"].items() <= control_plane_labels.items()
    (rule,) = policy["ingress"]
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchLabels"].items() <= control_plane_labels.items()
    assert not peer["podSelector"]["matchLabels"].items() <= agent_labels.items()
    assert rule["ports"] == [{"port": Settings().provision_mode.container_port, "protocol": "TCP"}]


# --- the systemd unit ---------------------------------------------------------------


def unit_entries() -> list[tuple[str, str, str]]:
    """(section, key, value) of deploy/agentapi-proxy.service, repeated keys kept."""
    entries = []
    section = ""
    for line in (DEPLOY / "agentapi-proxy.service").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if match := re.fullmatch(r"\[(\w+)\]", line):
            section = match[1]
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_value(key: str) -> str:
    (value,) = [v for s, k, v in unit_entries() if s == "Service" and k == key]
    return value


def test_the_unit_runs_serve_with_valid_settings(isolated: Path) -> None:
    environ = dict(
        value.split("=", 1)
        for section, key, value in unit_entries()
        if section == "Service" and key == "Environment"
    )

    assert unit_value("ExecStart").split()[-1] == "serve"
    assert unit_value("ExecStart").split()[0].endswith("/agentapi-proxy")
    assert set(environ) <= set(env_names())
    settings = load_settings(environ=environ, cwd=isolated)
    assert settings.provision_mode.enabled is False
    # Single host: nothing listens beyond loopback unless the admin says so.
    assert settings.gateway.listen.startswith("127.0.0.1:")
    assert settings.server.grpc_listen.startswith("127.0.0.1:")
    assert settings.state_dir == "/var/lib/agentapi-proxy"
    assert unit_value("StateDirectory") == "agentapi-proxy"


def test_the_unit_lets_agents_outlive_a_control_plane_restart() -> None:
    # Legacy-mode agents are found again after a restart; systemd's default
    # (control-group) would kill them with the control plane.
    assert unit_value("KillMode") == "process"
    assert float(unit_value("TimeoutStopSec")) > Settings().server.shutdown_grace_seconds


def test_the_unit_is_installable() -> None:
    sections = {section for section, _, _ in unit_entries()}

    assert sections == {"Unit", "Service", "Install"}
    assert ("Install", "WantedBy", "multi-user.target") in unit_entries()
