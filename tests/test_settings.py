"""Settings: the design document's names, defaults, precedence and error messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agentapi_proxy.settings import (
    SettingsError,
    env_names,
    leaf_paths,
    load_settings,
    unknown_env_names,
)

SEED_YAML = """\
provision_mode:
  enabled: true
  namespace: agentapi-proxy
  image: agentapi-proxy:latest
  resources:
    cpu_request: 100m
    cpu_limit: 500m
    memory_request: 256Mi
    memory_limit: 512Mi
    storage_size: 1Gi
"""


def load(tmp_path: Path, environ: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return load_settings(environ=environ or {}, cwd=tmp_path)


@pytest.fixture(autouse=True)
def _no_system_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # ~/.agentapi must not leak into these tests.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    if Path("/etc/agentapi").exists():
        pytest.fail("/etc/agentapi exists on this machine; these tests need it absent")


class TestDesignDocument:
    def test_defaults_are_the_documents_table(self, tmp_path: Path) -> None:
        provision = load(tmp_path).provision_mode
        assert provision.enabled is False
        assert provision.namespace == "agentapi-proxy"
        assert provision.image == "agentapi-proxy:latest"
        resources = provision.resources
        assert (resources.cpu_request, resources.cpu_limit) == ("100m", "500m")
        assert (resources.memory_request, resources.memory_limit) == ("256Mi", "512Mi")
        assert resources.storage_size == "1Gi"

    def test_every_environment_variable_of_the_document(self, tmp_path: Path) -> None:
        settings = load(
            tmp_path,
            {
                "AGENTAPI_PROVISION_MODE_ENABLED": "true",
                "AGENTAPI_PROVISION_MODE_NAMESPACE": "agents",
                "AGENTAPI_PROVISION_MODE_IMAGE": "example/agent:1",
                "AGENTAPI_PROVISION_MODE_RESOURCES_CPU_REQUEST": "500m",
                "AGENTAPI_PROVISION_MODE_RESOURCES_CPU_LIMIT": "2000m",
                "AGENTAPI_PROVISION_MODE_RESOURCES_MEMORY_REQUEST": "1Gi",
                "AGENTAPI_PROVISION_MODE_RESOURCES_MEMORY_LIMIT": "2Gi",
                "AGENTAPI_PROVISION_MODE_RESOURCES_STORAGE_SIZE": "5Gi",
            },
        )
        provision = settings.provision_mode
        assert provision.enabled is True
        assert (provision.namespace, provision.image) == ("agents", "example/agent:1")
        assert provision.resources.cpu_limit == "2000m"
        assert provision.resources.memory_request == "1Gi"
        assert provision.resources.storage_size == "5Gi"

    @pytest.mark.parametrize("name", ["config.yaml", "config.yml"])
    def test_yaml_file_as_printed(self, tmp_path: Path, name: str) -> None:
        (tmp_path / name).write_text(SEED_YAML)
        assert load(tmp_path).provision_mode.enabled is True

    def test_json_file_as_printed(self, tmp_path: Path) -> None:
        data = {
            "provision_mode": {
                "enabled": True,
                "namespace": "agentapi-proxy",
                "image": "agentapi-proxy:latest",
                "resources": {"cpu_request": "100m", "storage_size": "2Gi"},
            }
        }
        (tmp_path / "config.json").write_text(json.dumps(data))
        settings = load(tmp_path)
        assert settings.provision_mode.enabled is True
        assert settings.provision_mode.resources.storage_size == "2Gi"
        assert settings.provision_mode.resources.memory_limit == "512Mi"


class TestPrecedence:
    def test_environment_beats_file_beats_default_key_by_key(self, tmp_path: Path) -> None:
        (tmp_path / "config.yaml").write_text(
            "provision_mode: {resources: {cpu_request: 500m, memory_request: 300Mi}}\n"
        )
        settings = load(tmp_path, {"AGENTAPI_PROVISION_MODE_RESOURCES_CPU_REQUEST": "100m"})
        resources = settings.provision_mode.resources
        assert resources.cpu_request == "100m"
        assert resources.memory_request == "300Mi"
        assert resources.cpu_limit == "500m"

    def test_double_underscore_nesting_works_too(self, tmp_path: Path) -> None:
        environ = {"AGENTAPI_PROVISION_MODE__RESOURCES__CPU_LIMIT": "750m"}
        assert load(tmp_path, environ).provision_mode.resources.cpu_limit == "750m"

    def test_explicit_file_replaces_the_search(self, tmp_path: Path) -> None:
        (tmp_path / "config.yaml").write_text("process: {port_range: 5000-5001}\n")
        other = tmp_path / "other.json"
        other.write_text(json.dumps({"process": {"port_range": "6000-6010"}}))
        settings = load_settings(str(other), environ={}, cwd=tmp_path)
        assert settings.process.port_range == "6000-6010"
        with pytest.raises(SettingsError, match="does not exist"):
            load_settings(str(tmp_path / "missing.yaml"), environ={}, cwd=tmp_path)

    def test_single_underscore_names_are_unambiguous(self) -> None:
        paths = list(leaf_paths())
        assert len({"_".join(path) for path in paths}) == len(paths)
        assert set(env_names().values()) == set(paths)

    def test_other_programs_variables_are_reported_not_fatal(self, tmp_path: Path) -> None:
        environ = {"AGENTAPI_ALLOWED_HOSTS": "*", "AGENTAPI_STATE_DIR": str(tmp_path)}
        assert load(tmp_path, environ).state_dir == str(tmp_path)
        assert unknown_env_names(environ) == ["AGENTAPI_ALLOWED_HOSTS"]


class TestBadValues:
    @pytest.mark.parametrize(
        ("environ", "fragments"),
        [
            (
                {"AGENTAPI_PROVISION_MODE_ENABLED": "yes"},
                ["provision_mode.enabled", "'yes'", "AGENTAPI_PROVISION_MODE_ENABLED", "true"],
            ),
            (
                {"AGENTAPI_PROVISION_MODE_RESOURCES_CPU_REQUEST": "12xyz"},
                ["provision_mode.resources.cpu_request", "'12xyz'", "quantity"],
            ),
            ({"AGENTAPI_PROCESS_PORT_RANGE": "9000"}, ["process.port_range", "'9000'"]),
            ({"AGENTAPI_SERVER_GRPC_LISTEN": "nowhere"}, ["server.grpc_listen", "host:port"]),
            ({"AGENTAPI_PROCESS_RESTART_POLICY": "sometimes"}, ["restart_policy"]),
        ],
    )
    def test_message_names_key_value_and_source(
        self, tmp_path: Path, environ: dict[str, str], fragments: list[str]
    ) -> None:
        with pytest.raises(SettingsError) as caught:
            load(tmp_path, environ)
        for fragment in fragments:
            assert fragment in str(caught.value)

    def test_bad_value_in_a_file_names_the_file(self, tmp_path: Path) -> None:
        (tmp_path / "config.yaml").write_text("provision_mode: {enabled: maybe}\n")
        with pytest.raises(SettingsError, match=r"maybe.*config\.yaml"):
            load(tmp_path)

    def test_unknown_file_key_is_refused(self, tmp_path: Path) -> None:
        (tmp_path / "config.yaml").write_text("provision_mode: {namespce: x}\n")
        with pytest.raises(SettingsError, match=r"provision_mode\.namespce"):
            load(tmp_path)

    def test_bad_value_stops_the_start(self, tmp_path: Path) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "agentapi_proxy", "serve"],
            env={
                "PATH": "/usr/bin:/bin",
                "HOME": str(tmp_path),
                "AGENTAPI_PROVISION_MODE_ENABLED": "1",
            },
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2
        assert "AGENTAPI_PROVISION_MODE_ENABLED" in result.stderr
        assert "Traceback" not in result.stderr
