"""API keys, owners and permissions over real gRPC."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from agentapi_proxy.auth import KeyStore, presented_key
from agentapi_proxy.errors import Unauthenticated
from agentapi_proxy.settings import SettingsError
from agentapi_proxy.v1 import agent_service_pb2 as pb
from tests.harness import ProxyProcess, running_proxy, stub
from tests.test_process_agents import expect_code

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdef00"
ADMIN = "admin-key-0123456789abcdef"
READER = "reader-key-0123456789abcdef"
OLD = "expired-key-0123456789abcdef"


def write_keys(path: Path) -> Path:
    past = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    entries = [
        {"key": ALICE, "user_id": "alice", "role": "user", "permissions": ["*"]},
        {"key": BOB, "user_id": "bob", "role": "user", "permissions": ["*"], "expires_at": future},
        {"key": ADMIN, "user_id": "root", "role": "admin", "permissions": []},
        {"key": READER, "user_id": "carol", "role": "user", "permissions": ["session:list"]},
        {"key": OLD, "user_id": "dave", "role": "user", "permissions": ["*"], "expires_at": past},
    ]
    path.write_text(json.dumps({"api_keys": entries}))
    return path


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[ProxyProcess]:
    keys = write_keys(tmp_path / "keys.json")
    env = {"AGENTAPI_AUTH_ENABLED": "true", "AGENTAPI_AUTH_API_KEYS_FILE": str(keys)}
    with running_proxy(tmp_path, env=env, command="control-plane") as proxy:
        yield proxy


def as_user(key: str) -> tuple[tuple[str, str], ...]:
    return (("x-api-key", key),)


class TestKeys:
    def test_bearer_and_header_forms(self) -> None:
        assert presented_key([("authorization", "Bearer abc")]) == "abc"
        assert presented_key([("x-api-key", "xyz")]) == "xyz"
        assert presented_key([("authorization", "Basic abc")]) is None

    def test_expired_and_unknown_keys_are_refused(self, tmp_path: Path) -> None:
        store = KeyStore(write_keys(tmp_path / "keys.json"))
        assert store.authenticate(ALICE).user_id == "alice"
        with pytest.raises(Unauthenticated, match="expired"):
            store.authenticate(OLD)
        with pytest.raises(Unauthenticated, match="not valid"):
            store.authenticate("nope-0123456789abcdef")

    def test_a_changed_file_is_picked_up(self, tmp_path: Path) -> None:
        path = write_keys(tmp_path / "keys.json")
        store = KeyStore(path)
        data = json.loads(path.read_text())
        data["api_keys"].append(
            {"key": "new-key-0123456789abcdef", "user_id": "eve", "permissions": ["*"]}
        )
        path.write_text(json.dumps(data, indent=2))
        assert store.authenticate("new-key-0123456789abcdef").user_id == "eve"

    @pytest.mark.parametrize(
        "entry",
        [
            {"key": "short", "user_id": "x"},
            {"key": "k" * 20},
            {"key": "k" * 20, "user_id": "x", "permissions": ["session:fly"]},
            {"key": "k" * 20, "user_id": "x", "expires_at": "tomorrow"},
        ],
    )
    def test_bad_entries_name_the_problem(self, tmp_path: Path, entry: dict[str, object]) -> None:
        path = tmp_path / "keys.json"
        path.write_text(json.dumps({"api_keys": [entry]}))
        with pytest.raises(SettingsError, match=r"api_keys\[0\]"):
            KeyStore(path)


class TestOwnership:
    async def test_users_see_only_their_agents_and_admins_see_all(
        self, secured: ProxyProcess
    ) -> None:
        channel, agents = stub(secured.grpc_target)
        async with channel:
            request = pb.CreateAgentRequest(session_id="s", agent_id="alices")
            created = await agents.CreateAgent(request, metadata=as_user(ALICE))
            assert created.agent.owner == "alice"

            await expect_code(
                agents.GetAgent(pb.GetAgentRequest(agent_id="alices"), metadata=as_user(BOB)),
                grpc.StatusCode.NOT_FOUND,
            )
            await expect_code(
                agents.DeleteAgent(pb.DeleteAgentRequest(agent_id="alices"), metadata=as_user(BOB)),
                grpc.StatusCode.NOT_FOUND,
            )
            logs = agents.StreamLogs(pb.StreamLogsRequest(agent_id="alices"), metadata=as_user(BOB))
            await expect_code(logs.read(), grpc.StatusCode.NOT_FOUND)
            bobs = await agents.ListAgents(pb.ListAgentsRequest(), metadata=as_user(BOB))
            assert list(bobs.agents) == []

            everything = await agents.ListAgents(pb.ListAgentsRequest(), metadata=as_user(ADMIN))
            assert [a.agent_id for a in everything.agents] == ["alices"]
            admin_view = await agents.GetAgent(
                pb.GetAgentRequest(agent_id="alices"), metadata=as_user(ADMIN)
            )
            assert admin_view.agent.owner == "alice"

            taken = await expect_code(
                agents.CreateAgent(
                    pb.CreateAgentRequest(session_id="s", agent_id="alices"),
                    metadata=as_user(BOB),
                ),
                grpc.StatusCode.ALREADY_EXISTS,
            )
            assert "taken" in (taken.details() or "") and "delete" not in (taken.details() or "")

            bearer = (("authorization", f"Bearer {ALICE}"),)
            await agents.DeleteAgent(pb.DeleteAgentRequest(agent_id="alices"), metadata=bearer)

        assert ALICE not in secured.log_text() and ADMIN not in secured.log_text()

    async def test_missing_expired_and_insufficient_credentials(
        self, secured: ProxyProcess
    ) -> None:
        channel, agents = stub(secured.grpc_target)
        async with channel:
            request = pb.CreateAgentRequest(session_id="s", agent_id="x1")
            error = await expect_code(agents.CreateAgent(request), grpc.StatusCode.UNAUTHENTICATED)
            assert "X-API-Key" in (error.details() or "")
            await expect_code(
                agents.CreateAgent(request, metadata=as_user(OLD)), grpc.StatusCode.UNAUTHENTICATED
            )
            error = await expect_code(
                agents.CreateAgent(request, metadata=as_user(READER)),
                grpc.StatusCode.PERMISSION_DENIED,
            )
            assert "session:create" in (error.details() or "")
            listed = await agents.ListAgents(pb.ListAgentsRequest(), metadata=as_user(READER))
            assert list(listed.agents) == []
            assert secured.agent_records() == []


def test_refuses_to_listen_beyond_loopback_without_auth(tmp_path: Path) -> None:
    proxy = ProxyProcess(tmp_path, env={"AGENTAPI_SERVER_GRPC_LISTEN": "0.0.0.0:0"})
    result = subprocess.run(
        [sys.executable, "-m", "agentapi_proxy", "control-plane"],
        env=proxy.env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "0.0.0.0:0" in result.stderr and "auth.enabled" in result.stderr


async def test_a_refused_traffic_stream_always_reports_why(secured: ProxyProcess) -> None:
    """grpc.aio clients misreport a status sent while they still write (grpc/grpc#36066);
    the control plane lets them finish the request first, so the real reason arrives."""
    request = pb.ProxyHTTPRequest(
        head=pb.HTTPRequestHead(agent_id="nobody", method="POST", path="/echo"),
        body=b"x",
        end_of_body=True,
    )
    seen: dict[tuple[grpc.StatusCode, bool], int] = {}
    for attempt in range(60):
        key = () if attempt % 2 else as_user(BOB)
        channel, agents = stub(secured.grpc_target)
        async with channel:
            call = agents.ProxyHTTP(iter([request]), metadata=key)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in call:
                    pass
        outcome = (caught.value.code(), bool(key))
        seen[outcome] = seen.get(outcome, 0) + 1
    assert seen == {
        (grpc.StatusCode.UNAUTHENTICATED, False): 30,
        (grpc.StatusCode.NOT_FOUND, True): 30,
    }


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:8080", True),
        ("127.5.6.7:1", True),
        ("[::1]:50051", True),
        ("localhost:8080", True),
        ("127.evil.example:8080", False),
        ("127.0.0.1.nip.io:8080", False),
        ("0.0.0.0:8080", False),
        ("10.0.0.1:8080", False),
    ],
)
def test_only_loopback_addresses_count_as_loopback(address: str, loopback: bool) -> None:
    from agentapi_proxy.auth import is_loopback

    assert is_loopback(address) is loopback
