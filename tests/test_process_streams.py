"""Log and state streams of process agents over real gRPC (cases K04, K05, K11)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import grpc
from google.protobuf.duration_pb2 import Duration

from agentapi_proxy.v1 import agent_service_pb2 as pb
from agentapi_proxy.v1 import agent_service_pb2_grpc as pb_grpc
from tests.harness import ProxyProcess, group_members, port_is_free, running_proxy, stub
from tests.test_process_agents import agent_pid, create_ready

# Prints a numbered line every 0.2 s, forever.
TICKER = "sh -c 'i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.2; done' # {port}"
# A wrapper that leaves a background child in the agent's process group (K11).
WRAPPED = (
    "sh -c 'sleep 3600 & exec "
    + sys.executable
    + " -m agentapi_proxy.reference_agent --port {port}'"
)


async def collect_until(call: grpc.aio.UnaryStreamCall, text: bytes) -> bytes:  # type: ignore[type-arg]
    data = b""
    async for message in call:
        data += message.data
        if text in data:
            return data
    raise AssertionError(f"stream ended before {text!r}: {data[-500:]!r}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


class TestLogs:
    async def test_follow_then_delete_ends_with_a_visible_reason(self, tmp_path: Path) -> None:
        with running_proxy(
            tmp_path, env={"AGENTAPI_PROCESS_COMMAND": TICKER}, command="control-plane"
        ) as proxy:
            channel, agents = stub(proxy.grpc_target)
            async with channel:
                await agents.CreateAgent(pb.CreateAgentRequest(session_id="s", agent_id="tick"))
                call = agents.StreamLogs(pb.StreamLogsRequest(agent_id="tick", follow=True))
                seen = await collect_until(call, b"tick 3\n")
                await agents.DeleteAgent(pb.DeleteAgentRequest(agent_id="tick"))
                rest = [message async for message in call]
                assert await call.code() == grpc.StatusCode.OK
                assert rest and rest[-1].end.reason == "AgentDeleted"
                lines = (seen + b"".join(m.data for m in rest)).decode().splitlines()
                numbers = [int(line.split()[1]) for line in lines]
                assert numbers == list(range(1, len(numbers) + 1)), "no line lost or repeated"

    async def test_tail_timestamps_and_limit(self, tmp_path: Path) -> None:
        with running_proxy(
            tmp_path, env={"AGENTAPI_PROCESS_COMMAND": TICKER}, command="control-plane"
        ) as proxy:
            channel, agents = stub(proxy.grpc_target)
            async with channel:
                await agents.CreateAgent(pb.CreateAgentRequest(session_id="s", agent_id="tick"))
                follow = agents.StreamLogs(pb.StreamLogsRequest(agent_id="tick", follow=True))
                await collect_until(follow, b"tick 5\n")
                follow.cancel()

                tail = agents.StreamLogs(pb.StreamLogsRequest(agent_id="tick", tail_lines=2))
                lines = b"".join([m.data async for m in tail]).decode().splitlines()
                assert len(lines) == 2
                assert int(lines[1].split()[1]) == int(lines[0].split()[1]) + 1

                stamped = agents.StreamLogs(
                    pb.StreamLogsRequest(agent_id="tick", tail_lines=1, timestamps=True)
                )
                line = b"".join([m.data async for m in stamped]).decode()
                stamp, text = line.split(" ", 1)
                assert stamp.endswith("Z") and "T" in stamp and text.startswith("tick ")

                limited = agents.StreamLogs(pb.StreamLogsRequest(agent_id="tick", limit_bytes=9))
                assert b"".join([m.data async for m in limited]) == b"tick 1\nti"

                recent = agents.StreamLogs(
                    pb.StreamLogsRequest(agent_id="tick", since=Duration(seconds=3600))
                )
                assert b"tick 1\n" in b"".join([m.data async for m in recent])

    async def test_log_shows_what_the_agent_prints(
        self, proxy: ProxyProcess, client: pb_grpc.AgentServiceStub
    ) -> None:
        agent = await create_ready(client, "printer")
        logs = client.StreamLogs(pb.StreamLogsRequest(agent_id="printer"))
        text = b"".join([m.data async for m in logs]).decode()
        assert "listening" in text and "printer" in text, text
        assert agent.address.endswith(text.split("http://127.0.0.1:")[1].split()[0])


class TestStreamsStayCheap:
    async def test_silent_agent_does_not_block_other_calls(self, tmp_path: Path) -> None:
        """K04: a follower of a silent agent holds no lock and no thread."""
        silent = "sh -c 'exec sleep 3600' # {port}"
        with running_proxy(
            tmp_path, env={"AGENTAPI_PROCESS_COMMAND": silent}, command="control-plane"
        ) as proxy:
            channel, agents = stub(proxy.grpc_target)
            async with channel:
                await agents.CreateAgent(pb.CreateAgentRequest(session_id="s", agent_id="quiet"))
                followers = [
                    agents.StreamLogs(pb.StreamLogsRequest(agent_id="quiet", follow=True))
                    for _ in range(20)
                ]
                for index in range(5):
                    # Generous hang guards, not timing assertions.
                    await agents.CreateAgent(
                        pb.CreateAgentRequest(session_id="s", agent_id=f"other{index}"), timeout=30
                    )
                    await agents.GetAgent(pb.GetAgentRequest(agent_id="quiet"), timeout=30)
                for call in followers:
                    assert not call.done()
                    call.cancel()

    async def test_cancelled_followers_leak_nothing(
        self, proxy: ProxyProcess, client: pb_grpc.AgentServiceStub
    ) -> None:
        """K05: 200 followers cancelled mid-stream leave fds and threads as they were."""
        await create_ready(client, "leak")
        assert proxy.proc is not None
        pid = proxy.proc.pid

        async def follow_and_cancel() -> grpc.StatusCode:
            call = client.StreamLogs(pb.StreamLogsRequest(agent_id="leak", follow=True))
            async for _ in call:
                break
            call.cancel()
            return await call.code()

        await follow_and_cancel()
        fds, threads = fd_count(pid), thread_count(pid)
        codes = []
        for _ in range(20):
            codes += await asyncio.gather(*(follow_and_cancel() for _ in range(10)))
        assert set(codes) == {grpc.StatusCode.CANCELLED}
        await client.GetAgent(pb.GetAgentRequest(agent_id="leak"))
        for _ in range(50):
            if fd_count(pid) <= fds + 2:
                break
            await asyncio.sleep(0.1)
        assert fd_count(pid) <= fds + 2, "file descriptors leaked"
        assert thread_count(pid) <= threads + 2, "threads leaked"
        assert "Task was destroyed" not in proxy.log_text()


class TestProcessGroup:
    async def test_delete_stops_background_children_and_frees_id_and_port(
        self, tmp_path: Path
    ) -> None:
        """K11: the wrapper's background child dies with the agent."""
        env = {"AGENTAPI_PROCESS_COMMAND": WRAPPED}
        with running_proxy(tmp_path, env=env, command="control-plane") as proxy:
            channel, agents = stub(proxy.grpc_target)
            async with channel:
                agent = await create_ready(agents, "wrapped")
                pgid = agent_pid(proxy, "wrapped")
                port = int(agent.address.rsplit(":", 1)[1])
                assert len(group_members(pgid)) >= 3  # shim, agent, sleep

                follow = agents.StreamLogs(pb.StreamLogsRequest(agent_id="wrapped", follow=True))
                await collect_until(follow, b"listening")
                await agents.DeleteAgent(pb.DeleteAgentRequest(agent_id="wrapped"), timeout=20)
                assert group_members(pgid) == []
                assert port_is_free(port)
                ending = [m async for m in follow]
                assert ending[-1].end.reason == "AgentDeleted"

                again = await create_ready(agents, "wrapped")
                assert again.state == pb.AGENT_STATE_READY

    async def test_watch_reports_changes_until_deleted(
        self, proxy: ProxyProcess, client: pb_grpc.AgentServiceStub
    ) -> None:
        await client.CreateAgent(pb.CreateAgentRequest(session_id="s", agent_id="watched"))
        states: list[int] = []
        ready = asyncio.Event()

        async def watch() -> None:
            async for change in client.WatchAgent(pb.WatchAgentRequest(agent_id="watched")):
                states.append(change.agent.state)
                if change.agent.state == pb.AGENT_STATE_READY:
                    ready.set()

        watcher = asyncio.create_task(watch())
        await asyncio.wait_for(ready.wait(), 60)
        await client.DeleteAgent(pb.DeleteAgentRequest(agent_id="watched"))
        await asyncio.wait_for(watcher, 30)
        assert states[-1] == pb.AGENT_STATE_DELETED
        assert pb.AGENT_STATE_READY in states
