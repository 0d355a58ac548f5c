"""A control plane killed with -9 in the middle of a create or a delete, then restarted."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import grpc

from agentapi_proxy.v1 import agent_service_pb2 as pb
from tests.harness import ProxyProcess, eventually, group_members, running_proxy, stub


def shims_of(state_dir: Path) -> list[int]:
    """PIDs of supervisor processes started for agents under ``state_dir``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--log-dir" in cmdline and any(str(state_dir).encode() in part for part in cmdline):
            # A shim is its group's leader; its child shows the same command line for
            # the instant before it execs the agent.
            try:
                leader = os.getpgid(int(entry.name)) == int(entry.name)
            except ProcessLookupError:
                continue
            if leader:
                found.append(int(entry.name))
    return found


def fake_interrupted(state_dir: Path, agent_id: str, phase: str) -> subprocess.Popen[bytes]:
    """Leave what a control plane killed mid-``phase`` leaves: a record and a live group."""
    directory = state_dir / "agents" / agent_id
    directory.mkdir(parents=True)
    group = subprocess.Popen(["sh", "-c", "sleep 3600 & exec sleep 3600"], start_new_session=True)
    stat = Path(f"/proc/{group.pid}/stat").read_text()
    start = int(stat[stat.rindex(")") + 2 :].split()[19])
    record = {
        "spec": {"agent_id": agent_id, "session_id": "s", "owner": "", "env": {}, "labels": {}},
        "port": 1,
        "phase": phase,
        "pid": group.pid,
        "pid_start": start,
        "create_time": datetime.now(UTC).isoformat(),
        "ready_time": None,
        "restart_count": 0,
    }
    (directory / "record.json").write_text(json.dumps(record))
    return group


async def test_interrupted_create_and_delete_are_finished_on_start(tmp_path: Path) -> None:
    leaders = [
        fake_interrupted(tmp_path, "half-made", "creating"),
        fake_interrupted(tmp_path, "half-gone", "deleting"),
    ]
    creating, deleting = (leader.pid for leader in leaders)
    try:
        with running_proxy(tmp_path, command="control-plane") as proxy:
            channel, agents = stub(proxy.grpc_target)
            async with channel:
                listed = await agents.ListAgents(pb.ListAgentsRequest())
                assert list(listed.agents) == []
            assert group_members(creating) == [] and group_members(deleting) == []
            assert not (tmp_path / "agents" / "half-made").exists()
            assert not (tmp_path / "agents" / "half-gone").exists()
    finally:
        for leader in leaders:
            if group_members(leader.pid):
                os.killpg(leader.pid, signal.SIGKILL)
            leader.wait(10)


async def test_kill_9_during_creates_and_deletes_leaves_no_orphans(tmp_path: Path) -> None:
    """Rounds of concurrent creates/deletes, each cut short by kill -9 at a random moment."""
    rng = random.Random(7)
    proxy = ProxyProcess(tmp_path, command="control-plane")
    try:
        for round_ in range(4):
            proxy.start()
            channel, agents = stub(proxy.grpc_target)

            async def churn(index: int, agents=agents, round_=round_) -> None:  # type: ignore[no-untyped-def]
                agent_id = f"c{round_}-{index}"
                try:
                    await agents.CreateAgent(
                        pb.CreateAgentRequest(session_id="s", agent_id=agent_id)
                    )
                    if index % 2:
                        await agents.DeleteAgent(pb.DeleteAgentRequest(agent_id=agent_id))
                except grpc.aio.AioRpcError:
                    pass  # the control plane died under us: that is the point

            tasks = [asyncio.create_task(churn(i)) for i in range(6)]
            await asyncio.sleep(rng.uniform(0.05, 0.6))
            proxy.stop(signal.SIGKILL)
            await asyncio.gather(*tasks)
            await channel.close(None)

        proxy.start()
        channel, agents = stub(proxy.grpc_target)
        async with channel:
            listed = {a.agent_id for a in (await agents.ListAgents(pb.ListAgentsRequest())).agents}
            on_disk = {p.parent.name for p in (tmp_path / "agents").glob("*/record.json")}
            assert listed == on_disk, "every record is a listed agent and vice versa"

            # Every live supervisor belongs to a listed agent: no orphaned process.
            recorded = {int(r["pid"]) for r in proxy.agent_records() if r.get("pid")}  # type: ignore[call-overload]
            assert set(shims_of(tmp_path)) <= recorded

            for agent_id in listed:
                await agents.DeleteAgent(pb.DeleteAgentRequest(agent_id=agent_id))
            await eventually(lambda: not shims_of(tmp_path))
            assert list((tmp_path / "agents").iterdir()) == []
    finally:
        if proxy.proc is not None and proxy.proc.poll() is None:
            proxy.stop()
        proxy.kill_leftovers()
        for pid in shims_of(tmp_path):
            os.killpg(pid, signal.SIGKILL)
