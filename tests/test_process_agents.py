"""Legacy mode over real gRPC: agents as real processes under a real control plane."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from agentapi_proxy.v1 import agent_service_pb2 as pb
from agentapi_proxy.v1 import agent_service_pb2_grpc as pb_grpc
from tests.harness import ProxyProcess, eventually, group_members, port_is_free, running_proxy, stub

REFERENCE = f"{sys.executable} -m agentapi_proxy.reference_agent --port {{port}}"


async def create_ready(
    agents: pb_grpc.AgentServiceStub, agent_id: str, session_id: str = "s1"
) -> pb.Agent:
    await agents.CreateAgent(pb.CreateAgentRequest(session_id=session_id, agent_id=agent_id))
    waited = await agents.WaitAgent(
        pb.WaitAgentRequest(agent_id=agent_id, timeout=Duration(seconds=60))
    )
    assert waited.agent.state == pb.AGENT_STATE_READY
    return waited.agent


async def expect_code(call: object, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == code, caught.value.details()
    return caught.value


def agent_pid(proxy: ProxyProcess, agent_id: str) -> int:
    for record in proxy.agent_records():
        if record["spec"]["agent_id"] == agent_id:  # type: ignore[index]
            return int(record["pid"])  # type: ignore[arg-type]
    raise AssertionError(f"no record for {agent_id}")


class TestLifecycle:
    async def test_create_wait_get_list_delete_leaves_nothing(
        self, proxy: ProxyProcess, client: pb_grpc.AgentServiceStub
    ) -> None:
        created = await client.CreateAgent(
            pb.CreateAgentRequest(session_id="my-session", agent_id="a1", env={"GREETING": "hi"})
        )
        assert created.created
        assert created.agent.state in (pb.AGENT_STATE_STARTING, pb.AGENT_STATE_READY)
        agent = (await client.WaitAgent(pb.WaitAgentRequest(agent_id="a1"))).agent
        assert agent.state == pb.AGENT_STATE_READY
        assert agent.ready_time.seconds > 0
        port = int(agent.address.rsplit(":", 1)[1])
        pgid = agent_pid(proxy, "a1")
        assert group_members(pgid)

        listed = await client.ListAgents(pb.ListAgentsRequest(session_id="my-session"))
        assert [a.agent_id for a in listed.agents] == ["a1"]
        assert (await client.ListAgents(pb.ListAgentsRequest(session_id="other"))).agents == []
        got = await client.GetAgent(pb.GetAgentRequest(agent_id="a1"))
        assert got.agent.env["GREETING"] == "hi"
        assert got.agent.mode == pb.RUNTIME_MODE_PROCESS

        deleted = await client.DeleteAgent(pb.DeleteAgentRequest(agent_id="a1"))
        assert deleted.agent.state == pb.AGENT_STATE_DELETED
        assert group_members(pgid) == []
        assert port_is_free(port)
        assert not (proxy.state_dir / "agents" / "a1").exists()
        await expect_code(
            client.GetAgent(pb.GetAgentRequest(agent_id="a1")), grpc.StatusCode.NOT_FOUND
        )
        await expect_code(
            client.DeleteAgent(pb.DeleteAgentRequest(agent_id="a1")), grpc.StatusCode.NOT_FOUND
        )

    async def test_create_is_idempotent_for_the_same_spec(
        self, client: pb_grpc.AgentServiceStub
    ) -> None:
        request = pb.CreateAgentRequest(session_id="s", agent_id="same", env={"A": "1"})
        first = await client.CreateAgent(request)
        again = await client.CreateAgent(request)
        assert first.created and not again.created
        assert again.agent.address == first.agent.address
        other = pb.CreateAgentRequest(session_id="s", agent_id="same", env={"A": "2"})
        error = await expect_code(client.CreateAgent(other), grpc.StatusCode.ALREADY_EXISTS)
        assert "different spec" in (error.details() or "")
        assert len((await client.ListAgents(pb.ListAgentsRequest())).agents) == 1

    async def test_create_without_id_generates_one(self, client: pb_grpc.AgentServiceStub) -> None:
        created = await client.CreateAgent(pb.CreateAgentRequest(session_id="my-session"))
        assert created.agent.agent_id
        await client.DeleteAgent(pb.DeleteAgentRequest(agent_id=created.agent.agent_id))

    async def test_concurrent_creates_of_one_id_make_one_agent(
        self, proxy: ProxyProcess, client: pb_grpc.AgentServiceStub
    ) -> None:
        request = pb.CreateAgentRequest(session_id="s", agent_id="race")
        results = await asyncio.gather(*(client.CreateAgent(request) for _ in range(10)))
        assert sum(r.created for r in results) == 1
        assert len({r.agent.address for r in results}) == 1
        assert len(proxy.agent_records()) == 1


class TestBadInput:
    @pytest.mark.parametrize(
        ("agent_id", "fragment"),
        [
            ("a" * 47, "46"),
            ("Upper", "lower-case"),
            ("-dash", "starting and ending"),
            ("has_underscore", "lower-case"),
            ("x" * 300, "46"),
        ],
    )
    async def test_bad_agent_ids_are_refused_before_anything_exists(
        self, proxy: ProxyProcess, client: pb_grpc.AgentServiceStub, agent_id: str, fragment: str
    ) -> None:
        error = await expect_code(
            client.CreateAgent(pb.CreateAgentRequest(session_id="s", agent_id=agent_id)),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert fragment in (error.details() or "")
        assert proxy.agent_records() == []

    async def test_longest_allowed_id_works(self, client: pb_grpc.AgentServiceStub) -> None:
        agent = await create_ready(client, "a" * 46)
        assert agent.agent_id == "a" * 46

    @pytest.mark.parametrize(
        "request_",
        [
            pb.CreateAgentRequest(session_id="", agent_id="x"),
            pb.CreateAgentRequest(session_id="bad session", agent_id="x"),
            pb.CreateAgentRequest(session_id="s", agent_id="x", env={"1BAD": "v"}),
            pb.CreateAgentRequest(session_id="s", agent_id="x", labels={"bad key!": "v"}),
            pb.CreateAgentRequest(
                session_id="s", agent_id="x", labels={f"k{i}": "v" for i in range(33)}
            ),
            pb.CreateAgentRequest(
                session_id="s", agent_id="x", env={f"V{i}": "x" * 30_000 for i in range(3)}
            ),
        ],
    )
    async def test_bad_create_fields(
        self, client: pb_grpc.AgentServiceStub, request_: pb.CreateAgentRequest
    ) -> None:
        await expect_code(client.CreateAgent(request_), grpc.StatusCode.INVALID_ARGUMENT)

    async def test_log_options_are_checked(self, client: pb_grpc.AgentServiceStub) -> None:
        await create_ready(client, "opts")
        both = pb.StreamLogsRequest(agent_id="opts", since=Duration(seconds=5))
        both.since_time.GetCurrentTime()
        for request in (
            both,
            pb.StreamLogsRequest(agent_id="opts", limit_bytes=0),
            pb.StreamLogsRequest(agent_id="opts", since=Duration(seconds=-1)),
        ):
            await expect_code(_drain(client.StreamLogs(request)), grpc.StatusCode.INVALID_ARGUMENT)
        await expect_code(
            _drain(client.StreamLogs(pb.StreamLogsRequest(agent_id="opts", previous=True))),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        await expect_code(
            _drain(client.StreamLogs(pb.StreamLogsRequest(agent_id="nope"))),
            grpc.StatusCode.NOT_FOUND,
        )


async def _drain(call: grpc.aio.UnaryStreamCall) -> list[object]:  # type: ignore[type-arg]
    return [item async for item in call]


class TestFailures:
    async def test_crashing_agent_reports_exit_code_and_log_tail(self, tmp_path: Path) -> None:
        command = "sh -c 'echo starting; echo boom >&2; exit 3'"
        env = {"AGENTAPI_PROCESS_COMMAND": command, "AGENTAPI_PROCESS_RESTART_POLICY": "never"}
        with running_proxy(tmp_path, env=env, command="control-plane") as proxy:
            channel, agents = stub(proxy.grpc_target)
            async with channel:
                await agents.CreateAgent(pb.CreateAgentRequest(session_id="s", agent_id="crash"))
                error = await expect_code(
                    agents.WaitAgent(pb.WaitAgentRequest(agent_id="crash")),
                    grpc.StatusCode.FAILED_PRECONDITION,
                )
                assert "exited with code 3" in (error.details() or "")
                agent = (await agents.GetAgent(pb.GetAgentRequest(agent_id="crash"))).agent
                assert agent.state == pb.AGENT_STATE_FAILED
                assert agent.exit_code == 3
                assert "boom" in agent.log_tail and "starting" in agent.log_tail

    async def test_failing_agent_is_restarted_with_back_off_and_keeps_its_previous_log(
        self, tmp_path: Path
    ) -> None:
        # Fails twice, then serves: the on-failure policy brings it up on the third run.
        command = (
            "sh -c 'n=$(cat runs 2>/dev/null || echo 0); n=$((n+1)); echo $n > runs; "
            'echo run $n; [ $n -ge 3 ] || exit 4; exec "$0" -m agentapi_proxy.reference_agent '
            "--port {port}' {python}"
        )
        env = {
            "AGENTAPI_PROCESS_COMMAND": command,
            "AGENTAPI_PROCESS_RESTART_BACKOFF_SECONDS": "0.2",
        }
        with running_proxy(tmp_path, env=env, command="control-plane") as proxy:
            channel, agents = stub(proxy.grpc_target)
            async with channel:
                await agents.CreateAgent(pb.CreateAgentRequest(session_id="s", agent_id="flaky"))
                states = []
                async for change in agents.WatchAgent(pb.WatchAgentRequest(agent_id="flaky")):
                    states.append((change.agent.state, change.agent.reason))
                    if change.agent.state == pb.AGENT_STATE_READY:
                        assert change.agent.restart_count == 2
                        break
                assert (pb.AGENT_STATE_FAILED, "CrashLoopBackOff") in states

                previous = agents.StreamLogs(pb.StreamLogsRequest(agent_id="flaky", previous=True))
                assert b"".join([m.data async for m in previous]) == b"run 2\n"
                current = agents.StreamLogs(pb.StreamLogsRequest(agent_id="flaky"))
                assert b"".join([m.data async for m in current]).startswith(b"run 3\n")

    async def test_a_restart_moves_to_a_free_port_when_another_program_took_the_old_one(
        self, tmp_path: Path
    ) -> None:
        # Exits at once on its first run; serves on the second.
        command = (
            "sh -c 'n=$(cat runs 2>/dev/null || echo 0); n=$((n+1)); echo $n > runs; "
            '[ $n -ge 2 ] || exit 4; exec "$0" -m agentapi_proxy.reference_agent '
            "--port {port}' {python}"
        )
        env = {
            "AGENTAPI_PROCESS_COMMAND": command,
            "AGENTAPI_PROCESS_RESTART_BACKOFF_SECONDS": "1",
        }
        with running_proxy(tmp_path, env=env, command="control-plane") as proxy:
            channel, agents = stub(proxy.grpc_target)
            async with channel:
                created = await agents.CreateAgent(
                    pb.CreateAgentRequest(session_id="s", agent_id="moved")
                )
                old_port = int(created.agent.address.rsplit(":", 1)[1])
                # Another program listens on the agent's port while it waits to restart.
                with socket.socket() as squatter:
                    squatter.bind(("127.0.0.1", old_port))
                    squatter.listen()
                    watch = agents.WatchAgent(pb.WatchAgentRequest(agent_id="moved"))
                    async with asyncio.timeout(60):
                        async for change in watch:
                            if change.agent.state == pb.AGENT_STATE_READY:
                                break
                    new_port = int(change.agent.address.rsplit(":", 1)[1])
                    assert new_port != old_port
                    assert change.agent.restart_count == 1
                    async with (
                        aiohttp.ClientSession() as http,
                        http.get(f"http://127.0.0.1:{new_port}/status") as response,
                    ):
                        assert response.status == 200

    async def test_missing_agent_command_is_a_failed_precondition(self, tmp_path: Path) -> None:
        env = {"AGENTAPI_PROCESS_COMMAND": "no-such-agentapi-binary server --port {port}"}
        with running_proxy(tmp_path, env=env, command="control-plane") as proxy:
            channel, agents = stub(proxy.grpc_target)
            async with channel:
                error = await expect_code(
                    agents.CreateAgent(pb.CreateAgentRequest(session_id="s", agent_id="x")),
                    grpc.StatusCode.FAILED_PRECONDITION,
                )
                assert "process.command" in (error.details() or "")
                assert proxy.agent_records() == []

    async def test_restart_after_kill_9_finds_and_controls_agents(self, tmp_path: Path) -> None:
        with running_proxy(tmp_path, command="control-plane") as proxy:
            channel, agents = stub(proxy.grpc_target)
            async with channel:
                for agent_id in ("keep1", "keep2"):
                    await create_ready(agents, agent_id, session_id="restart")
            pgid = agent_pid(proxy, "keep1")
            proxy.stop(signal.SIGKILL)
            assert group_members(pgid), "agents must outlive the control plane"

            proxy.start()
            channel, agents = stub(proxy.grpc_target)
            async with channel:
                listed = await agents.ListAgents(pb.ListAgentsRequest(session_id="restart"))
                assert [a.agent_id for a in listed.agents] == ["keep1", "keep2"]
                ready = await agents.WaitAgent(pb.WaitAgentRequest(agent_id="keep1"))
                assert ready.agent.state == pb.AGENT_STATE_READY
                await agents.DeleteAgent(pb.DeleteAgentRequest(agent_id="keep1"))
                assert group_members(pgid) == []
                remaining = await agents.ListAgents(pb.ListAgentsRequest())
                assert [a.agent_id for a in remaining.agents] == ["keep2"]

    async def test_agent_that_died_while_control_plane_was_down_is_failed(
        self, tmp_path: Path
    ) -> None:
        with running_proxy(tmp_path, command="control-plane") as proxy:
            channel, agents = stub(proxy.grpc_target)
            async with channel:
                await create_ready(agents, "dies")
            proxy.stop(signal.SIGKILL)
            pgid = agent_pid(proxy, "dies")
            os.killpg(pgid, signal.SIGKILL)
            await eventually(lambda: not group_members(pgid))

            proxy.start()
            channel, agents = stub(proxy.grpc_target)
            async with channel:
                agent = (await agents.GetAgent(pb.GetAgentRequest(agent_id="dies"))).agent
                assert agent.state == pb.AGENT_STATE_FAILED
                await agents.DeleteAgent(pb.DeleteAgentRequest(agent_id="dies"))


class TestIsolation:
    async def test_a_stranger_on_the_agents_port_gets_no_traffic(self, tmp_path: Path) -> None:
        """Only the agent's own process group may serve its traffic (port takeover)."""
        env = {"AGENTAPI_PROCESS_COMMAND": "sh -c 'exec sleep 3600' # {port}"}
        with running_proxy(tmp_path, env=env, command="control-plane") as proxy:
            channel, agents = stub(proxy.grpc_target)
            async with channel:
                created = await agents.CreateAgent(
                    pb.CreateAgentRequest(session_id="s", agent_id="victim")
                )
                port = int(created.agent.address.rsplit(":", 1)[1])
                impostor = await asyncio.create_subprocess_exec(
                    *(sys.executable, "-m", "agentapi_proxy.reference_agent", "--port", str(port)),
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
                try:
                    async for change in agents.WatchAgent(pb.WatchAgentRequest(agent_id="victim")):
                        if change.agent.reason == "PortHijacked":
                            break
                        assert change.agent.state != pb.AGENT_STATE_READY
                    call = agents.ProxyHTTP()
                    await call.write(
                        pb.ProxyHTTPRequest(
                            head=pb.HTTPRequestHead(agent_id="victim", method="GET", path="/status")
                        )
                    )
                    await call.done_writing()
                    await expect_code(call.read(), grpc.StatusCode.FAILED_PRECONDITION)
                finally:
                    impostor.terminate()
                    await impostor.wait()

    async def test_open_streams_per_user_are_capped(self, tmp_path: Path) -> None:
        env = {"AGENTAPI_SERVER_MAX_STREAMS_PER_USER": "3"}
        with running_proxy(tmp_path, env=env, command="control-plane") as proxy:
            channel, agents = stub(proxy.grpc_target)
            async with channel:
                await create_ready(agents, "capped")
                follows = [
                    agents.StreamLogs(pb.StreamLogsRequest(agent_id="capped", follow=True))
                    for _ in range(3)
                ]
                for call in follows:
                    await call.read()
                extra = agents.StreamLogs(pb.StreamLogsRequest(agent_id="capped", follow=True))
                error = await expect_code(extra.read(), grpc.StatusCode.RESOURCE_EXHAUSTED)
                assert "max_streams_per_user" in (error.details() or "")
                follows[0].cancel()
                again = agents.StreamLogs(pb.StreamLogsRequest(agent_id="capped", follow=True))
                for _ in range(50):
                    try:
                        await again.read()
                        break
                    except grpc.aio.AioRpcError:
                        again = agents.StreamLogs(
                            pb.StreamLogsRequest(agent_id="capped", follow=True)
                        )
                        await asyncio.sleep(0.1)
                assert not again.done()
                for call in (*follows[1:], again):
                    call.cancel()


class TestProxyStreamMisuse:
    async def test_body_shorter_than_content_length_or_a_second_head_is_refused(
        self, proxy: ProxyProcess, client: pb_grpc.AgentServiceStub
    ) -> None:
        """The agent must never be left waiting for bytes, or read a second request."""
        await create_ready(client, "misuse")
        head = pb.HTTPRequestHead(
            agent_id="misuse",
            method="POST",
            path="/message",
            headers=[pb.HTTPHeader(name="Content-Length", value="50")],
        )
        for follow_up in (
            [pb.ProxyHTTPRequest(body=b'{"a": 1}', end_of_body=True)],
            [pb.ProxyHTTPRequest(head=head)],
        ):
            call = client.ProxyHTTP()
            await call.write(pb.ProxyHTTPRequest(head=head))
            for message in follow_up:
                await call.write(message)
            await call.done_writing()
            error = await expect_code(_drain(call), grpc.StatusCode.INVALID_ARGUMENT)
            assert "Content-Length" in (error.details() or "") or "head" in (error.details() or "")


async def test_a_malformed_agent_response_is_unavailable_not_internal(tmp_path: Path) -> None:
    command = f"{sys.executable} -m tests.agents.malformed {{port}}"
    env = {"AGENTAPI_PROCESS_COMMAND": command, "PYTHONPATH": str(Path(__file__).parent.parent)}
    with running_proxy(tmp_path, env=env, command="control-plane") as proxy:
        channel, agents = stub(proxy.grpc_target)
        async with channel:
            await create_ready(agents, "broken")
            call = agents.ProxyHTTP()
            await call.write(
                pb.ProxyHTTPRequest(
                    head=pb.HTTPRequestHead(agent_id="broken", method="GET", path="/broken"),
                    end_of_body=True,
                )
            )
            await call.done_writing()
            error = await expect_code(_drain(call), grpc.StatusCode.UNAVAILABLE)
            assert "malformed" in (error.details() or "")
            assert "Traceback" not in proxy.log_text()


async def test_a_second_control_plane_on_the_same_state_dir_refuses_to_start(
    tmp_path: Path,
) -> None:
    with running_proxy(tmp_path, command="control-plane") as first:
        env = {
            **os.environ,
            "AGENTAPI_STATE_DIR": str(first.state_dir),
            "AGENTAPI_SERVER_GRPC_LISTEN": f"127.0.0.1:{port_of_nothing()}",
        }
        second = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "agentapi_proxy", "control-plane"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode == 2
        assert "is in use by another agentapi-proxy control plane" in second.stderr
        assert first.proc is not None and f"pid {first.proc.pid}" in second.stderr
        # The first one still serves.
        channel, agents = stub(first.grpc_target)
        async with channel:
            assert (await agents.ListAgents(pb.ListAgentsRequest())).agents == []


def port_of_nothing() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
