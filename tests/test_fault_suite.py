"""The fault suite's small size (``tests/fault_suite.py``): no orphan, no lost line, ever.

Each scenario drives a real control plane; the assertions are the suite's bar
(orphans, lost lines, unexpected gRPC codes, broken invariants) plus proof that
the work was done, never speed. The last tests check that the suite's own
detectors fire, so a silent detector cannot make the bar pass.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from agentapi_proxy.drivers.statefulset_objects import LABEL_AGENT_ID
from tests import fault_suite
from tests.fault_suite import SIZES, KubeLab, Lab, ScenarioResult, Tally, lines_lost
from tests.harness import (
    eventually,
    free_port_range,
    group_members,
    port_is_free,
    running_proxy,
    stub,
)

SMALL = SIZES["small"]
REPO = Path(__file__).resolve().parent.parent


def assert_bar(result: ScenarioResult, *, allowed: set[str]) -> None:
    report = fault_suite.format_table([result])
    assert result.problems == [], report
    assert result.orphans == [], report
    assert result.lines_lost == 0, report
    assert set(result.failures) <= allowed, report
    assert result.passed, report


async def test_concurrent_creates_and_deletes_leave_nothing(tmp_path: Path) -> None:
    result = await fault_suite.concurrent_creates(SMALL, work_dir=tmp_path)

    assert_bar(result, allowed={"ALREADY_EXISTS", "NOT_FOUND"})
    # Each raced id had callers with another spec: they got ALREADY_EXISTS, the rest the agent.
    assert result.failures.get("ALREADY_EXISTS", 0) >= SMALL.raced_ids
    # Extra deleters of a raced id find it gone.
    assert result.failures.get("NOT_FOUND", 0) == SMALL.raced_ids * (SMALL.racers - 1)
    creates = SMALL.agents + SMALL.raced_ids * (SMALL.racers - 1) + SMALL.recreated_ids
    deletes = SMALL.agents + SMALL.raced_ids * (SMALL.racers - 1)
    assert result.operations >= creates + deletes
    assert result.peak_rss_kb > 0


async def test_every_follower_gets_every_line_and_stalled_ones_cost_little(
    tmp_path: Path,
) -> None:
    result = await fault_suite.many_followers(SMALL, work_dir=tmp_path)

    assert_bar(result, allowed=set())
    # lines_lost == 0 and this count: each follower got each line exactly once.
    printer = (SMALL.followers + SMALL.stalled) * SMALL.log_lines
    flood = (1 + SMALL.flood_stalled) * SMALL.flood_lines
    assert result.lines_checked == printer + flood
    # Generous: followers need some MiB of gRPC buffers and chunks in flight. Holding
    # what the stalled flood followers have not read would take flood_stalled x the
    # flood log (6 x 41 MB), more than twice the bound.
    stalled_backlog = SMALL.flood_stalled * result.notes["flood_log_bytes"]
    assert stalled_backlog > 2 * SMALL.rss_bound_mb * 1024 * 1024
    assert 0 < result.baseline_rss_kb <= result.peak_rss_kb
    assert result.peak_rss_kb < result.baseline_rss_kb + SMALL.rss_bound_mb * 1024


async def test_kill_9_during_operations_loses_no_agent_process_or_line(tmp_path: Path) -> None:
    result = await fault_suite.kill_9_restarts(SMALL, work_dir=tmp_path, seed=7)

    # Only calls cut off by the kill, or sent while no control plane ran.
    assert_bar(result, allowed={"UNAVAILABLE"})
    assert len(result.notes["kill_after_s"]) == SMALL.rounds
    # The final follow read the keeper's whole log, printed across the kills.
    assert result.notes["keeper_lines_at_final_start"] > result.notes["keeper_lines_at_kills"][-1]
    assert result.lines_checked >= result.notes["keeper_lines_at_final_start"]


async def test_provision_mode_races_make_one_statefulset_each_and_leave_nothing(
    tmp_path: Path,
) -> None:
    result = await fault_suite.k8s_concurrent_creates(SMALL, work_dir=tmp_path)

    # UNAVAILABLE only for a create racing the delete of its id (K02).
    assert_bar(result, allowed={"ALREADY_EXISTS", "NOT_FOUND", "UNAVAILABLE"})
    assert result.notes["most_statefulsets"] == SMALL.agents
    assert result.failures.get("ALREADY_EXISTS", 0) >= SMALL.raced_ids
    assert result.failures.get("NOT_FOUND", 0) == SMALL.raced_ids * (SMALL.racers - 1)
    creates = SMALL.agents + SMALL.raced_ids * (SMALL.racers - 1) + SMALL.recreated_ids
    deletes = SMALL.agents + SMALL.raced_ids * (SMALL.racers - 1)
    assert result.operations >= creates + deletes


async def test_provision_mode_kill_9_mid_operation_leaves_no_orphaned_object(
    tmp_path: Path,
) -> None:
    result = await fault_suite.k8s_kill_9_restarts(SMALL, work_dir=tmp_path, seed=7)

    assert_bar(result, allowed={"UNAVAILABLE"})
    assert len(result.notes["kill_after_s"]) == SMALL.rounds
    # Some kill left a StatefulSet without its ConfigMap or Service: a restart completed it.
    assert sum(result.notes["creates_cut_short"]) > 0
    # Agents survived the kills; each got READY and was deleted (else a problem).
    assert result.notes["agents_after_rounds"] > 0


def test_command_line_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, "-m", "tests.fault_suite", "--scenario", "creates", "--json", str(out)],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "creates (small)" in done.stdout and "peak RSS" in done.stdout
    report = json.loads(out.read_text())
    (scenario,) = report["scenarios"]
    assert scenario["passed"] is True and scenario["orphans"] == []
    assert scenario["operations"] > 0 and scenario["peak_rss_kb"] > 0


# --- the suite's detectors ---------------------------------------------------------


def test_lost_lines_count_missing_repeated_and_unknown_lines() -> None:
    assert lines_lost([1, 2, 3], 3) == 0
    assert lines_lost([1, 3], 3) == 1
    assert lines_lost([1, 2, 2, 3], 3) == 1
    assert lines_lost([1, 2, 3, 9], 3) == 1
    assert lines_lost([], 2) == 2


async def test_a_failed_follower_settles_and_is_counted(tmp_path: Path) -> None:
    """A follower that fails leaves no one waiting for its last line (no hang)."""
    result = ScenarioResult(name="follow", size="small")
    with running_proxy(tmp_path, command="control-plane") as proxy:
        channel, agents = stub(proxy.grpc_target)
        async with channel:
            settled = asyncio.Event()
            outcome = await fault_suite.follow(
                agents, "missing", tally=Tally(result), last=5, settled=settled, seconds=30
            )
    assert settled.is_set()
    assert outcome.code == grpc.StatusCode.NOT_FOUND and outcome.counter.numbers == []
    assert result.failures == {"NOT_FOUND": 1} and result.operations == 1
    assert lines_lost(outcome.counter.numbers, 5) == 5


# A stray agent process of ours that keeps its port: listens, then sleeps.
LISTENER = (
    "import socket, sys, time; s = socket.socket(); "
    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
    "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); time.sleep(300)"
)


async def test_a_planted_kubernetes_object_and_an_uncovered_call_are_found(
    tmp_path: Path,
) -> None:
    result = ScenarioResult(name="planted", size="small")
    lab = KubeLab(tmp_path / "state", env={}, result=result)
    lab.settle_seconds = 1.0
    await lab.prepare()
    try:
        configuration = k8s.Configuration()
        k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(lab.kube.kubeconfig), client_configuration=configuration
        )
        with k8s.ApiClient(configuration) as api_client:
            core = k8s.CoreV1Api(api_client)
            body = k8s.V1ConfigMap(
                metadata=k8s.V1ObjectMeta(
                    name="agent-ghost-config", labels={LABEL_AGENT_ID: "ghost"}
                )
            )
            await asyncio.to_thread(core.create_namespaced_config_map, lab.kube.namespace, body)
            # Not a call the control plane needs: refused (403), and reported.
            with pytest.raises(k8s.ApiException):
                await asyncio.to_thread(core.list_namespace)

        await lab.start()
        await lab.check_consistent(["ghost"])
        assert result.orphans == ["configmaps/agent-ghost-config"]
        assert any("listed, no StatefulSet: ['ghost']" in p for p in result.problems)
        await lab.finish()
        assert result.orphans.count("configmaps/agent-ghost-config") == 2
    finally:
        await lab.cleanup()
    assert any("REQUIRED_RBAC_RULES lacks" in p and "namespaces" in p for p in result.problems)
    assert not result.passed


async def test_a_planted_orphan_is_found_and_killed(tmp_path: Path) -> None:
    result = ScenarioResult(name="planted", size="small")
    lab = Lab(tmp_path / "state", env={}, result=result)
    work = tmp_path / "state" / "agents" / "ghost" / "work"
    work.mkdir(parents=True)
    port = int(free_port_range(1).split("-")[0])
    lab.ports.add(port)
    ghost = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LISTENER, str(port), cwd=work, start_new_session=True
    )
    try:
        await eventually(lambda: not port_is_free(port))
        lab.check_gone()
        assert any(line.startswith(f"{ghost.pid}:") for line in result.orphans)
        assert f"port {port} still in use by [{ghost.pid}]" in result.problems
        assert any("not empty" in problem for problem in result.problems)
        assert not result.passed

        await lab.cleanup()
        assert await asyncio.wait_for(ghost.wait(), 10) == -signal.SIGKILL
        assert group_members(ghost.pid) == []
    finally:
        if ghost.returncode is None:
            os.killpg(ghost.pid, signal.SIGKILL)
            await ghost.wait()
