"""Fault and load suite for both modes: legacy (agents as local process groups) and
provision mode (agents as StatefulSets, against the Kubernetes double).

Run by hand::

    .venv/bin/python -m tests.fault_suite [--size small|large] [--json OUT] [--seed N]
        [--scenario creates|followers|restarts|k8s-creates|k8s-restarts ...]

``tests/test_fault_suite.py`` runs the small size. Every scenario drives a real
``agentapi-proxy control-plane`` (started through :mod:`tests.harness`) over gRPC:

1. ``creates``: agents created concurrently (some ids raced by several callers,
   some deleted and re-created at the same moment), then deleted concurrently.
2. ``followers``: one agent prints numbered lines at a steady rate, another
   floods its log; many followers read them from the start while a few others
   read nothing (then everything, to check they lost nothing either).
3. ``restarts``: rounds of concurrent creates, deletes and log follows, each cut
   short by ``kill -9`` of the control plane at a seeded random moment.
4. ``k8s-creates``: scenario 1 in provision mode (:class:`KubeLab`): one
   StatefulSet per id however many callers race for it.
5. ``k8s-restarts``: rounds of concurrent creates and deletes against an API
   server slowed on some calls, each cut short by ``kill -9`` of the control
   plane; after every restart each StatefulSet of ours has its ConfigMap and
   Service, nothing of ours outlives its StatefulSet, and ListAgents shows
   exactly the StatefulSets; at the end every agent gets READY and is deleted.

The bar, for every scenario: no orphaned process or Kubernetes object, no lost
(missing or repeated) log line, only the gRPC failures the scenario expects,
and no broken invariant (listed under ``problems``). Speed is recorded, never judged. Every loop is
bounded in count and time; everything started is stopped at the end, also on
failure (process groups by PID with ``os.killpg``). The process exits 1 when a
scenario misses the bar.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration

from agentapi_proxy.drivers.statefulset_objects import (
    LABEL_AGENT_ID,
    configmap_name,
    service_name,
)
from agentapi_proxy.v1 import agent_service_pb2 as pb
from agentapi_proxy.v1 import agent_service_pb2_grpc as pb_grpc
from tests.harness import ProxyProcess, free_port_range, group_members, port_is_free, stub
from tests.kube_double import KubeDouble
from tests.kube_double.status import JsonObject
from tests.test_provision_mode import (
    NAMESPACE,
    assert_clean_log,
    granted_rules,
    provision_env,
    uncovered,
)

T = TypeVar("T")

# Never listens, never prints: the cheapest agent there is (stays STARTING).
SLEEPER_COMMAND = "sh -c 'exec sleep 3600' sleeper {port}"
# Prints "line N <pad>" for N = 1..$LINES, pausing $PAUSE s after every $BATCH
# lines, then sleeps. The numbers come from the agent's env (CreateAgentRequest.env).
PRINTER_COMMAND = (
    'sh -c \'i=0; while [ $i -lt $LINES ]; do i=$((i+1)); echo "line $i $PAD"; '
    "if [ $((i % BATCH)) -eq 0 ]; then sleep $PAUSE; fi; done; exec sleep 3600' "
    "printer {port}"
)
# Hang guard for one unary call; a healthy control plane answers in milliseconds.
RPC_TIMEOUT = 60.0
# Small pages, so that every listing of the small size takes more than one.
LIST_PAGE_SIZE = 16
MAX_LIST_PAGES = 1000


@dataclass(frozen=True)
class Size:
    """How much each scenario does. ``small`` runs in tests; ``large`` is the issue's numbers."""

    name: str
    # Scenario 1.
    agents: int
    raced_ids: int
    racers: int
    recreated_ids: int
    # Scenario 2: followers and stalled followers of a paced printer's log, and
    # stalled followers of a flood's log (what they would pin if buffered). All of
    # them, plus one active flood follower, stay within server.max_streams_per_user
    # (512 by default; with authentication off every caller is the same user).
    followers: int
    stalled: int
    log_lines: int
    line_bytes: int
    batch: int
    pause: float
    flood_lines: int
    flood_line_bytes: int
    flood_stalled: int
    # Bound on the control plane's peak RSS above its baseline (scenario 2).
    rss_bound_mb: int
    # Scenario 3.
    rounds: int
    churn: int
    round_followers: int
    # Cap of the surviving agent's output (at 200 lines/s: longer than any run).
    keeper_max_lines: int
    kill_after: tuple[float, float]
    # Scenario 5 (its rounds and churn are scenario 3's): the API server's delay on
    # the calls listed in SLOW_KUBE_CALLS, so that kills land between a create's (or
    # a delete's) API calls.
    api_latency: float
    # Hang guard for a whole scenario.
    scenario_seconds: float


SIZES = {
    "small": Size(
        name="small",
        agents=20,
        raced_ids=5,
        racers=4,
        recreated_ids=4,
        followers=50,
        stalled=5,
        log_lines=3000,
        line_bytes=400,
        batch=100,
        pause=0.05,
        flood_lines=40_000,
        flood_line_bytes=1000,
        flood_stalled=6,
        rss_bound_mb=100,
        rounds=3,
        churn=8,
        round_followers=3,
        keeper_max_lines=100_000,
        kill_after=(0.05, 1.0),
        api_latency=0.2,
        scenario_seconds=90.0,
    ),
    "large": Size(
        name="large",
        agents=200,
        raced_ids=40,
        racers=5,
        recreated_ids=20,
        followers=500,
        stalled=4,
        log_lines=10000,
        line_bytes=400,
        batch=100,
        pause=0.05,
        flood_lines=100_000,
        flood_line_bytes=1000,
        flood_stalled=6,
        rss_bound_mb=300,
        rounds=20,
        churn=20,
        round_followers=10,
        keeper_max_lines=200_000,
        kill_after=(0.05, 2.0),
        api_latency=0.3,
        scenario_seconds=600.0,
    ),
}


@dataclass
class ScenarioResult:
    """What one scenario did and found; ``passed`` is the bar."""

    name: str
    size: str
    operations: int = 0
    # gRPC code name -> count, for every call that did not end OK.
    failures: dict[str, int] = field(default_factory=dict)
    expected_failures: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    lines_checked: int = 0
    lines_lost: int = 0
    baseline_rss_kb: int = 0
    peak_rss_kb: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def unexpected_failures(self) -> dict[str, int]:
        return {c: n for c, n in self.failures.items() if c not in self.expected_failures}

    @property
    def passed(self) -> bool:
        return not (self.orphans or self.lines_lost or self.problems or self.unexpected_failures)

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "unexpected_failures": self.unexpected_failures,
            "passed": self.passed,
        }


# --- bookkeeping -----------------------------------------------------------------


class Tally:
    """Counts calls and their failures by gRPC code into a :class:`ScenarioResult`."""

    def __init__(self, result: ScenarioResult) -> None:
        self._result = result
        self._failures: Counter[str] = Counter(result.failures)
        # Unary calls sent and not yet answered.
        self.in_flight = 0

    def count(self, code: grpc.StatusCode) -> None:
        self._result.operations += 1
        if code != grpc.StatusCode.OK:
            self._failures[code.name] += 1
            self._result.failures = dict(sorted(self._failures.items()))

    async def rpc(self, call: Awaitable[T]) -> tuple[T | None, grpc.StatusCode]:
        """Await one unary call; its response (None on failure) and its code."""
        self.in_flight += 1
        try:
            response = await call
        except grpc.aio.AioRpcError as exc:
            self.count(exc.code())
            return None, exc.code()
        finally:
            self.in_flight -= 1
        self.count(grpc.StatusCode.OK)
        return response, grpc.StatusCode.OK


def _status_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB; zeros when it is gone."""
    values = {"VmRSS:": 0, "VmHWM:": 0}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition("\t")
            if key in values:
                values[key] = int(rest.split()[0])
    return values["VmRSS:"], values["VmHWM:"]


class MemoryWatch:
    """Samples the control plane's memory (VmHWM, and VmRSS every 0.1 s) across restarts."""

    def __init__(self, proxy: ProxyProcess, result: ScenarioResult) -> None:
        self._proxy = proxy
        self._result = result
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> int:
        """Current RSS in KiB; raises the recorded peak. Call it before a kill -9 too."""
        proc = self._proxy.proc
        if proc is None or proc.poll() is not None:
            return 0
        rss, hwm = _status_kb(proc.pid)
        self._result.peak_rss_kb = max(self._result.peak_rss_kb, rss, hwm)
        return rss

    def mark_baseline(self) -> None:
        self._result.baseline_rss_kb = self.sample()

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(0.1)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="memory-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sample()


def _process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (process group, command line, cwd) of every live (non-zombie) process we can see."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":
            table[int(entry.name)] = (int(fields[2]), cmdline, cwd)
    return table


def _listeners(port: int) -> set[int]:
    """PIDs holding a listening TCP socket on ``port`` (that we may inspect)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    inodes.add(f"socket:[{fields[9]}]")
    holders = set()
    for entry in Path("/proc").iterdir():
        if inodes and entry.name.isdigit():
            with contextlib.suppress(OSError):
                if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                    holders.add(int(entry.name))
    return holders


def _start_time(pid: int) -> int | None:
    """Start time of a live (non-zombie) process in clock ticks; None when there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else int(fields[19])


class Lab:
    """One control plane under test, its state directory, and what it must clean up.

    Remembers every process group and port an agent was ever recorded with, so
    that orphans of deleted agents are found and everything is killed at the end.
    """

    def __init__(self, state_dir: Path, *, env: Mapping[str, str], result: ScenarioResult) -> None:
        self.state_dir = state_dir
        self.proxy = ProxyProcess(state_dir, env=env, command="control-plane")
        self.result = result
        self.tally = Tally(result)
        self.memory = MemoryWatch(self.proxy, result)
        self.channel: grpc.aio.Channel | None = None
        # Process group id -> start time of the shim that led it (from the records).
        self.groups: dict[int, int | None] = {}
        self.ports: set[int] = set()

    @property
    def control_plane_pid(self) -> int | None:
        proc = self.proxy.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    async def start(self) -> pb_grpc.AgentServiceStub:
        """Start (or restart) the control plane and open a channel to it."""
        await self.close_channel()
        await asyncio.to_thread(self.proxy.start)
        self.memory.sample()
        self.channel, agents = stub(self.proxy.grpc_target)
        return agents

    async def close_channel(self) -> None:
        if self.channel is not None:
            await self.channel.close(grace=None)
            self.channel = None

    async def stop(self) -> None:
        """Close the channel and stop the control plane gracefully (SIGTERM)."""
        await self.close_channel()
        await asyncio.to_thread(self.proxy.stop)

    def kill(self) -> None:
        """``kill -9`` the control plane, after a last memory sample."""
        self.memory.sample()
        self.proxy.stop(signal.SIGKILL)

    def records(self) -> dict[str, dict[str, Any]]:
        """Agent records on disk by id; remembers their groups and ports."""
        found = {}
        for record in self.proxy.agent_records():
            spec = record.get("spec")
            if not isinstance(spec, dict):
                continue
            found[str(spec["agent_id"])] = record
            pid, port, start = record.get("pid"), record.get("port"), record.get("pid_start")
            if isinstance(pid, int):
                self.groups[pid] = start if isinstance(start, int) else None
            if isinstance(port, int):
                self.ports.add(port)
        return found

    def strays(self, *, allowed_groups: Collection[int] = ()) -> list[str]:
        """Live processes of agents outside ``allowed_groups``: orphans.

        An agent's process is one whose command line names the state directory
        (the shim's ``--log-dir``), whose cwd lies under it, or whose process
        group is one an agent was ever recorded with.
        """
        ours = {os.getpid(), self.control_plane_pid}
        return [
            f"{pid}: pgid {pgid}: {cmdline.strip()[:160]}"
            for pid, (pgid, cmdline, cwd) in sorted(_process_table().items())
            if pid not in ours and pgid not in allowed_groups and self._owns(pgid, cmdline, cwd)
        ]

    def _owns(self, pgid: int, cmdline: str, cwd: str) -> bool:
        root = str(self.state_dir) + os.sep
        if root in cmdline or (cwd + os.sep).startswith(root):
            return True
        if pgid not in self.groups:
            return False
        # A group id is reused only after its group emptied and its leader's PID was
        # reused: a group led by another process than our shim is not ours.
        leader = _start_time(pgid)
        return leader is None or leader == self.groups[pgid]

    async def check_consistent(self, listed: Collection[str]) -> None:
        """Listed agents == records on disk; every live agent process belongs to one of them."""
        records = self.records()
        if set(records) != set(listed):
            self.result.problems.append(
                f"listed, not on disk: {sorted(set(listed) - set(records))}; "
                f"on disk, not listed: {sorted(set(records) - set(listed))}"
            )
        groups = {r["pid"]: i for i, r in records.items() if isinstance(r.get("pid"), int)}
        ports = [r.get("port") for r in records.values()]
        if len(set(ports)) != len(ports):
            self.result.problems.append("two agents were given the same port")
        # Judged by process group, not by command line: a shim's child shows the shim's
        # command line until it has exec'd (shims_of of test_crash_recovery counts it).
        self.result.orphans += self.strays(allowed_groups=groups)
        dead = sorted(set(records) - {groups[pgid] for pgid in groups if group_members(pgid)})
        if dead:
            self.result.problems.append(f"listed agents without a live process group: {dead}")

    async def prepare(self) -> None:
        """Make ready what the control plane needs before its first start (nothing here)."""

    async def finish(self) -> None:
        """Stop the control plane gracefully, once every agent was deleted; check nothing is
        left."""
        await self.stop()
        self.check_gone()

    def check_gone(self) -> None:
        """After everything was deleted and the control plane stopped: nothing may be left."""
        self.result.orphans += self.strays()
        table = _process_table()
        for port in sorted(self.ports):
            if port_is_free(port):
                continue
            # Another test on this machine may have picked an overlapping range.
            holders = _listeners(port)
            if not holders or any(pid in table and self._owns(*table[pid]) for pid in holders):
                self.result.problems.append(f"port {port} still in use by {sorted(holders)}")
        left = sorted(p.name for p in (self.state_dir / "agents").glob("*"))
        if left:
            self.result.problems.append(f"state directory not empty: agents/{left}")

    async def cleanup(self) -> None:
        """Stop the control plane and kill every agent process group; safe to call twice."""
        with contextlib.suppress(Exception):
            await self.close_channel()
        proc = self.proxy.proc
        if proc is not None and proc.poll() is None:
            try:
                await asyncio.to_thread(self.proxy.stop, timeout=15)
            except Exception:
                proc.kill()
                proc.wait()
        self.proxy.kill_leftovers()
        own_group = os.getpgrp()
        for pid, (pgid, cmdline, cwd) in _process_table().items():
            if pid == os.getpid() or not self._owns(pgid, cmdline, cwd):
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if pgid == own_group:
                    os.kill(pid, signal.SIGKILL)  # never signal the suite's own group
                else:
                    os.killpg(pgid, signal.SIGKILL)

    def log_tail(self, lines: int = 15) -> str:
        return "".join(self.proxy.lines[-lines:])


# --- provision mode ------------------------------------------------------------------

Objects = dict[str, list[JsonObject]]

# What a StatefulSet of ours owns: the ConfigMap and Service our create makes, the pod
# and (with the default pvc_delete_policy, delete) the claim its controller makes.
OWNED_KINDS = ("configmaps", "services", "pods", "persistentvolumeclaims")
# Calls the API server is slowed on in scenario 5: kills then land between a create's
# StatefulSet and its ConfigMap or Service, or between a delete's StatefulSet and Service.
SLOW_KUBE_CALLS = (("create", "configmaps"), ("create", "services"), ("delete", "services"))
# Hang guard for the garbage collector and the kubelet to finish what a delete began.
SETTLE_SECONDS = 30.0
# What test_provision_mode's assert_clean_log refuses in a control plane's log.
BAD_LOG = "a traceback or an error of its own"


def _owner_uids(obj: JsonObject) -> set[str]:
    return {str(ref.get("uid")) for ref in obj["metadata"].get("ownerReferences") or []}


def _agent_of(obj: JsonObject) -> str:
    return str(obj["metadata"]["labels"][LABEL_AGENT_ID])


def outliving(objects: Objects) -> list[str]:
    """Objects of ours none of whose owners is an existing StatefulSet: orphans, once the
    garbage collector has had its turn."""
    live = {str(sts["metadata"]["uid"]) for sts in objects["statefulsets"]}
    return [
        f"{kind}/{obj['metadata']['name']}"
        for kind in OWNED_KINDS
        for obj in objects[kind]
        if not live & _owner_uids(obj)
    ]


def incomplete(objects: Objects) -> list[str]:
    """StatefulSets of ours without their ConfigMap or Service, or not owning it."""
    found = {(kind, obj["metadata"]["name"]): obj for kind in OWNED_KINDS for obj in objects[kind]}
    missing = []
    for sts in objects["statefulsets"]:
        agent_id, name = _agent_of(sts), sts["metadata"]["name"]
        for kind, companion in (
            ("configmaps", configmap_name(agent_id)),
            ("services", service_name(agent_id)),
        ):
            obj = found.get((kind, companion))
            if obj is None:
                missing.append(f"{name}: no {kind}/{companion}")
            elif _owner_uids(obj) != {sts["metadata"]["uid"]}:
                missing.append(f"{name}: {kind}/{companion} not owned by it")
    return missing


def everything(objects: Objects) -> list[str]:
    return [f"{kind}/{obj['metadata']['name']}" for kind, objs in objects.items() for obj in objs]


class KubeLab(Lab):
    """A :class:`Lab` whose control plane runs in provision mode against a Kubernetes
    double of its own (started by :meth:`prepare`, stopped by :meth:`cleanup`).

    Besides what a Lab checks, it checks the namespace: objects of ours are
    those labelled with an agent id. The double must end without an internal
    error and with every call it saw covered by REQUIRED_RBAC_RULES (the only
    rules it grants); a control plane's log must hold no traceback or error.
    """

    def __init__(self, state_dir: Path, *, env: Mapping[str, str], result: ScenarioResult) -> None:
        self.kube = KubeDouble(state_dir / "kube", namespace=NAMESPACE)
        super().__init__(state_dir, env={**provision_env(self.kube), **env}, result=result)
        self.settle_seconds = SETTLE_SECONDS
        self._double_running = False
        self._runs = 0

    async def prepare(self) -> None:
        await asyncio.to_thread(self.kube.start)
        self._double_running = True
        self.kube.set_rbac_rules(granted_rules())

    async def start(self) -> pb_grpc.AgentServiceStub:
        self._check_log()
        return await super().start()

    def _check_log(self) -> None:
        """Records a problem when the control plane's last run logged :data:`BAD_LOG`."""
        if self.proxy.proc is None:
            return
        self._runs += 1
        try:
            assert_clean_log(self.proxy)
        except AssertionError:
            self.result.problems.append(f"control plane run {self._runs} logged {BAD_LOG}")
            self.result.notes[f"control_plane_log_{self._runs}"] = self.proxy.log_text()

    def objects(self) -> Objects:
        """Objects of ours in the namespace by resource (copies)."""
        return {
            kind: [
                obj
                for obj in self.kube.list(kind)
                if LABEL_AGENT_ID in (obj["metadata"].get("labels") or {})
            ]
            for kind in ("statefulsets", *OWNED_KINDS)
        }

    async def settled(self, unsettled: Callable[[Objects], list[str]]) -> Objects:
        """The namespace once ``unsettled`` finds nothing in it, or as it is after
        ``settle_seconds`` (a hang guard: the garbage collector and kubelet take a moment)."""
        deadline = time.monotonic() + self.settle_seconds
        while True:
            objects = await asyncio.to_thread(self.objects)
            if not unsettled(objects) or time.monotonic() > deadline:
                return objects
            await asyncio.sleep(0.05)

    async def check_consistent(self, listed: Collection[str]) -> None:
        """Listed agents == our StatefulSets, each with its ConfigMap and Service; nothing
        of ours outlives its StatefulSet (orphans)."""
        objects = await self.settled(lambda o: outliving(o) + incomplete(o))
        self.result.orphans += outliving(objects)
        self.result.problems += incomplete(objects)
        have = {_agent_of(sts) for sts in objects["statefulsets"]}
        notes = self.result.notes
        notes["most_statefulsets"] = max(notes.get("most_statefulsets", 0), len(have))
        if have != set(listed):
            self.result.problems.append(
                f"listed, no StatefulSet: {sorted(set(listed) - have)}; "
                f"StatefulSet, not listed: {sorted(have - set(listed))}"
            )

    async def finish(self) -> None:
        """Stop the control plane gracefully once every agent was deleted; nothing of ours
        may be left in the namespace (claims included) once the garbage collector ran."""
        await self.stop()
        self._check_log()
        self.result.orphans += everything(await self.settled(everything))
        self.check_gone()

    async def cleanup(self) -> None:
        await super().cleanup()
        if not self._double_running:
            return
        self._double_running = False
        try:
            errors = self.kube.internal_errors
            self.result.problems += [f"kube double: {e.splitlines()[0]}" for e in errors]
            if errors:
                self.result.notes["kube_double_errors"] = errors
            calls = uncovered(self.kube.permissions_used())
            if calls:
                self.result.problems.append(f"calls REQUIRED_RBAC_RULES lacks: {sorted(calls)}")
        finally:
            await asyncio.to_thread(self.kube.stop)


LabT = TypeVar("LabT", bound=Lab)


@contextlib.asynccontextmanager
async def _lab(
    work_dir: Path,
    name: str,
    *,
    size: Size,
    env: Mapping[str, str],
    expected: Sequence[str],
    kind: type[LabT],
) -> AsyncIterator[LabT]:
    """A :class:`Lab` (or ``kind`` of it) whose cleanup runs whatever happens; times the
    scenario."""
    result = ScenarioResult(name=name, size=size.name, expected_failures=sorted(expected))
    state_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work_dir))
    lab = kind(
        state_dir,
        env={
            "AGENTAPI_PROCESS_PORT_RANGE": free_port_range(2000),
            "AGENTAPI_PROCESS_STOP_GRACE_SECONDS": "3",
            **env,
        },
        result=result,
    )
    await lab.prepare()
    started = time.monotonic()
    lab.memory.start()
    try:
        yield lab
    except TimeoutError:
        result.problems.append(f"did not finish within {size.scenario_seconds:g}s (hang guard)")
    except Exception as exc:
        result.problems.append(f"crashed: {type(exc).__name__}: {exc}")
        result.notes["traceback"] = traceback.format_exc()
    finally:
        await lab.memory.stop()
        if not result.passed or result.problems:
            result.notes["control_plane_log_tail"] = lab.log_tail()
        await lab.cleanup()
        result.seconds = round(time.monotonic() - started, 2)


# --- log lines -------------------------------------------------------------------


class LineCounter:
    """Numbers of the ``line N ...`` lines seen in a log stream, in arrival order."""

    def __init__(self) -> None:
        self.numbers: list[int] = []
        self._partial = b""
        self.garbage = 0

    def feed(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            parts = line.split(b" ", 2)
            if len(parts) >= 2 and parts[0] == b"line" and parts[1].isdigit():
                self.numbers.append(int(parts[1]))
            else:
                self.garbage += 1

    @property
    def last(self) -> int:
        return self.numbers[-1] if self.numbers else 0


def lines_lost(numbers: Sequence[int], last: int) -> int:
    """Lines 1..last not received exactly once, plus lines received that were never printed."""
    counts = Counter(numbers)
    missing = sum(1 for n in range(1, last + 1) if n not in counts)
    repeated = sum(c - 1 for c in counts.values())
    foreign = sum(c for n, c in counts.items() if not 1 <= n <= last)
    return missing + repeated + foreign


def in_order(numbers: Sequence[int]) -> bool:
    return all(b == a + 1 for a, b in itertools.pairwise(numbers))


@dataclass
class Followed:
    """One follower's outcome."""

    counter: LineCounter
    code: grpc.StatusCode = grpc.StatusCode.OK
    end_reason: str = ""


async def follow(
    agents: pb_grpc.AgentServiceStub,
    agent_id: str,
    *,
    tally: Tally,
    last: int | None = None,
    settled: asyncio.Event | None = None,
    start_reading: asyncio.Event | None = None,
    seconds: float,
    into: Followed | None = None,
) -> Followed:
    """Follow ``agent_id``'s log from the start until the stream ends.

    Sets ``settled`` once line ``last`` arrived or the stream ended, whichever
    comes first (a failed follower must leave no one waiting). With
    ``start_reading``, the stream is opened (and accepted) but nothing is read
    until the event is set: a stalled follower. Ends at the control plane's
    death too (code recorded). Fills ``into`` as lines arrive, when given (to
    see how far a stuck one got).
    """
    call = agents.StreamLogs(pb.StreamLogsRequest(agent_id=agent_id, follow=True), timeout=seconds)
    outcome = into or Followed(LineCounter())
    try:
        if start_reading is not None:
            await call.initial_metadata()
            await start_reading.wait()
        async for message in call:
            if message.data:
                outcome.counter.feed(message.data)
                if settled is not None and last is not None and outcome.counter.last >= last:
                    settled.set()
            if message.HasField("end"):
                outcome.end_reason = message.end.reason
        outcome.code = await call.code()
    except grpc.aio.AioRpcError as exc:
        outcome.code = exc.code()
    except asyncio.CancelledError:
        call.cancel()
        raise
    finally:
        if settled is not None:
            settled.set()
    tally.count(outcome.code)
    return outcome


async def _bounded(aw: Awaitable[T], seconds: float) -> T:
    return await asyncio.wait_for(aw, seconds)


async def list_agent_ids(agents: pb_grpc.AgentServiceStub, *, tally: Tally) -> list[str]:
    """Every agent's id, sorted, read page by page; what was read when a page fails."""
    ids: list[str] = []
    token = ""
    for _ in range(MAX_LIST_PAGES):
        request = pb.ListAgentsRequest(page_size=LIST_PAGE_SIZE, page_token=token)
        page, _ = await tally.rpc(agents.ListAgents(request, timeout=RPC_TIMEOUT))
        if page is None:
            break
        ids += (agent.agent_id for agent in page.agents)
        token = page.next_page_token
        if not token:
            break
    return sorted(ids)


# --- scenario 1: concurrent creates and deletes -------------------------------------


async def concurrent_creates(size: Size, *, work_dir: Path) -> ScenarioResult:
    """N agents created and deleted concurrently, with raced ids; nothing may be left."""
    env = {"AGENTAPI_PROCESS_COMMAND": SLEEPER_COMMAND}
    expected = ["ALREADY_EXISTS", "NOT_FOUND"]
    async with _lab(work_dir, "creates", size=size, env=env, expected=expected, kind=Lab) as lab:
        await _bounded(_creates_body(lab, size), size.scenario_seconds)
    return lab.result


async def _creates_body(lab: Lab, size: Size) -> None:
    result, tally = lab.result, lab.tally
    agents = await lab.start()
    lab.memory.mark_baseline()
    ids = [f"a{i:04d}" for i in range(size.agents)]
    raced = ids[: size.raced_ids]

    def request(agent_id: str, racer: int) -> pb.CreateAgentRequest:
        # Odd racers ask for a different spec: they must get ALREADY_EXISTS unless they win.
        labels = {"racer": str(racer)} if racer % 2 else {}
        return pb.CreateAgentRequest(session_id="s", agent_id=agent_id, labels=labels)

    calls = [(agent_id, 0) for agent_id in ids]
    calls += [(agent_id, racer) for agent_id in raced for racer in range(1, size.racers)]
    random.Random(1).shuffle(calls)
    outcomes = await asyncio.gather(
        *(
            tally.rpc(agents.CreateAgent(request(agent_id, racer), timeout=RPC_TIMEOUT))
            for agent_id, racer in calls
        )
    )

    by_id: dict[str, list[tuple[int, pb.CreateAgentResponse | None, grpc.StatusCode]]] = {}
    for (agent_id, racer), (response, code) in zip(calls, outcomes, strict=True):
        by_id.setdefault(agent_id, []).append((racer, response, code))
    for agent_id, tries in by_id.items():
        winners = [t for t in tries if t[1] is not None and t[1].created]
        if len(winners) != 1:
            result.problems.append(f"{agent_id}: {len(winners)} callers were told 'created'")
            continue
        won = request(agent_id, winners[0][0]).labels
        for racer, response, code in tries:
            same = dict(request(agent_id, racer).labels) == dict(won)
            if same and (response is None or response.agent.agent_id != agent_id):
                result.problems.append(f"{agent_id}: same-spec racer got {code.name}")
            if not same and code != grpc.StatusCode.ALREADY_EXISTS:
                result.problems.append(f"{agent_id}: other-spec racer got {code.name}")

    names = await list_agent_ids(agents, tally=tally)
    if sorted(names) != ids:
        result.problems.append(f"listed {len(names)} agents, created {len(ids)}")
    await lab.check_consistent(set(names))

    # Concurrent deletes; raced ids get extra deleters, recreated ids a racing create.
    recreated = ids[size.raced_ids : size.raced_ids + size.recreated_ids]
    deletes = [*ids, *(agent_id for agent_id in raced for _ in range(1, size.racers))]
    delete_calls = [
        tally.rpc(agents.DeleteAgent(pb.DeleteAgentRequest(agent_id=i), timeout=RPC_TIMEOUT))
        for i in deletes
    ]
    rng = random.Random(2)

    # About how long the concurrent deletes take (each waits for its group to exit).
    window = 0.3 + 0.02 * size.agents

    async def create_later(agent_id: str) -> tuple[Any, grpc.StatusCode]:
        # Spread over the deletes' duration: some land before, some during, some after.
        await asyncio.sleep(rng.uniform(0.0, window))
        return await tally.rpc(agents.CreateAgent(request(agent_id, 0), timeout=RPC_TIMEOUT))

    outcomes = await asyncio.gather(*delete_calls, *map(create_later, recreated))
    deleted = Counter(
        agent_id
        for agent_id, (_, code) in zip(deletes, outcomes, strict=False)
        if code == grpc.StatusCode.OK
    )
    for agent_id in ids:
        if deleted[agent_id] != 1:
            result.problems.append(f"{agent_id}: deleted {deleted[agent_id]} times")

    # A racing create that came after the delete made a new agent; one before it did not.
    made_again = {
        agent_id
        for agent_id, (response, _) in zip(recreated, outcomes[len(deletes) :], strict=True)
        if response is not None and response.created
    }
    remaining = set(await list_agent_ids(agents, tally=tally))
    if remaining != made_again:
        result.problems.append(
            f"listed after the deletes: {sorted(remaining)}; created again: {sorted(made_again)}"
        )
    await lab.check_consistent(remaining)
    result.notes["recreated_after_delete"] = len(remaining)
    await asyncio.gather(
        *(
            tally.rpc(agents.DeleteAgent(pb.DeleteAgentRequest(agent_id=i), timeout=RPC_TIMEOUT))
            for i in remaining
        )
    )
    await lab.finish()


# --- scenario 2: many log followers -------------------------------------------------


async def many_followers(size: Size, *, work_dir: Path) -> ScenarioResult:
    """Followers each get every line once, in order; stalled ones slow no one, hold no log."""
    env = {"AGENTAPI_PROCESS_COMMAND": PRINTER_COMMAND}
    async with _lab(work_dir, "followers", size=size, env=env, expected=[], kind=Lab) as lab:
        await _bounded(_followers_body(lab, size), size.scenario_seconds)
    return lab.result


def _printer_env(lines: int, *, size: Size, line_bytes: int = 0) -> dict[str, str]:
    """Env of a printer agent: ``lines`` lines of about ``line_bytes`` bytes, paced by size."""
    pad = "x" * max(0, (line_bytes or size.line_bytes) - len(f"line {lines} \n"))
    return {"LINES": str(lines), "PAD": pad, "BATCH": str(size.batch), "PAUSE": str(size.pause)}


@dataclass
class _Reader:
    who: str
    agent_id: str
    last: int
    stalled: bool
    settled: asyncio.Event
    outcome: Followed
    task: asyncio.Task[Followed]


async def _followers_body(lab: Lab, size: Size) -> None:
    result, tally = lab.result, lab.tally
    agents = await lab.start()
    lab.memory.mark_baseline()
    started = time.monotonic()
    flood_env = {**_printer_env(size.flood_lines, size=size, line_bytes=size.flood_line_bytes)}
    flood_env.update(BATCH=str(size.flood_lines), PAUSE="0")
    for agent_id, env in [
        ("printer", _printer_env(size.log_lines, size=size)),
        ("flood", flood_env),
    ]:
        request = pb.CreateAgentRequest(session_id="s", agent_id=agent_id, env=env)
        await tally.rpc(agents.CreateAgent(request, timeout=RPC_TIMEOUT))

    resume = asyncio.Event()
    readers: list[_Reader] = []

    def add(who: str, agent_id: str, last: int, *, stalled: bool) -> None:
        settled = asyncio.Event()
        outcome = Followed(LineCounter())
        task = asyncio.create_task(
            follow(
                agents,
                agent_id,
                tally=tally,
                last=last,
                settled=settled,
                start_reading=resume if stalled else None,
                seconds=size.scenario_seconds,
                into=outcome,
            )
        )
        readers.append(_Reader(who, agent_id, last, stalled, settled, outcome, task))

    for index in range(size.followers):
        add(f"follower {index}", "printer", size.log_lines, stalled=False)
    for index in range(size.stalled):
        add(f"stalled follower {index}", "printer", size.log_lines, stalled=True)
    add("flood follower", "flood", size.flood_lines, stalled=False)
    for index in range(size.flood_stalled):
        add(f"stalled flood follower {index}", "flood", size.flood_lines, stalled=True)

    try:
        # Hang guard only: the active followers finish while the stalled ones sit.
        await asyncio.gather(*(r.settled.wait() for r in readers if not r.stalled))
        result.notes["active_followers_done_s"] = round(time.monotonic() - started, 2)
        result.notes["rss_with_stalled_kb"] = lab.memory.sample()
        # Shows the stalled streams really are stalled: the client holds no copy either.
        result.notes["suite_rss_with_stalled_kb"] = _status_kb(os.getpid())[0]
        for agent_id in ("printer", "flood"):
            path = lab.state_dir / "agents" / agent_id / "current.log"
            result.notes[f"{agent_id}_log_bytes"] = path.stat().st_size
        resume.set()
        await asyncio.gather(*(r.settled.wait() for r in readers))
        for agent_id in ("printer", "flood"):
            await tally.rpc(
                agents.DeleteAgent(pb.DeleteAgentRequest(agent_id=agent_id), timeout=RPC_TIMEOUT)
            )
        outcomes = await asyncio.gather(*(r.task for r in readers))
    finally:
        behind = [r for r in readers if r.outcome.counter.last < r.last]
        if behind:
            result.notes["followers_behind"] = {
                r.who: f"{r.agent_id} line {r.outcome.counter.last} of {r.last}" for r in behind
            }
        for reader in readers:
            reader.task.cancel()
    for reader, outcome in zip(readers, outcomes, strict=True):
        numbers = outcome.counter.numbers
        result.lines_checked += len(numbers)
        result.lines_lost += lines_lost(numbers, reader.last)
        if not in_order(numbers):
            result.problems.append(f"{reader.who}: lines out of order")
        if outcome.counter.garbage:
            result.problems.append(f"{reader.who}: {outcome.counter.garbage} unparsable lines")
        if outcome.code == grpc.StatusCode.OK and outcome.end_reason != "AgentDeleted":
            result.problems.append(
                f"{reader.who}: ended without AgentDeleted ({outcome.end_reason!r})"
            )
    bound_kb = result.baseline_rss_kb + size.rss_bound_mb * 1024
    if result.peak_rss_kb > bound_kb:
        result.problems.append(
            f"peak RSS {result.peak_rss_kb // 1024} MiB above baseline + {size.rss_bound_mb} MiB"
        )
    await lab.finish()


# --- scenario 3: kill -9 during operations ---------------------------------------------


async def kill_9_restarts(size: Size, *, work_dir: Path, seed: int = 7) -> ScenarioResult:
    """Rounds of churn, each ended by kill -9 of the control plane; state must add up."""
    env = {"AGENTAPI_PROCESS_COMMAND": PRINTER_COMMAND}
    # Calls in flight when the control plane dies, or issued while it is dead.
    expected = ["UNAVAILABLE"]
    async with _lab(work_dir, "restarts", size=size, env=env, expected=expected, kind=Lab) as lab:
        lab.result.notes["seed"] = seed
        await _bounded(_restarts_body(lab, size, random.Random(seed)), size.scenario_seconds)
    return lab.result


async def _restarts_body(lab: Lab, size: Size, rng: random.Random) -> None:
    result, tally = lab.result, lab.tally
    # The keeper prints through all rounds and after (200 lines/s), so some of its
    # lines are written while no control plane runs.
    keeper_env = {
        **_printer_env(size.keeper_max_lines, size=size),
        "BATCH": "10",
        "PAUSE": "0.05",
    }
    keeper_log = lab.state_dir / "agents" / "keeper" / "current.log"
    churn_env = _printer_env(5, size=size)
    seconds = size.scenario_seconds
    agents = await lab.start()
    lab.memory.mark_baseline()
    created, _ = await tally.rpc(
        agents.CreateAgent(
            pb.CreateAgentRequest(session_id="s", agent_id="keeper", env=keeper_env),
            timeout=RPC_TIMEOUT,
        )
    )
    if created is None:
        result.problems.append("could not create the surviving agent")
        return
    kills: list[float] = []
    printed: list[int] = []
    in_flight: list[int] = []

    for round_ in range(size.rounds):
        if round_:
            agents = await lab.start()
        present = await list_agent_ids(agents, tally=tally)
        await lab.check_consistent(present)
        if "keeper" not in present:
            result.problems.append(f"round {round_}: the surviving agent is gone")

        tasks, delay = _start_churn(
            agents,
            tally=tally,
            size=size,
            rng=rng,
            round_=round_,
            deletable=[i for i in present if i != "keeper"],
            env=churn_env,
        )
        follows = [
            asyncio.create_task(follow(agents, "keeper", tally=tally, seconds=seconds))
            for _ in range(size.round_followers)
        ]
        kills.append(round(delay, 3))
        await asyncio.sleep(delay)
        in_flight.append(tally.in_flight)
        lab.kill()
        printed.append(_line_count(keeper_log))
        # Lines written while no control plane runs must survive too: wait for some.
        for _ in range(600):
            if _line_count(keeper_log) > printed[-1]:
                break
            await asyncio.sleep(0.05)
        await asyncio.gather(*tasks)
        for outcome in await asyncio.gather(*follows):
            # A stream cut by the kill must still hold a gapless prefix of the log.
            numbers = outcome.counter.numbers
            result.lines_checked += len(numbers)
            result.lines_lost += lines_lost(numbers, outcome.counter.last)
        await lab.close_channel()
    result.notes["kill_after_s"] = kills
    result.notes["keeper_lines_at_kills"] = list(printed)
    result.notes["calls_in_flight_at_kills"] = in_flight

    agents = await lab.start()
    present = await list_agent_ids(agents, tally=tally)
    await lab.check_consistent(present)
    result.notes["agents_after_rounds"] = len(present)

    # Every line the surviving agent printed, across all control-plane deaths: at
    # least up to what it had printed now, then on until it is deleted.
    last = _line_count(keeper_log)
    result.notes["keeper_lines_at_final_start"] = last
    settled = asyncio.Event()
    keeper = asyncio.create_task(
        follow(agents, "keeper", tally=tally, last=last, settled=settled, seconds=seconds)
    )
    try:
        await settled.wait()
        await asyncio.gather(
            *(
                tally.rpc(
                    agents.DeleteAgent(pb.DeleteAgentRequest(agent_id=i), timeout=RPC_TIMEOUT)
                )
                for i in present
            )
        )
        outcome = await keeper
    finally:
        keeper.cancel()
    result.lines_checked += len(outcome.counter.numbers)
    result.lines_lost += lines_lost(outcome.counter.numbers, max(last, outcome.counter.last))
    if outcome.end_reason != "AgentDeleted":
        result.problems.append(f"keeper's log ended without AgentDeleted ({outcome.code.name})")
    await lab.finish()


def _start_churn(
    agents: pb_grpc.AgentServiceStub,
    *,
    tally: Tally,
    size: Size,
    rng: random.Random,
    round_: int,
    deletable: Sequence[str],
    env: Mapping[str, str],
) -> tuple[list[asyncio.Task[None]], float]:
    """Start one round's churn; returns its tasks and when to kill (seconds from now).

    Creates ``r{round_}-{index}`` for each index below ``size.churn`` (with
    ``env``), deleting the odd ones again once created, and deletes about half
    of ``deletable``. Every first call starts shortly before the kill moment, all
    of it drawn from ``rng``, so that some are cut short.
    """

    async def churn(index: int, after: float) -> None:
        await asyncio.sleep(after)
        agent_id = f"r{round_}-{index}"
        request = pb.CreateAgentRequest(session_id="s", agent_id=agent_id, env=env)
        response, _ = await tally.rpc(agents.CreateAgent(request, timeout=RPC_TIMEOUT))
        if response is not None and index % 2:
            await tally.rpc(
                agents.DeleteAgent(pb.DeleteAgentRequest(agent_id=agent_id), timeout=RPC_TIMEOUT)
            )

    async def remove(agent_id: str, after: float) -> None:
        await asyncio.sleep(after)
        request = pb.DeleteAgentRequest(agent_id=agent_id)
        await tally.rpc(agents.DeleteAgent(request, timeout=RPC_TIMEOUT))

    delay = rng.uniform(*size.kill_after)

    def shortly_before_the_kill() -> float:
        # Calls take from milliseconds to a few hundred: most start just before the
        # kill, so some are cut short; a few start after it (they see UNAVAILABLE).
        return rng.uniform(max(0.0, delay - 0.3), delay + 0.02)

    doomed = [i for i in deletable if rng.random() < 0.5]
    tasks = [
        asyncio.create_task(churn(index, shortly_before_the_kill())) for index in range(size.churn)
    ]
    tasks += [asyncio.create_task(remove(i, shortly_before_the_kill())) for i in doomed]
    return tasks, delay


def _line_count(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


# --- scenario 4: concurrent creates and deletes in provision mode ---------------------


async def k8s_concurrent_creates(size: Size, *, work_dir: Path) -> ScenarioResult:
    """Scenario 1 against the Kubernetes double: one StatefulSet per id however many callers
    race for it; nothing of ours left in the namespace afterwards."""
    # UNAVAILABLE: a create racing the delete of its id while the old pod stops (K02).
    expected = ["ALREADY_EXISTS", "NOT_FOUND", "UNAVAILABLE"]
    async with _lab(
        work_dir, "k8s-creates", size=size, env={}, expected=expected, kind=KubeLab
    ) as lab:
        await _bounded(_creates_body(lab, size), size.scenario_seconds)
    return lab.result


# --- scenario 5: kill -9 during creates and deletes in provision mode --------------------


async def k8s_kill_9_restarts(size: Size, *, work_dir: Path, seed: int = 7) -> ScenarioResult:
    """Rounds of creates and deletes against a slowed API server, each ended by kill -9 of
    the control plane; after each restart the namespace must add up."""
    expected = ["UNAVAILABLE"]
    async with _lab(
        work_dir, "k8s-restarts", size=size, env={}, expected=expected, kind=KubeLab
    ) as lab:
        lab.result.notes["seed"] = seed
        await _bounded(_k8s_restarts_body(lab, size, random.Random(seed)), size.scenario_seconds)
    return lab.result


async def _k8s_restarts_body(lab: KubeLab, size: Size, rng: random.Random) -> None:
    result, tally = lab.result, lab.tally
    for verb, resource in SLOW_KUBE_CALLS:
        lab.kube.set_latency(size.api_latency, verb=verb, resource=resource)
    kills: list[float] = []
    in_flight: list[int] = []
    cut_short: list[int] = []
    agents = await lab.start()
    lab.memory.mark_baseline()
    for round_ in range(size.rounds):
        if round_:
            agents = await lab.start()
        present = await list_agent_ids(agents, tally=tally)
        await lab.check_consistent(present)
        tasks, delay = _start_churn(
            agents,
            tally=tally,
            size=size,
            rng=rng,
            round_=round_,
            deletable=present,
            env={"ROUND": str(round_)},
        )
        kills.append(round(delay, 3))
        await asyncio.sleep(delay)
        in_flight.append(tally.in_flight)
        lab.kill()
        await asyncio.gather(*tasks)
        await lab.close_channel()
        # Creates the kill left with a StatefulSet only: the next start must complete them.
        cut_short.append(len(incomplete(await asyncio.to_thread(lab.objects))))
    result.notes["kill_after_s"] = kills
    result.notes["calls_in_flight_at_kills"] = in_flight
    result.notes["creates_cut_short"] = cut_short
    for verb, resource in SLOW_KUBE_CALLS:
        lab.kube.set_latency(0, verb=verb, resource=resource)

    agents = await lab.start()
    present = await list_agent_ids(agents, tally=tally)
    await lab.check_consistent(present)
    result.notes["agents_after_rounds"] = len(present)
    # Every agent that survived the kills works: it gets ready, then deletes cleanly.
    waits = await asyncio.gather(
        *(
            tally.rpc(
                agents.WaitAgent(
                    pb.WaitAgentRequest(agent_id=i, timeout=Duration(seconds=60)),
                    timeout=RPC_TIMEOUT,
                )
            )
            for i in present
        )
    )
    not_ready = [
        agent_id
        for agent_id, (response, _) in zip(present, waits, strict=True)
        if response is None or response.agent.state != pb.AGENT_STATE_READY
    ]
    if not_ready:
        result.problems.append(f"never ready: {not_ready}")
    deletes = await asyncio.gather(
        *(
            tally.rpc(agents.DeleteAgent(pb.DeleteAgentRequest(agent_id=i), timeout=RPC_TIMEOUT))
            for i in present
        )
    )
    undeleted = [
        agent_id
        for agent_id, (_, code) in zip(present, deletes, strict=True)
        if code != grpc.StatusCode.OK
    ]
    if undeleted:
        result.problems.append(f"could not delete: {undeleted}")
    await lab.finish()


# --- running and reporting -----------------------------------------------------------

SCENARIOS: dict[str, Callable[..., Awaitable[ScenarioResult]]] = {
    "creates": concurrent_creates,
    "followers": many_followers,
    "restarts": kill_9_restarts,
    "k8s-creates": k8s_concurrent_creates,
    "k8s-restarts": k8s_kill_9_restarts,
}
# The scenarios whose kill -9 moments --seed chooses.
SEEDED = {"restarts", "k8s-restarts"}


async def run_suite(
    size: Size, *, work_dir: Path, scenarios: Sequence[str] = tuple(SCENARIOS), seed: int = 7
) -> list[ScenarioResult]:
    """Run the named scenarios one after another; state directories go under ``work_dir``."""
    results = []
    for name in scenarios:
        extra = {"seed": seed} if name in SEEDED else {}
        results.append(await SCENARIOS[name](size, work_dir=work_dir, **extra))
    return results


def format_table(results: Sequence[ScenarioResult]) -> str:
    """The human-readable report: one row per scenario."""
    header = ("scenario", "ops", "failures", "orphans", "lost/checked", "peak RSS", "s", "bar")
    rows = [header]
    for r in results:
        failures = ", ".join(f"{code} {n}" for code, n in r.failures.items()) or "-"
        rss = f"{r.peak_rss_kb / 1024:.0f} MiB (base {r.baseline_rss_kb / 1024:.0f})"
        rows.append(
            (
                f"{r.name} ({r.size})",
                str(r.operations),
                failures,
                str(len(r.orphans)),
                f"{r.lines_lost}/{r.lines_checked}",
                rss,
                f"{r.seconds:.1f}",
                "ok" if r.passed else "FAIL",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in results:
        for problem in [
            *r.problems,
            *r.orphans,
            *(f"unexpected {c}" for c in r.unexpected_failures),
        ]:
            lines.append(f"  {r.name}: {problem}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fault_suite", description=__doc__)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--seed", type=int, default=7, help="seed of the kill -9 moments")
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS))
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    work_dir = Path(tempfile.mkdtemp(prefix="fault-suite-"))
    try:
        results = asyncio.run(
            run_suite(
                size, work_dir=work_dir, scenarios=args.scenario or list(SCENARIOS), seed=args.seed
            )
        )
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    print(format_table(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "size": asdict(size),
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "scenarios": [r.to_json() for r in results],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"results written to {args.json}")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
