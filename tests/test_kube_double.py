"""The Kubernetes API server double, driven by the real ``kubernetes`` client.

Every test talks to the double the way the StatefulSet driver will: through
the official client configured from the kubeconfig file the double writes,
over real HTTP on 127.0.0.1. The double runs on its own loop in its own
thread, so these tests call the synchronous client directly.
"""

from __future__ import annotations

import json
import queue
import re
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import urllib3
from kubernetes import client, config, watch
from kubernetes.client import ApiException

from tests.kube_double import KubeDouble, PolicyRule, Timings, revision_hash

NS = "agentapi-proxy"
USER = "system:serviceaccount:agentapi-proxy:agentapi-proxy"


# --- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[KubeDouble]:
    with KubeDouble(tmp_path) as double:
        yield double
        assert double.internal_errors == []


def _api_client(kube: KubeDouble) -> client.ApiClient:
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(kube.kubeconfig), client_configuration=configuration)
    return client.ApiClient(configuration)


@pytest.fixture
def api(kube: KubeDouble) -> Iterator[client.ApiClient]:
    with _api_client(kube) as api_client:
        yield api_client


@pytest.fixture
def core(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


@pytest.fixture
def apps(api: client.ApiClient) -> client.AppsV1Api:
    return client.AppsV1Api(api)


def statefulset(
    name: str,
    *,
    image: str = "agentapi-proxy:latest",
    retention: str = "Retain",
    template_labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": 1,
            "serviceName": f"{name}-headless",
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": {**labels, **(template_labels or {})}},
                "spec": {
                    "containers": [
                        {
                            "name": "agent",
                            "image": image,
                            "ports": [{"name": "http", "containerPort": 3284}],
                            "resources": {
                                "requests": {"cpu": "100m", "memory": "64Mi"},
                                "limits": {"cpu": "500m", "memory": "128Mi"},
                            },
                            "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                        }
                    ]
                },
            },
            "volumeClaimTemplates": [
                {
                    "metadata": {"name": "data", "labels": {"app": name, "tier": "storage"}},
                    "spec": {
                        "accessModes": ["ReadWriteOnce"],
                        "resources": {"requests": {"storage": "1Gi"}},
                    },
                }
            ],
            "persistentVolumeClaimRetentionPolicy": {
                "whenDeleted": retention,
                "whenScaled": "Retain",
            },
        },
    }


def headless_service(name: str) -> dict[str, Any]:
    return {
        "metadata": {"name": f"{name}-headless", "labels": {"app": name}},
        "spec": {
            "clusterIP": "None",
            "selector": {"app": name},
            "ports": [{"name": "http", "port": 3284, "targetPort": "http"}],
        },
    }


def status_of(exc: ApiException) -> dict[str, Any]:
    body = json.loads(exc.body)
    assert body["kind"] == "Status"
    return dict(body)


def read_or_none(read: Callable[[], Any]) -> Any:
    try:
        return read()
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def pod_if_ready(core: client.CoreV1Api, name: str) -> client.V1Pod | None:
    pod = read_or_none(lambda: core.read_namespaced_pod(name, NS))
    if pod is None or pod.status.phase != "Running" or not pod.status.container_statuses:
        return None
    return pod if all(c.ready for c in pod.status.container_statuses) else None


def start_agent(
    kube: KubeDouble, core: client.CoreV1Api, apps: client.AppsV1Api, name: str, **kw: Any
) -> client.V1Pod:
    apps.create_namespaced_stateful_set(NS, statefulset(name, **kw))
    pod: client.V1Pod = kube.wait_for(
        lambda: pod_if_ready(core, f"{name}-0"), what=f"{name}-0 ready"
    )
    return pod


def gone(read: Callable[[], Any]) -> bool:
    return read_or_none(read) is None


def raw_request(
    kube: KubeDouble,
    path: str,
    *,
    method: str = "GET",
    body: Any = None,
    token: str | None = None,
) -> tuple[int, bytes]:
    """A request without the kubernetes client, for what the client refuses to send."""
    request = urllib.request.Request(
        kube.url + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "Authorization": f"Bearer {token or kube.token}",
            "Content-Type": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


# --- discovery and authentication ---------------------------------------------------------


def test_version_and_discovery_answer_like_an_api_server(api: client.ApiClient) -> None:
    version = client.VersionApi(api).get_code()
    assert re.fullmatch(r"v1\.\d+\.\d+", version.git_version)

    core_resources = {r.name for r in client.CoreV1Api(api).get_api_resources().resources}
    assert {"pods", "pods/log", "pods/proxy", "services", "configmaps", "events"} <= core_resources
    assert "persistentvolumeclaims" in core_resources
    groups = {g.name for g in client.ApisApi(api).get_api_versions().groups}
    assert {"apps", "authorization.k8s.io"} <= groups
    apps_resources = {r.name for r in client.AppsV1Api(api).get_api_resources().resources}
    assert "statefulsets" in apps_resources


def test_a_wrong_token_is_unauthorized(kube: KubeDouble) -> None:
    status, body = raw_request(kube, f"/api/v1/namespaces/{NS}/pods", token="not-the-token")

    assert status == 401
    assert json.loads(body)["reason"] == "Unauthorized"


# --- the provision-mode objects come up -------------------------------------------------


def test_statefulset_gets_its_claim_bound_and_its_pod_running(
    kube: KubeDouble, core: client.CoreV1Api, apps: client.AppsV1Api
) -> None:
    core.create_namespaced_config_map(
        NS, {"metadata": {"name": "agent-r1-config"}, "data": {"AGENT_ID": "r1"}}
    )
    service = core.create_namespaced_service(NS, headless_service("agent-r1"))
    created = apps.create_namespaced_stateful_set(NS, statefulset("agent-r1"))
    assert service.spec.cluster_ip == "None"
    assert created.metadata.generation == 1
    assert created.metadata.uid

    pod = kube.wait_for(lambda: pod_if_ready(core, "agent-r1-0"), what="agent-r1-0 ready")
    assert pod.metadata.labels["statefulset.kubernetes.io/pod-name"] == "agent-r1-0"
    assert pod.metadata.labels["controller-revision-hash"].startswith("agent-r1-")
    owner = pod.metadata.owner_references[0]
    assert (owner.kind, owner.name, owner.uid, owner.controller) == (
        "StatefulSet",
        "agent-r1",
        created.metadata.uid,
        True,
    )
    assert pod.spec.hostname == "agent-r1-0"
    assert pod.spec.subdomain == "agent-r1-headless"
    assert pod.status.pod_ip
    claim_volume = next(v for v in pod.spec.volumes if v.name == "data")
    assert claim_volume.persistent_volume_claim.claim_name == "data-agent-r1-0"

    pvc = core.read_namespaced_persistent_volume_claim("data-agent-r1-0", NS)
    assert pvc.status.phase == "Bound"
    assert pvc.metadata.labels == {"app": "agent-r1", "tier": "storage"}
    assert pvc.metadata.finalizers == ["kubernetes.io/pvc-protection"]
    assert pvc.spec.storage_class_name == "standard"

    def settled() -> client.V1StatefulSet | None:
        sts = apps.read_namespaced_stateful_set("agent-r1", NS)
        if (
            sts.status.observed_generation == sts.metadata.generation
            and sts.status.ready_replicas == 1
        ):
            return sts
        return None

    sts = kube.wait_for(settled, what="statefulset status")
    assert (sts.status.replicas, sts.status.current_replicas, sts.status.available_replicas) == (
        1,
        1,
        1,
    )
    assert sts.status.update_revision == pod.metadata.labels["controller-revision-hash"]

    events = core.list_namespaced_event(NS, field_selector="involvedObject.name=agent-r1-0")
    assert {"Scheduled", "Started"} <= {e.reason for e in events.items}


def test_the_drivers_own_objects_are_accepted(
    kube: KubeDouble, core: client.CoreV1Api, apps: client.AppsV1Api
) -> None:
    from agentapi_proxy.drivers.statefulset_objects import build_objects
    from agentapi_proxy.model import AgentSpec
    from agentapi_proxy.settings import Settings

    objects = build_objects(Settings(), AgentSpec(agent_id="d1", session_id="s1", env={"A": "1"}))
    core.create_namespaced_config_map(NS, dict(objects.configmap))
    core.create_namespaced_service(NS, dict(objects.service))
    apps.create_namespaced_stateful_set(NS, dict(objects.statefulset))

    kube.wait_for(lambda: pod_if_ready(core, "agent-d1-0"), what="agent-d1-0 ready")
    assert (
        core.read_namespaced_persistent_volume_claim("data-agent-d1-0", NS).status.phase == "Bound"
    )


def test_lists_filter_by_label_and_field_selectors(core: client.CoreV1Api) -> None:
    for name, labels in (
        ("a", {"tier": "web", "env": "prod"}),
        ("b", {"tier": "db", "env": "prod"}),
        ("c", {"tier": "web"}),
    ):
        core.create_namespaced_config_map(NS, {"metadata": {"name": name, "labels": labels}})

    def names(**kw: str) -> list[str]:
        return [cm.metadata.name for cm in core.list_namespaced_config_map(NS, **kw).items]

    assert names(label_selector="tier=web") == ["a", "c"]
    assert names(label_selector="tier==web,env=prod") == ["a"]
    assert names(label_selector="tier!=web") == ["b"]
    assert names(label_selector="tier in (db, web),env") == ["a", "b"]
    assert names(label_selector="tier notin (web)") == ["b"]
    assert names(label_selector="!env") == ["c"]
    assert names(field_selector="metadata.name=b") == ["b"]
    assert names(field_selector="metadata.name!=b", label_selector="tier=web") == ["a", "c"]

    page = core.list_namespaced_config_map(NS, limit=2)
    assert [cm.metadata.name for cm in page.items] == ["a", "b"]
    rest = core.list_namespaced_config_map(NS, limit=2, _continue=page.metadata._continue)
    assert [cm.metadata.name for cm in rest.items] == ["c"]

    with pytest.raises(ApiException) as bad_label:
        core.list_namespaced_config_map(NS, label_selector="tier in (")
    assert bad_label.value.status == 400
    with pytest.raises(ApiException) as bad_field:
        core.list_namespaced_config_map(NS, field_selector="data.x=1")
    assert bad_field.value.status == 400
    assert status_of(bad_field.value)["message"] == "field label not supported: data.x"


# --- watches ------------------------------------------------------------------------------


def collect_events(
    stream: Iterator[dict[str, Any]], *, until: Callable[[dict[str, Any]], bool]
) -> list[dict[str, Any]]:
    seen = []
    try:
        for event in stream:
            seen.append(event)
            if until(event):
                break
    finally:
        stream.close()  # type: ignore[attr-defined]
    return seen


def test_watch_from_a_resource_version_streams_every_change(core: client.CoreV1Api) -> None:
    start = core.list_namespaced_config_map(NS).metadata.resource_version
    core.create_namespaced_config_map(NS, {"metadata": {"name": "w1", "labels": {"x": "1"}}})
    core.patch_namespaced_config_map("w1", NS, {"data": {"k": "v"}})
    core.delete_namespaced_config_map("w1", NS)

    stream = watch.Watch().stream(
        core.list_namespaced_config_map, NS, resource_version=start, timeout_seconds=30
    )
    events = collect_events(stream, until=lambda e: e["type"] == "DELETED")

    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "DELETED"]
    assert events[1]["object"].data == {"k": "v"}
    versions = [int(e["object"].metadata.resource_version) for e in events]
    assert versions == sorted(versions) and int(start) < versions[0]


def test_watch_with_a_selector_sees_objects_enter_and_leave_it(core: client.CoreV1Api) -> None:
    start = core.list_namespaced_config_map(NS).metadata.resource_version
    core.create_namespaced_config_map(NS, {"metadata": {"name": "s1", "labels": {"app": "other"}}})
    core.patch_namespaced_config_map("s1", NS, {"metadata": {"labels": {"app": "mine"}}})
    core.patch_namespaced_config_map("s1", NS, {"metadata": {"labels": {"app": "other"}}})

    stream = watch.Watch().stream(
        core.list_namespaced_config_map,
        NS,
        label_selector="app=mine",
        resource_version=start,
        timeout_seconds=30,
    )
    events = collect_events(stream, until=lambda e: e["type"] == "DELETED")

    assert [e["type"] for e in events] == ["ADDED", "DELETED"]


def test_watch_ends_at_its_timeout(core: client.CoreV1Api) -> None:
    stream = watch.Watch().stream(core.list_namespaced_pod, NS, timeout_seconds=1)

    assert collect_events(stream, until=lambda e: False) == []


def test_watch_from_a_compacted_resource_version_fails_with_410(
    kube: KubeDouble, core: client.CoreV1Api
) -> None:
    old = core.list_namespaced_config_map(NS).metadata.resource_version
    core.create_namespaced_config_map(NS, {"metadata": {"name": "c1"}})
    kube.compact()

    stream = watch.Watch().stream(
        core.list_namespaced_config_map, NS, resource_version=old, timeout_seconds=30
    )
    with pytest.raises(ApiException) as gone_error:
        collect_events(stream, until=lambda e: False)
    assert gone_error.value.status == 410

    # On the wire: 200, then one ERROR event carrying the Status.
    status, body = raw_request(
        kube, f"/api/v1/namespaces/{NS}/configmaps?watch=true&resourceVersion={old}"
    )
    assert status == 200
    event = json.loads(body.splitlines()[0])
    assert event["type"] == "ERROR"
    assert (event["object"]["code"], event["object"]["reason"]) == (410, "Expired")
    assert event["object"]["message"].startswith(f"too old resource version: {old} (")

    with pytest.raises(ApiException) as list_gone:
        core.list_namespaced_config_map(NS, resource_version=old, resource_version_match="Exact")
    assert list_gone.value.status == 410


def test_watch_sends_bookmarks_when_asked(tmp_path: Path) -> None:
    with (
        KubeDouble(tmp_path, timings=Timings(bookmark_interval=0.1)) as kube,
        _api_client(kube) as api,
    ):
        core = client.CoreV1Api(api)
        stream = watch.Watch().stream(
            core.list_namespaced_pod, NS, allow_watch_bookmarks=True, timeout_seconds=30
        )
        events = collect_events(stream, until=lambda e: e["type"] == "BOOKMARK")

    assert events[-1]["type"] == "BOOKMARK"
    assert int(events[-1]["raw_object"]["metadata"]["resourceVersion"]) > 0


# --- writes: conflicts, patches, validation ---------------------------------------------


def test_creating_twice_conflicts_with_already_exists(core: client.CoreV1Api) -> None:
    core.create_namespaced_config_map(NS, {"metadata": {"name": "dup"}})

    with pytest.raises(ApiException) as conflict:
        core.create_namespaced_config_map(NS, {"metadata": {"name": "dup"}})

    assert conflict.value.status == 409
    status = status_of(conflict.value)
    assert status["reason"] == "AlreadyExists"
    assert status["message"] == 'configmaps "dup" already exists'
    assert status["details"] == {"name": "dup", "kind": "configmaps"}


def test_replacing_a_stale_version_conflicts(core: client.CoreV1Api) -> None:
    first = core.create_namespaced_config_map(NS, {"metadata": {"name": "cm"}, "data": {"v": "1"}})
    core.patch_namespaced_config_map("cm", NS, {"data": {"v": "2"}})

    first.data = {"v": "3"}
    with pytest.raises(ApiException) as conflict:
        core.replace_namespaced_config_map("cm", NS, first)
    assert conflict.value.status == 409
    assert status_of(conflict.value)["message"] == (
        'Operation cannot be fulfilled on configmaps "cm": the object has been modified; '
        "please apply your changes to the latest version and try again"
    )

    current = core.read_namespaced_config_map("cm", NS)
    current.data = {"v": "3"}
    replaced = core.replace_namespaced_config_map("cm", NS, current)
    assert replaced.data == {"v": "3"}
    assert int(replaced.metadata.resource_version) > int(current.metadata.resource_version)

    # A write that changes nothing is not a write: same resourceVersion, no watch event.
    unchanged = core.patch_namespaced_config_map("cm", NS, {"data": {"v": "3"}})
    assert unchanged.metadata.resource_version == replaced.metadata.resource_version


def test_patches_change_labels_and_replicas_and_bump_generation_only_for_spec(
    kube: KubeDouble, core: client.CoreV1Api, apps: client.AppsV1Api
) -> None:
    created = apps.create_namespaced_stateful_set(NS, statefulset("agent-p1"))

    labelled = apps.patch_namespaced_stateful_set(
        "agent-p1", NS, {"metadata": {"labels": {"team": "a"}, "annotations": {"note": "x"}}}
    )
    assert labelled.metadata.labels == {"app": "agent-p1", "team": "a"}
    assert labelled.metadata.annotations == {"note": "x"}
    assert labelled.metadata.generation == created.metadata.generation

    scaled = apps.patch_namespaced_stateful_set(
        "agent-p1",
        NS,
        {"spec": {"replicas": 0}, "metadata": {"labels": {"team": None}}},
        _content_type="application/merge-patch+json",
    )
    assert scaled.spec.replicas == 0
    assert scaled.metadata.labels == {"app": "agent-p1"}
    assert scaled.metadata.generation == created.metadata.generation + 1
    kube.wait_for(
        lambda: gone(lambda: core.read_namespaced_pod("agent-p1-0", NS)), what="scaled to 0"
    )
    assert core.read_namespaced_persistent_volume_claim("data-agent-p1-0", NS)

    json_patched = apps.patch_namespaced_stateful_set(
        "agent-p1", NS, [{"op": "replace", "path": "/spec/replicas", "value": 1}]
    )
    assert json_patched.spec.replicas == 1
    assert json_patched.metadata.generation == created.metadata.generation + 2
    assert [r.method for r in kube.requests(verb="patch", resource="statefulsets")] == ["PATCH"] * 3
    kube.wait_for(lambda: pod_if_ready(core, "agent-p1-0"), what="scaled back to 1")


def test_a_deleted_pod_is_recreated_by_its_set(
    kube: KubeDouble, core: client.CoreV1Api, apps: client.AppsV1Api
) -> None:
    first = start_agent(kube, core, apps, "agent-p2")

    answer = core.delete_namespaced_pod("agent-p2-0", NS)

    # Graceful: the pod is answered back, terminating, and goes away a little later.
    assert answer.metadata.deletion_timestamp is not None
    assert answer.metadata.deletion_grace_period_seconds == 30
    second = kube.wait_for(
        lambda: (
            (pod := pod_if_ready(core, "agent-p2-0"))
            and pod.metadata.uid != first.metadata.uid
            and pod
        ),
        what="a new agent-p2-0",
    )
    assert second.metadata.labels == first.metadata.labels


def test_invalid_objects_are_refused_with_the_real_messages(
    kube: KubeDouble, core: client.CoreV1Api, apps: client.AppsV1Api
) -> None:
    def refused(create: Callable[[], Any]) -> dict[str, Any]:
        with pytest.raises(ApiException) as error:
            create()
        return {"code": error.value.status, **status_of(error.value)}

    bad_quantity = statefulset("agent-q1")
    bad_quantity["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] = (
        "12xyz"
    )
    status = refused(lambda: apps.create_namespaced_stateful_set(NS, bad_quantity))
    # Quantities are parsed while decoding: the real server answers 400, not 422.
    assert (status["code"], status["reason"]) == (400, "BadRequest")
    assert status["message"] == (
        'StatefulSet in version "v1" cannot be handled as a StatefulSet: quantities must match '
        "the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"
    )

    long_name = "agent-" + "a" * 58
    too_long = statefulset("agent-q0")
    too_long["metadata"]["name"] = long_name
    status = refused(lambda: apps.create_namespaced_stateful_set(NS, too_long))
    assert (status["code"], status["reason"]) == (422, "Invalid")
    assert status["message"] == (
        f'StatefulSet.apps "{long_name}" is invalid: metadata.name: Invalid value: "{long_name}": '
        "must be no more than 63 characters"
    )
    assert status["details"]["causes"][0]["field"] == "metadata.name"

    status = refused(lambda: core.create_namespaced_service(NS, headless_service("1-agent")))
    assert status["code"] == 422
    assert (
        "a DNS-1035 label must consist of lower case alphanumeric characters" in status["message"]
    )

    long_label = {"metadata": {"name": "cm", "labels": {"session": "s" * 64}}}
    status = refused(lambda: core.create_namespaced_config_map(NS, long_label))
    assert status["message"] == (
        f'ConfigMap "cm" is invalid: metadata.labels: Invalid value: "{"s" * 64}": '
        "must be no more than 63 characters"
    )

    # The client itself refuses unknown fields in dict bodies; other clients may not.
    typo = statefulset("agent-q2")
    typo["spec"]["volumeClaimTemplate"] = typo["spec"].pop("volumeClaimTemplates")
    code, body = raw_request(
        kube, f"/apis/apps/v1/namespaces/{NS}/statefulsets", method="POST", body=typo
    )
    assert code == 422
    assert 'unknown field "spec.volumeClaimTemplate"' in json.loads(body)["message"]

    mismatched = statefulset("agent-q3")
    mismatched["spec"]["selector"]["matchLabels"] = {"app": "else"}
    status = refused(lambda: apps.create_namespaced_stateful_set(NS, mismatched))
    assert "`selector` does not match template `labels`" in status["message"]

    apps.create_namespaced_stateful_set(NS, statefulset("agent-q4"))
    immutable = {"spec": {"volumeClaimTemplates": []}}
    status = refused(lambda: apps.patch_namespaced_stateful_set("agent-q4", NS, immutable))
    assert status["code"] == 422
    assert "spec: Forbidden: updates to statefulset spec for fields other than" in status["message"]


def test_reads_of_missing_objects_are_404_with_a_status(apps: client.AppsV1Api) -> None:
    with pytest.raises(ApiException) as missing:
        apps.read_namespaced_stateful_set("agent-none", NS)

    assert missing.value.status == 404
    status = status_of(missing.value)
    assert status["message"] == 'statefulsets.apps "agent-none" not found'
    assert status["details"] == {"name": "agent-none", "group": "apps", "kind": "statefulsets"}


def test_delete_answers_a_status_or_the_object_like_the_real_server(core: client.CoreV1Api) -> None:
    core.create_namespaced_config_map(NS, {"metadata": {"name": "gone"}})
    core.create_namespaced_service(NS, headless_service("agent-g1"))

    deleted_cm = core.delete_namespaced_config_map("gone", NS)
    deleted_svc = core.delete_namespaced_service("agent-g1-headless", NS)

    # The client hands the Status back as a plain dict (its OpenAPI type is "object").
    assert (deleted_cm["kind"], deleted_cm["status"]) == ("Status", "Success")
    assert deleted_cm["details"]["kind"] == "configmaps"
    assert deleted_svc.metadata.name == "agent-g1-headless"
    with pytest.raises(ApiException) as again:
        core.delete_namespaced_config_map("gone", NS)
    assert again.value.status == 404


# --- deletion: cascades, retention, finalizers --------------------------------------------


def test_deleting_a_statefulset_removes_its_pod_but_keeps_its_claim(
    kube: KubeDouble, core: client.CoreV1Api, apps: client.AppsV1Api
) -> None:
    start_agent(kube, core, apps, "agent-d2")

    apps.delete_namespaced_stateful_set("agent-d2", NS, propagation_policy="Background")

    kube.wait_for(lambda: gone(lambda: core.read_namespaced_pod("agent-d2-0", NS)), what="pod gone")
    pvc = core.read_namespaced_persistent_volume_claim("data-agent-d2-0", NS)
    assert pvc.status.phase == "Bound"
    assert pvc.metadata.deletion_timestamp is None


def test_retention_policy_delete_removes_the_claim_with_the_set(
    kube: KubeDouble, core: client.CoreV1Api, apps: client.AppsV1Api
) -> None:
    start_agent(kube, core, apps, "agent-d3", retention="Delete")
    kube.wait_for(
        lambda: (
            core.read_namespaced_persistent_volume_claim(
                "data-agent-d3-0", NS
            ).metadata.owner_references
        ),
        what="claim owned by the set",
    )

    apps.delete_namespaced_stateful_set("agent-d3", NS)

    kube.wait_for(
        lambda: gone(lambda: core.read_namespaced_persistent_volume_claim("data-agent-d3-0", NS)),
        what="claim gone",
    )
    assert gone(lambda: core.read_namespaced_pod("agent-d3-0", NS))


def test_foreground_deletion_finalizes_the_set_after_its_pod(
    kube: KubeDouble, core: client.CoreV1Api, apps: client.AppsV1Api
) -> None:
    start_agent(kube, core, apps, "agent-d4")

    answer = apps.delete_namespaced_stateful_set("agent-d4", NS, propagation_policy="Foreground")

    # Not deleted yet: the set itself is answered, marked for deletion after its pod.
    assert answer["kind"] == "StatefulSet"
    assert answer["metadata"]["deletionTimestamp"]
    assert answer["metadata"]["finalizers"] == ["foregroundDeletion"]
    kube.wait_for(
        lambda: gone(lambda: apps.read_namespaced_stateful_set("agent-d4", NS)), what="set gone"
    )
    assert gone(lambda: core.read_namespaced_pod("agent-d4-0", NS))


def test_orphan_deletion_leaves_the_pod_running(
    kube: KubeDouble, core: client.CoreV1Api, apps: client.AppsV1Api
) -> None:
    start_agent(kube, core, apps, "agent-d5")

    apps.delete_namespaced_stateful_set("agent-d5", NS, propagation_policy="Orphan")

    kube.wait_for(
        lambda: gone(lambda: apps.read_namespaced_stateful_set("agent-d5", NS)), what="set gone"
    )
    pod = core.read_namespaced_pod("agent-d5-0", NS)
    assert pod.metadata.deletion_timestamp is None
    assert not pod.metadata.owner_references


def test_a_claim_in_use_stays_terminating_until_its_pod_is_gone(
    kube: KubeDouble, core: client.CoreV1Api, apps: client.AppsV1Api
) -> None:
    start_agent(kube, core, apps, "agent-d6")

    answer = core.delete_namespaced_persistent_volume_claim("data-agent-d6-0", NS)
    assert answer.metadata.deletion_timestamp is not None
    pvc = core.read_namespaced_persistent_volume_claim("data-agent-d6-0", NS)
    assert pvc.metadata.finalizers == ["kubernetes.io/pvc-protection"]
    assert pod_if_ready(core, "agent-d6-0") is not None

    apps.delete_namespaced_stateful_set("agent-d6", NS)

    kube.wait_for(
        lambda: gone(lambda: core.read_namespaced_persistent_volume_claim("data-agent-d6-0", NS)),
        what="claim gone after its pod",
    )


# --- K01: long StatefulSet names fail only for some templates -----------------------------


def test_revision_hashes_have_8_to_10_characters_mostly_10() -> None:
    lengths = [len(revision_hash({"metadata": {"labels": {"n": str(i)}}})) for i in range(3000)]

    assert set(lengths) <= set(range(1, 11))
    assert {8, 9, 10} <= set(lengths)
    share_of_10 = lengths.count(10) / len(lengths)
    assert 0.7 < share_of_10 < 0.85  # 1 - 1e9/2**32 = 0.767 of uint32 values have 10 digits


def _outcome(
    kube: KubeDouble, core: client.CoreV1Api, apps: client.AppsV1Api, name: str, namespace: str
) -> str:
    def seen() -> str | None:
        if read_or_none(lambda: core.read_namespaced_pod(f"{name}-0", namespace)) is not None:
            return "pod"
        events = core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.name={name},reason=FailedCreate"
        )
        return "failed" if events.items else None

    outcome: str = kube.wait_for(seen, what=f"pod or FailedCreate for {name}")
    return outcome


def test_k01_a_53_character_set_name_fails_for_long_hashes_only(
    kube: KubeDouble, core: client.CoreV1Api, apps: client.AppsV1Api
) -> None:
    name = "agent-" + "a" * 47
    assert len(name) == 53
    outcomes: dict[str, str] = {}
    for variant in range(40):
        namespace = f"k01-{variant}"
        kube.add_namespace(namespace)
        apps.create_namespaced_stateful_set(
            namespace, statefulset(name, template_labels={"variant": str(variant)})
        )
        template = kube.get("statefulsets", name, namespace=namespace)["spec"]["template"]  # type: ignore[index]
        label = f"{name}-{revision_hash(template)}"

        outcome = _outcome(kube, core, apps, name, namespace)

        assert outcome == ("pod" if len(label) <= 63 else "failed"), label
        outcomes[outcome] = label
        if outcome == "failed":
            event = core.list_namespaced_event(
                namespace, field_selector="reason=FailedCreate"
            ).items[0]
            assert event.type == "Warning"
            assert event.message == (
                f'create Pod {name}-0 in StatefulSet {name} failed error: Pod "{name}-0" is '
                f'invalid: metadata.labels: Invalid value: "{label}": '
                "must be no more than 63 characters"
            )
            # The claim is created before the pod, so it exists anyway (and leaks).
            assert core.read_namespaced_persistent_volume_claim(f"data-{name}-0", namespace)
        if len(outcomes) == 2:
            break
    assert set(outcomes) == {"pod", "failed"}, "one run proves nothing: both outcomes must occur"


def test_k01_a_52_character_set_name_always_gets_its_pod(
    kube: KubeDouble, core: client.CoreV1Api, apps: client.AppsV1Api
) -> None:
    name = "agent-" + "a" * 46
    longest = 0
    for variant in range(6):
        namespace = f"k01-{variant}"
        kube.add_namespace(namespace)
        apps.create_namespaced_stateful_set(
            namespace, statefulset(name, template_labels={"variant": str(variant)})
        )
        assert _outcome(kube, core, apps, name, namespace) == "pod"
        pod = core.read_namespaced_pod(f"{name}-0", namespace)
        longest = max(longest, len(pod.metadata.labels["controller-revision-hash"]))
    assert longest == 63


# --- pod logs -----------------------------------------------------------------------------


def test_logs_are_read_with_tail_timestamps_and_limits(
    kube: KubeDouble, core: client.CoreV1Api, apps: client.AppsV1Api
) -> None:
    kube.append_log("agent-l1-0", "started\n", container="agent")  # before the container runs
    start_agent(kube, core, apps, "agent-l1")
    kube.append_log("agent-l1-0", "one\ntwo\nthree\n")

    assert core.read_namespaced_pod_log("agent-l1-0", NS) == "started\none\ntwo\nthree\n"
    assert core.read_namespaced_pod_log("agent-l1-0", NS, tail_lines=2) == "two\nthree\n"
    assert core.read_namespaced_pod_log("agent-l1-0", NS, limit_bytes=5) == "start"
    assert core.read_namespaced_pod_log("agent-l1-0", NS, since_seconds=3600).count("\n") == 4
    stamped = core.read_namespaced_pod_log("agent-l1-0", NS, timestamps=True, tail_lines=1)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z three\n", stamped)

    status, body = raw_request(
        kube, f"/api/v1/namespaces/{NS}/pods/agent-l1-0/log?sinceTime=2999-01-01T00:00:00Z"
    )
    assert (status, body) == (200, b"")

    with pytest.raises(ApiException) as no_previous:
        core.read_namespaced_pod_log("agent-l1-0", NS, previous=True)
    assert no_previous.value.status == 400
    assert status_of(no_previous.value)["message"] == (
        'previous terminated container "agent" in pod "agent-l1-0" not found'
    )
    with pytest.raises(ApiException) as bad_container:
        core.read_namespaced_pod_log("agent-l1-0", NS, container="nope")
    assert (
        status_of(bad_container.value)["message"]
        == "container nope is not valid for pod agent-l1-0"
    )


def test_following_logs_streams_new_lines_until_the_pod_is_deleted(
    kube: KubeDouble, core: client.CoreV1Api, apps: client.AppsV1Api
) -> None:
    start_agent(kube, core, apps, "agent-l2")
    kube.append_log("agent-l2-0", "first\n")
    lines: queue.Queue[str | None] = queue.Queue()

    def follow() -> None:
        try:
            for line in watch.Watch().stream(core.read_namespaced_pod_log, "agent-l2-0", NS):
                lines.put(line)
        finally:
            lines.put(None)

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    assert lines.get(timeout=20) == "first"
    kube.append_log("agent-l2-0", "second\n")
    assert lines.get(timeout=20) == "second"

    core.delete_namespaced_pod("agent-l2-0", NS, grace_period_seconds=0)

    assert lines.get(timeout=20) is None
    follower.join(timeout=20)
    assert not follower.is_alive()


def test_logs_of_a_container_that_never_started_say_why(
    kube: KubeDouble, core: client.CoreV1Api, apps: client.AppsV1Api
) -> None:
    kube.fail_image_pull("registry.invalid/agent:1")
    apps.create_namespaced_stateful_set(
        NS, statefulset("agent-l3", image="registry.invalid/agent:1")
    )

    def refusal() -> str | None:
        try:
            core.read_namespaced_pod_log("agent-l3-0", NS)
        except ApiException as exc:
            if exc.status == 400:
                message: str = status_of(exc)["message"]
                return message if "pull" in message else None
        return None

    message = kube.wait_for(refusal, what="log refusal naming the image pull")
    assert message.startswith('container "agent" in pod "agent-l3-0" is waiting to start: ')


def test_previous_logs_come_from_the_crashed_instance(
    kube: KubeDouble, core: client.CoreV1Api, apps: client.AppsV1Api
) -> None:
    kube.crash_loop("agent-l4-0", exit_code=3)
    kube.append_log("agent-l4-0", "before the crash\n", container="agent")
    apps.create_namespaced_stateful_set(NS, statefulset("agent-l4"))

    def restarted() -> client.V1ContainerStatus | None:
        pod = read_or_none(lambda: core.read_namespaced_pod("agent-l4-0", NS))
        statuses = (pod.status.container_statuses or []) if pod else []
        return (
            statuses[0]
            if statuses and statuses[0].restart_count >= 1 and statuses[0].state.running
            else None
        )

    kube.wait_for(restarted, what="first restart")
    assert core.read_namespaced_pod_log("agent-l4-0", NS, previous=True) == "before the crash\n"
    assert "before the crash" not in core.read_namespaced_pod_log("agent-l4-0", NS)


# --- pods/proxy ---------------------------------------------------------------------------


class _EchoHandler(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "body": self.rfile.read(length).decode(),
                "authorization": self.headers.get("Authorization"),
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = _answer
    do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield "127.0.0.1", server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _raw(connect: Callable[..., Any], path: str) -> bytes:
    # Without _preload_content=False the client turns a JSON answer into a Python repr.
    response = connect("agent-x1-0:3284", NS, path, _preload_content=False)
    try:
        return bytes(response.data)
    finally:
        response.release_conn()


def test_pod_proxy_forwards_to_the_server_registered_for_the_pod(
    kube: KubeDouble, core: client.CoreV1Api, apps: client.AppsV1Api, echo_server: tuple[str, int]
) -> None:
    start_agent(kube, core, apps, "agent-x1")

    with pytest.raises(ApiException) as unreachable:
        core.connect_get_namespaced_pod_proxy_with_path("agent-x1-0:3284", NS, "status")
    assert unreachable.value.status == 503
    assert status_of(unreachable.value)["message"].startswith(
        "error trying to reach service: dial tcp "
    )

    kube.serve_pod("agent-x1-0", echo_server, port=3284)
    answer = json.loads(_raw(core.connect_get_namespaced_pod_proxy_with_path, "status"))
    assert answer == {"method": "GET", "path": "/status", "body": "", "authorization": None}

    posted = json.loads(_raw(core.connect_post_namespaced_pod_proxy_with_path, "message/deep"))
    assert (posted["method"], posted["path"]) == ("POST", "/message/deep")
    assert kube.requests(verb="create", resource="pods/proxy")[-1].status == 200

    with pytest.raises(ApiException) as missing:
        core.connect_get_namespaced_pod_proxy_with_path("agent-none-0:3284", NS, "status")
    assert missing.value.status == 404


# --- RBAC and request records -------------------------------------------------------------


def test_rbac_denials_are_worded_like_the_real_server(
    kube: KubeDouble, core: client.CoreV1Api, apps: client.AppsV1Api
) -> None:
    kube.deny("create", "statefulsets", group="apps")
    kube.deny("get", "pods/log")

    with pytest.raises(ApiException) as create_denied:
        apps.create_namespaced_stateful_set(NS, statefulset("agent-f1"))
    assert create_denied.value.status == 403
    status = status_of(create_denied.value)
    assert status["message"] == (
        f'statefulsets.apps is forbidden: User "{USER}" cannot create resource "statefulsets" '
        f'in API group "apps" in the namespace "{NS}"'
    )
    assert status["details"] == {"group": "apps", "kind": "statefulsets"}

    with pytest.raises(ApiException) as log_denied:
        core.read_namespaced_pod_log("agent-f1-0", NS)
    assert status_of(log_denied.value)["message"] == (
        f'pods "agent-f1-0" is forbidden: User "{USER}" cannot get resource "pods/log" '
        f'in API group "" in the namespace "{NS}"'
    )

    kube.allow("create", "statefulsets", group="apps")
    apps.create_namespaced_stateful_set(NS, statefulset("agent-f1"))


def test_access_reviews_answer_from_the_configured_rules(
    kube: KubeDouble, api: client.ApiClient
) -> None:
    kube.set_rbac_rules([PolicyRule(("get", "list", "watch"), ("",), ("pods", "pods/log"))])
    authz = client.AuthorizationV1Api(api)

    def allowed(verb: str, resource: str, group: str = "", subresource: str = "") -> bool:
        review = authz.create_self_subject_access_review(
            {
                "spec": {
                    "resourceAttributes": {
                        "namespace": NS,
                        "verb": verb,
                        "group": group,
                        "resource": resource,
                        "subresource": subresource,
                    }
                }
            }
        )
        return bool(review.status.allowed)

    assert allowed("watch", "pods")
    assert allowed("get", "pods", subresource="log")
    assert not allowed("create", "statefulsets", "apps")
    assert not allowed("delete", "pods")
    with pytest.raises(ApiException) as denied:
        client.CoreV1Api(api).list_namespaced_config_map(NS)
    assert denied.value.status == 403


def test_every_request_is_recorded_for_counting_and_rbac_coverage(
    kube: KubeDouble, core: client.CoreV1Api, apps: client.AppsV1Api
) -> None:
    kube.clear_requests()
    core.create_namespaced_config_map(NS, {"metadata": {"name": "r1"}})
    core.read_namespaced_config_map("r1", NS)
    core.list_namespaced_config_map(NS, label_selector="a=b")
    with pytest.raises(ApiException):
        apps.read_namespaced_stateful_set("missing", NS)

    assert [(r.verb, r.resource, r.status) for r in kube.requests()] == [
        ("create", "configmaps", 201),
        ("get", "configmaps", 200),
        ("list", "configmaps", 200),
        ("get", "statefulsets", 404),
    ]
    assert kube.requests(verb="list")[0].query == {"labelSelector": "a=b"}
    assert kube.permissions_used() == {
        ("", "configmaps", "create"),
        ("", "configmaps", "get"),
        ("", "configmaps", "list"),
        ("apps", "statefulsets", "get"),
    }


# --- fault knobs --------------------------------------------------------------------------


def _waiting_reason(core: client.CoreV1Api, pod_name: str) -> str | None:
    pod = read_or_none(lambda: core.read_namespaced_pod(pod_name, NS))
    statuses = (pod.status.container_statuses or []) if pod else []
    if statuses and statuses[0].state.waiting:
        return str(statuses[0].state.waiting.reason)
    return None


def test_image_pull_failure_shows_err_image_pull_then_back_off(
    kube: KubeDouble, core: client.CoreV1Api, apps: client.AppsV1Api
) -> None:
    kube.fail_image_pull("registry.invalid/agent:1", "rpc error: code = NotFound desc = not found")
    apps.create_namespaced_stateful_set(
        NS, statefulset("agent-i1", image="registry.invalid/agent:1")
    )

    kube.wait_for(
        lambda: _waiting_reason(core, "agent-i1-0") == "ErrImagePull", what="ErrImagePull"
    )
    kube.wait_for(
        lambda: _waiting_reason(core, "agent-i1-0") == "ImagePullBackOff", what="back-off"
    )
    pod = core.read_namespaced_pod("agent-i1-0", NS)
    assert pod.status.phase == "Pending"
    messages = {
        e.message
        for e in core.list_namespaced_event(
            NS, field_selector="involvedObject.name=agent-i1-0"
        ).items
        if e.type == "Warning" and e.reason == "Failed"
    }
    pull_error = "rpc error: code = NotFound desc = not found"
    assert f'Failed to pull image "registry.invalid/agent:1": {pull_error}' in messages
    assert "Error: ImagePullBackOff" in messages

    kube.clear_image_pull_failure("registry.invalid/agent:1")
    kube.wait_for(lambda: pod_if_ready(core, "agent-i1-0"), what="pod runs once the image pulls")


def test_without_a_storage_class_claim_and_pod_stay_pending(
    kube: KubeDouble, core: client.CoreV1Api, apps: client.AppsV1Api
) -> None:
    kube.set_default_storage_class(None)
    apps.create_namespaced_stateful_set(NS, statefulset("agent-v1"))

    def unschedulable() -> client.V1PodCondition | None:
        pod = read_or_none(lambda: core.read_namespaced_pod("agent-v1-0", NS))
        for condition in (pod.status.conditions or []) if pod else []:
            if condition.type == "PodScheduled" and condition.status == "False":
                return condition
        return None

    condition = kube.wait_for(unschedulable, what="PodScheduled=False")
    assert condition.reason == "Unschedulable"
    assert condition.message.startswith(
        "0/3 nodes are available: pod has unbound immediate PersistentVolumeClaims."
    )
    assert (
        core.read_namespaced_persistent_volume_claim("data-agent-v1-0", NS).status.phase
        == "Pending"
    )
    # Events are recorded by each controller on its own pass, as in a real cluster.
    kube.wait_for(
        lambda: (
            {"FailedScheduling", "FailedBinding"}
            <= {e.reason for e in core.list_namespaced_event(NS).items}
        ),
        what="FailedScheduling and FailedBinding events",
    )

    kube.set_default_storage_class("standard")
    kube.wait_for(
        lambda: pod_if_ready(core, "agent-v1-0"), what="pod runs once a default class exists"
    )


def test_failed_provisioning_is_reported_on_the_claim_and_the_pod(
    kube: KubeDouble, core: client.CoreV1Api, apps: client.AppsV1Api
) -> None:
    kube.fail_provisioning("failed to provision volume: no space left on the storage pool")
    apps.create_namespaced_stateful_set(NS, statefulset("agent-v2"))

    def provisioning_failed() -> list[client.CoreV1Event]:
        selector = "involvedObject.name=data-agent-v2-0,reason=ProvisioningFailed"
        return list(core.list_namespaced_event(NS, field_selector=selector).items)

    event = kube.wait_for(provisioning_failed, what="ProvisioningFailed")[0]
    assert event.type == "Warning"
    assert event.message == "failed to provision volume: no space left on the storage pool"
    kube.wait_for(
        lambda: (
            core.list_namespaced_event(
                NS, field_selector="involvedObject.name=agent-v2-0,reason=FailedScheduling"
            ).items
        ),
        what="FailedScheduling",
    )

    kube.fail_provisioning(None)
    kube.wait_for(lambda: pod_if_ready(core, "agent-v2-0"), what="pod runs once provisioning works")


def test_insufficient_capacity_keeps_the_pod_unschedulable(
    kube: KubeDouble, core: client.CoreV1Api, apps: client.AppsV1Api
) -> None:
    kube.set_insufficient("cpu")
    apps.create_namespaced_stateful_set(NS, statefulset("agent-c1"))

    def failed_scheduling() -> list[client.CoreV1Event]:
        events = core.list_namespaced_event(
            NS, field_selector="involvedObject.name=agent-c1-0,reason=FailedScheduling"
        ).items
        return list(events)

    event = kube.wait_for(failed_scheduling, what="FailedScheduling")[0]
    assert event.message.startswith("0/3 nodes are available: 3 Insufficient cpu.")
    assert core.read_namespaced_pod("agent-c1-0", NS).status.phase == "Pending"

    kube.set_insufficient(None)
    kube.wait_for(lambda: pod_if_ready(core, "agent-c1-0"), what="pod runs once there is room")


def test_crash_loop_restarts_with_back_off(
    kube: KubeDouble, core: client.CoreV1Api, apps: client.AppsV1Api
) -> None:
    kube.crash_loop("agent-k1-0", exit_code=3)
    apps.create_namespaced_stateful_set(NS, statefulset("agent-k1"))

    kube.wait_for(
        lambda: _waiting_reason(core, "agent-k1-0") == "CrashLoopBackOff", what="back-off"
    )
    pod = core.read_namespaced_pod("agent-k1-0", NS)
    status = pod.status.container_statuses[0]
    assert status.last_state.terminated.exit_code == 3
    assert not status.ready

    def restarts() -> int:
        current = core.read_namespaced_pod("agent-k1-0", NS)
        return int(current.status.container_statuses[0].restart_count)

    kube.wait_for(lambda: restarts() >= 2, what="two restarts")
    assert pod.status.phase == "Running"
    backoff = core.list_namespaced_event(
        NS, field_selector="involvedObject.name=agent-k1-0,reason=BackOff"
    )
    assert backoff.items[0].type == "Warning"


def test_unavailable_server_and_injected_errors(kube: KubeDouble, core: client.CoreV1Api) -> None:
    kube.set_unavailable()
    with pytest.raises(ApiException) as unavailable:
        core.list_namespaced_config_map(NS)
    assert unavailable.value.status == 503
    assert status_of(unavailable.value)["reason"] == "ServiceUnavailable"
    kube.set_unavailable(False)
    core.list_namespaced_config_map(NS)

    kube.inject_error(500, verb="create", resource="configmaps", times=1)
    with pytest.raises(ApiException) as injected:
        core.create_namespaced_config_map(NS, {"metadata": {"name": "e1"}})
    assert injected.value.status == 500
    assert core.create_namespaced_config_map(NS, {"metadata": {"name": "e1"}}).metadata.name == "e1"


def test_slow_responses_run_into_client_timeouts(kube: KubeDouble, core: client.CoreV1Api) -> None:
    kube.set_latency(5.0, verb="list", resource="pods")

    # The client does not wrap urllib3's errors: a read timeout after its retries.
    with pytest.raises(urllib3.exceptions.HTTPError) as slow:
        core.list_namespaced_pod(NS, _request_timeout=0.2)
    assert "timed out" in str(slow.value).lower()

    kube.set_latency(0, verb="list", resource="pods")
    assert core.list_namespaced_config_map(NS, _request_timeout=30).items == []


# --- cleanup ------------------------------------------------------------------------------


def test_stop_ends_open_streams_and_frees_the_port(tmp_path: Path) -> None:
    kube = KubeDouble(tmp_path).start()
    ended: queue.Queue[str] = queue.Queue()

    def drain(what: str, open_stream: Callable[[], Iterator[Any]]) -> None:
        try:
            for _ in open_stream():
                pass
        except Exception:  # the end may be clean or a reset connection; both are fine
            pass
        ended.put(what)

    with _api_client(kube) as api:
        core = client.CoreV1Api(api)
        try:
            start_agent(kube, core, client.AppsV1Api(api), "agent-z1")
            streams: dict[str, Callable[[], Iterator[Any]]] = {
                "watch": lambda: watch.Watch().stream(core.list_namespaced_pod, NS),
                "logs": lambda: watch.Watch().stream(
                    core.read_namespaced_pod_log, "agent-z1-0", NS
                ),
            }
            for what, open_stream in streams.items():
                threading.Thread(target=drain, args=(what, open_stream), daemon=True).start()
            kube.wait_for(
                lambda: kube.requests(verb="watch") and kube.requests(resource="pods/log"),
                what="both streams open",
            )
        finally:
            kube.stop()

        assert {ended.get(timeout=30), ended.get(timeout=30)} == {"watch", "logs"}

    with socket.socket() as probe, pytest.raises(OSError):
        probe.connect(("127.0.0.1", kube.port))
    assert not kube.kubeconfig.exists()
