"""Legacy mode: every agent is a local process group.

Layout under ``{state_dir}/agents/{agent_id}/``:

- ``record.json``: the spec, port, shim PID and its start time, and the phase
  (``creating`` -> ``running`` -> ``deleting``), rewritten atomically at each step
  so a control plane killed at any point can finish or undo the step on start.
- ``current.log`` / ``previous.log``: the agent's output in CRI log format,
  written by the shim (:mod:`agentapi_proxy.shim`), which outlives the control plane.
- ``exit.json``: written by the shim when the agent exits.
- ``work/``: the agent's working directory (unless ``process.workdir`` says otherwise).

The shim is started in a new session, so its PID is the process group id of
everything the agent starts; deleting an agent signals that whole group.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from agentapi_proxy import logs, shim
from agentapi_proxy.drivers.base import Driver
from agentapi_proxy.errors import (
    AgentApiError,
    AlreadyExists,
    FailedPrecondition,
    Internal,
    NotFound,
    ResourceExhausted,
)
from agentapi_proxy.ids import validate_agent_id, validate_session_id
from agentapi_proxy.logconfig import for_agent
from agentapi_proxy.model import (
    AgentInfo,
    AgentSpec,
    Endpoint,
    LogOptions,
    Mode,
    State,
    StreamEnd,
)
from agentapi_proxy.settings import ProcessSettings, SettingsError
from agentapi_proxy.stateboard import StateBoard

logger = logging.getLogger(__name__)

RECORD_FILE = "record.json"
CURRENT_LOG = "current.log"
PREVIOUS_LOG = "previous.log"
EXIT_FILE = "exit.json"
LOG_TAIL_LINES = 20
# In state_dir, beside agents/: held (flock) by the control plane that uses the directory.
STATE_LOCK_FILE = "control-plane.lock"

# Readiness is probed quickly while an agent starts (create-to-ready time is
# what users feel), less often when it is slow to come up, and slowly once ready.
# (seconds since start, probe interval until then)
PROBE_SCHEDULE = ((1.0, 0.02), (3.0, 0.1))
PROBE_INTERVAL_SLOW_START = 0.5
PROBE_INTERVAL_READY = 2.0
PROBE_TIMEOUT = 2.0


@dataclass
class _Agent:
    spec: AgentSpec
    directory: Path
    port: int
    create_time: datetime
    phase: str = "creating"
    pid: int | None = None
    pid_start: int | None = None
    ready_time: datetime | None = None
    restart_count: int = 0
    # Set only when this control plane started the shim (so it must reap it).
    popen: subprocess.Popen[bytes] | None = None
    started_at: datetime | None = None
    # Restarts in a row without a long enough run in between (sets the back-off).
    failures: int = 0
    # Inode of the listening socket verified to belong to the agent's group.
    port_inode: int | None = None
    monitor: asyncio.Task[None] | None = None
    logs_done: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self) -> dict[str, Any]:
        return {
            "spec": {
                **asdict(self.spec),
                "env": dict(self.spec.env),
                "labels": dict(self.spec.labels),
            },
            "port": self.port,
            "phase": self.phase,
            "pid": self.pid,
            "pid_start": self.pid_start,
            "create_time": self.create_time.isoformat(),
            "ready_time": self.ready_time.isoformat() if self.ready_time else None,
            "restart_count": self.restart_count,
        }

    @classmethod
    def from_record(cls, directory: Path, data: dict[str, Any]) -> _Agent:
        spec = data["spec"]
        return cls(
            spec=AgentSpec(
                agent_id=spec["agent_id"],
                session_id=spec["session_id"],
                owner=spec.get("owner", ""),
                env=dict(spec.get("env", {})),
                labels=dict(spec.get("labels", {})),
            ),
            directory=directory,
            port=int(data["port"]),
            create_time=datetime.fromisoformat(data["create_time"]),
            phase=data["phase"],
            pid=data.get("pid"),
            pid_start=data.get("pid_start"),
            ready_time=datetime.fromisoformat(data["ready_time"])
            if data.get("ready_time")
            else None,
            restart_count=int(data.get("restart_count", 0)),
        )


class ProcessDriver(Driver):
    mode = Mode.PROCESS

    def __init__(self, settings: ProcessSettings, *, state_dir: Path, board: StateBoard) -> None:
        self._settings = settings
        self._root = state_dir / "agents"
        self._board = board
        self._agents: dict[str, _Agent] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._port_lock = asyncio.Lock()
        self._port_cursor = 0
        self._http: aiohttp.ClientSession | None = None
        self._state_lock: int | None = None

    # --- lifecycle of the driver ---------------------------------------------

    async def start(self) -> None:
        self._root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_state_dir()
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT),
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
        )
        for directory in sorted(self._root.iterdir()):
            await self._recover(directory)

    async def close(self) -> None:
        monitors = [a.monitor for a in self._agents.values() if a.monitor]
        for task in monitors:
            task.cancel()
        await asyncio.gather(*monitors, return_exceptions=True)
        for agent in self._agents.values():
            agent.logs_done.set()
        if self._http is not None:
            await self._http.close()
        if self._state_lock is not None:
            os.close(self._state_lock)
            self._state_lock = None

    def _lock_state_dir(self) -> None:
        """Hold the state directory for this control plane alone; SettingsError if taken.

        Two control planes on one state directory would each adopt, restart and
        delete the other's agents. The lock is the kernel's (flock), so it goes
        with the process, also on kill -9; agents never inherit it (close_fds).
        """
        path = self._root.parent / STATE_LOCK_FILE
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "?"
            os.close(descriptor)
            raise SettingsError(
                f"state_dir {self._root.parent} is in use by another agentapi-proxy control "
                f"plane (pid {holder}); give each instance its own state_dir "
                "(AGENTAPI_STATE_DIR)"
            ) from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        self._state_lock = descriptor

    async def _recover(self, directory: Path) -> None:
        """Adopt an agent found on disk, or finish the step a killed control plane left."""
        try:
            data = json.loads((directory / RECORD_FILE).read_text())
            agent = _Agent.from_record(directory, data)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("removing unreadable agent directory %s: %s", directory, exc)
            await asyncio.to_thread(shutil.rmtree, directory, True)
            return

        agent_id = agent.spec.agent_id
        if agent.phase in {"creating", "deleting"}:
            for_agent(logger, agent_id).info("finishing interrupted %s", agent.phase[:-3] + "e")
            if agent.pid is None:
                # Killed between starting the shim and recording its PID: find it by its log dir.
                for pid in _shims_logging_to(directory):
                    agent.pid, agent.pid_start = pid, _process_identity(pid)
                    await self._stop_group(agent)
            await self._stop_group(agent)
            await asyncio.to_thread(shutil.rmtree, directory, True)
            return

        self._agents[agent_id] = agent
        if _process_identity(agent.pid) != agent.pid_start:
            state = self._exited_info(agent)
            self._board.publish(state)
            for_agent(logger, agent_id).info("found stopped after restart")
        else:
            self._board.publish(self._info(agent, State.STARTING))
            for_agent(logger, agent_id).info("adopted running process group %s", agent.pid)
        agent.monitor = asyncio.create_task(self._monitor(agent), name=f"monitor-{agent_id}")

    # --- operations ------------------------------------------------------------

    async def create(self, spec: AgentSpec) -> tuple[AgentInfo, bool]:
        validate_agent_id(spec.agent_id)
        validate_session_id(spec.session_id)
        async with self._lock(spec.agent_id):
            existing = self._agents.get(spec.agent_id)
            if existing is not None:
                if existing.spec != spec:
                    raise AlreadyExists(
                        f"agent {spec.agent_id!r} already exists with a different spec; "
                        "delete it first or choose another id"
                    )
                return self._current(existing), False

            command = self._command(spec, port=0)  # checks the executable before anything exists
            port = await self._allocate_port()
            agent = _Agent(
                spec=spec,
                directory=self._root / spec.agent_id,
                port=port,
                create_time=datetime.now(UTC),
            )
            self._agents[spec.agent_id] = agent
            try:
                agent.directory.mkdir(parents=True)
                self._write_record(agent)
                command = self._command(spec, port=port)
                self._spawn(agent, command)
                agent.phase = "running"
                self._write_record(agent)
            except BaseException as exc:
                await self._stop_group(agent)
                del self._agents[spec.agent_id]
                await asyncio.to_thread(shutil.rmtree, agent.directory, True)
                if isinstance(exc, OSError):
                    raise Internal(f"could not start agent {spec.agent_id!r}: {exc}") from exc
                raise

            info = self._info(agent, State.STARTING)
            self._board.publish(info)
            agent.monitor = asyncio.create_task(
                self._monitor(agent), name=f"monitor-{spec.agent_id}"
            )
            for_agent(logger, spec.agent_id).info("started on port %s (pid %s)", port, agent.pid)
            return info, True

    async def get(self, agent_id: str) -> AgentInfo:
        return self._current(self._find(agent_id))

    async def list_agents(self, session_id: str | None = None) -> list[AgentInfo]:
        return [
            self._current(agent)
            for _, agent in sorted(self._agents.items())
            if session_id is None or agent.spec.session_id == session_id
        ]

    async def delete(self, agent_id: str) -> AgentInfo:
        async with self._lock(agent_id):
            agent = self._find(agent_id)
            agent.phase = "deleting"
            self._write_record(agent)
            self._board.publish(replace(self._current(agent), state=State.STOPPING))
            if agent.monitor is not None:
                agent.monitor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await agent.monitor

            await self._stop_group(agent)
            agent.logs_done.set()
            await asyncio.to_thread(shutil.rmtree, agent.directory, True)
            del self._agents[agent_id]
            last = replace(self._current(agent), state=State.DELETED)
            self._board.publish(last)
            for_agent(logger, agent_id).info("deleted")
        self._locks.pop(agent_id, None)
        return last

    def watch(self, agent_id: str) -> AsyncIterator[AgentInfo]:
        self._find(agent_id)
        return self._board.watch(agent_id)

    async def logs(self, agent_id: str, options: LogOptions) -> AsyncIterator[bytes | StreamEnd]:
        agent = self._find(agent_id)
        path = agent.directory / (PREVIOUS_LOG if options.previous else CURRENT_LOG)
        if options.previous and not path.exists():
            raise FailedPrecondition(
                f"agent {agent_id!r} has no previous run: it has not been restarted",
                reason="NoPreviousRun",
            )
        return self._read_logs(agent, path, options)

    async def _read_logs(
        self, agent: _Agent, path: Path, options: LogOptions
    ) -> AsyncIterator[bytes | StreamEnd]:
        async for chunk in logs.read_log(path, options, stopped=agent.logs_done):
            yield chunk
        if options.follow and agent.phase == "deleting":
            yield StreamEnd("AgentDeleted", f"agent {agent.spec.agent_id!r} was deleted")

    async def endpoint(self, agent_id: str) -> Endpoint:
        agent = self._find(agent_id)
        info = self._current(agent)
        if info.state in {State.FAILED, State.STOPPING} or agent.port_inode is None:
            raise FailedPrecondition(
                f"agent {agent_id!r} is {info.state.value}"
                + (f": {info.message or info.reason}" if info.reason else "")
                + ("; wait until it is ready" if info.state is State.STARTING else ""),
                reason=info.reason or info.state.value,
            )
        return Endpoint(base_url=f"http://127.0.0.1:{agent.port}", host=f"localhost:{agent.port}")

    def _owns_port(self, agent: _Agent) -> bool:
        """Whether the socket listening on the agent's port belongs to its process group.

        Another local process could bind the port after the agent died; traffic
        must never reach it. A full check (scanning the group's descriptors) runs
        only when the listening socket changes.
        """
        inode = _listening_inode(agent.port)
        if inode is not None and inode == agent.port_inode:
            return True
        agent.port_inode = (
            inode if inode is not None and _inode_held_by_group(inode, agent.pid) else None
        )
        return agent.port_inode is not None

    # --- helpers ---------------------------------------------------------------

    def _lock(self, agent_id: str) -> asyncio.Lock:
        return self._locks.setdefault(agent_id, asyncio.Lock())

    def _find(self, agent_id: str) -> _Agent:
        agent = self._agents.get(agent_id)
        if agent is None or agent.phase == "creating":
            raise NotFound(f"agent {agent_id!r} not found")
        return agent

    def _current(self, agent: _Agent) -> AgentInfo:
        return self._board.get(agent.spec.agent_id) or self._info(agent, State.PENDING)

    def _info(self, agent: _Agent, state: State, **extra: Any) -> AgentInfo:
        return AgentInfo(
            spec=agent.spec,
            mode=Mode.PROCESS,
            state=state,
            create_time=agent.create_time,
            address=f"127.0.0.1:{agent.port}",
            ready_time=agent.ready_time,
            restart_count=agent.restart_count,
            **extra,
        )

    def _command(self, spec: AgentSpec, *, port: int) -> list[str]:
        values = {
            "port": str(port),
            "agent_id": spec.agent_id,
            "session_id": spec.session_id,
            "python": sys.executable,
            "workdir": str(self._workdir(spec)),
        }
        try:
            command = [part.format(**values) for part in shlex.split(self._settings.command)]
        except (KeyError, IndexError, ValueError) as exc:
            raise FailedPrecondition(
                f"setting process.command {self._settings.command!r} is not a valid template "
                f"({exc}); placeholders are {{port}}, {{agent_id}}, {{session_id}}, "
                "{python} and {workdir}"
            ) from exc
        if not command or shutil.which(command[0]) is None:
            raise FailedPrecondition(
                f"agent command {command[0] if command else ''!r} was not found on PATH; "
                "install it or change the setting process.command"
            )
        return command

    def _workdir(self, spec: AgentSpec) -> Path:
        if not self._settings.workdir:
            return self._root / spec.agent_id / "work"
        return Path(
            os.path.expanduser(
                self._settings.workdir.format(agent_id=spec.agent_id, session_id=spec.session_id)
            )
        )

    def _spawn(self, agent: _Agent, command: list[str]) -> None:
        workdir = self._workdir(agent.spec)
        workdir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTAPI_")}
        env.update(agent.spec.env)
        env.update(
            AGENT_ID=agent.spec.agent_id,
            SESSION_ID=agent.spec.session_id,
            AGENTAPI_PORT=str(agent.port),
        )
        with open(agent.directory / "shim.err", "ab") as shim_errors:
            agent.popen = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-S",
                    shim.__file__,
                    "--log-dir",
                    str(agent.directory),
                    "--",
                    *command,
                ],
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=shim_errors,
                start_new_session=True,
                close_fds=True,
            )
        agent.pid = agent.popen.pid
        agent.pid_start = _process_identity(agent.pid)
        agent.port_inode = None
        agent.started_at = datetime.now(UTC)

    def _write_record(self, agent: _Agent) -> None:
        tmp = agent.directory / (RECORD_FILE + ".tmp")
        # The record holds the agent's environment, which may carry secrets.
        descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump(agent.record(), file)
        os.replace(tmp, agent.directory / RECORD_FILE)

    async def _allocate_port(self) -> int:
        """A port of the configured range that no agent holds and nothing listens on."""
        async with self._port_lock:
            ports = self._settings.ports
            taken = {a.port for a in self._agents.values()}
            for step in range(len(ports)):
                port = ports[(self._port_cursor + step) % len(ports)]
                if port in taken or not _port_is_free(port):
                    continue
                self._port_cursor = (self._port_cursor + step + 1) % len(ports)
                return port
        raise ResourceExhausted(
            f"no free port left in process.port_range {self._settings.port_range}: "
            "delete agents or widen the range"
        )

    # --- watching one agent ----------------------------------------------------

    async def _monitor(self, agent: _Agent) -> None:
        agent_id = agent.spec.agent_id
        try:
            while True:
                if self._has_exited(agent):
                    info = self._exited_info(agent)
                    if not self._should_restart(info):
                        self._board.publish(info)
                        for_agent(logger, agent_id).warning("%s", info.message)
                        return
                    try:
                        await self._restart_after_backoff(agent, info)
                    except (AgentApiError, OSError) as exc:
                        message = getattr(exc, "message", str(exc))
                        self._board.publish(replace(info, reason="RestartFailed", message=message))
                        for_agent(logger, agent_id).error("cannot restart: %s", message)
                        return
                    continue
                state = self._current(agent).state
                ready = await self._probe(agent)
                if ready and not self._owns_port(agent):
                    ready = False
                    if self._current(agent).reason != "PortHijacked":
                        self._board.publish(
                            self._info(
                                agent,
                                State.UNREADY if state is State.READY else State.STARTING,
                                reason="PortHijacked",
                                message=(
                                    f"port {agent.port} is served by a process outside the "
                                    "agent; its traffic is refused until the agent serves it"
                                ),
                            )
                        )
                        for_agent(logger, agent_id).error(
                            "port %s is served by another process", agent.port
                        )
                elif ready and state is not State.READY:
                    if agent.ready_time is None:
                        agent.ready_time = datetime.now(UTC)
                        self._write_record(agent)
                    self._board.publish(self._info(agent, State.READY))
                    for_agent(logger, agent_id).info("ready")
                elif not ready and state is State.READY:
                    self._board.publish(
                        self._info(
                            agent,
                            State.UNREADY,
                            reason="ProbeFailed",
                            message=f"GET {self._settings.ready_path} does not answer",
                        )
                    )
                    for_agent(logger, agent_id).warning("stopped answering its readiness probe")
                elif not ready and state is State.STARTING:
                    elapsed = (datetime.now(UTC) - agent.create_time).total_seconds()
                    if elapsed > self._settings.ready_timeout_seconds:
                        self._board.publish(
                            self._info(
                                agent,
                                State.STARTING,
                                reason="NotReady",
                                message=(
                                    f"not answering GET {self._settings.ready_path} on port "
                                    f"{agent.port} after {elapsed:.0f}s; see its logs"
                                ),
                            )
                        )
                await asyncio.sleep(self._probe_interval(agent, ready=ready))
        except asyncio.CancelledError:
            raise
        except Exception:
            for_agent(logger, agent_id).exception("monitor failed")

    def _probe_interval(self, agent: _Agent, *, ready: bool) -> float:
        if ready:
            return PROBE_INTERVAL_READY
        since = (datetime.now(UTC) - (agent.started_at or agent.create_time)).total_seconds()
        for until, interval in PROBE_SCHEDULE:
            if since < until:
                return interval
        return PROBE_INTERVAL_SLOW_START

    def _should_restart(self, info: AgentInfo) -> bool:
        policy = self._settings.restart_policy
        return policy == "always" or (policy == "on-failure" and info.exit_code != 0)

    async def _restart_after_backoff(self, agent: _Agent, exited: AgentInfo) -> None:
        """Wait (doubling from the base delay), keep the old log as previous.log, start again.

        The back-off starts over when the last run stayed up for the maximum delay.
        """
        settings = self._settings
        ran_for = (datetime.now(UTC) - (agent.started_at or agent.create_time)).total_seconds()
        if ran_for >= settings.restart_backoff_max_seconds:
            agent.failures = 0
        delay = min(
            settings.restart_backoff_seconds * 2**agent.failures,
            settings.restart_backoff_max_seconds,
        )
        agent.failures += 1
        self._board.publish(
            replace(
                exited,
                reason="CrashLoopBackOff",
                message=f"{exited.message}; restarting in {delay:g}s",
            )
        )
        for_agent(logger, agent.spec.agent_id).warning(
            "%s; restarting in %gs", exited.message, delay
        )
        await asyncio.sleep(delay)

        with contextlib.suppress(FileNotFoundError):
            os.replace(agent.directory / CURRENT_LOG, agent.directory / PREVIOUS_LOG)
        agent.restart_count += 1
        agent.ready_time = None
        if not _port_is_free(agent.port):
            # Another program (or a control plane sharing the port range) took it meanwhile.
            old_port = agent.port
            agent.port = await self._allocate_port()
            for_agent(logger, agent.spec.agent_id).warning(
                "port %s is taken by another program; restarting on port %s",
                old_port,
                agent.port,
            )
        self._spawn(agent, self._command(agent.spec, port=agent.port))
        self._write_record(agent)
        self._board.publish(self._info(agent, State.STARTING))

    def _has_exited(self, agent: _Agent) -> bool:
        if agent.popen is not None:
            return agent.popen.poll() is not None
        return _process_identity(agent.pid) != agent.pid_start

    def _exited_info(self, agent: _Agent) -> AgentInfo:
        exit_code: int | None = None
        message = "the agent's supervisor process is gone and left no exit status"
        reason = "Lost"
        try:
            status = json.loads((agent.directory / EXIT_FILE).read_text())
        except (OSError, ValueError):
            status = None
        if isinstance(status, dict):
            if status.get("signal"):
                reason = "Killed"
                message = f"agent was killed by signal {status['signal']}"
                exit_code = 128 + int(status["signal"])
            else:
                reason = "Exited"
                exit_code = int(status.get("exit_code") or 0)
                message = f"agent exited with code {exit_code}"
        tail = logs.tail_text(agent.directory / CURRENT_LOG, LOG_TAIL_LINES)
        return self._info(
            agent,
            State.FAILED,
            reason=reason,
            message=message,
            exit_code=exit_code,
            log_tail=tail,
        )

    async def _probe(self, agent: _Agent) -> bool:
        assert self._http is not None
        url = f"http://127.0.0.1:{agent.port}{self._settings.ready_path}"
        try:
            async with self._http.get(url, headers={"Host": f"localhost:{agent.port}"}) as resp:
                return 200 <= resp.status < 400
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def _stop_group(self, agent: _Agent) -> None:
        """Stop every process of the agent's group: SIGTERM, grace period, SIGKILL.

        Signals the group only when its leader is still the shim we started
        (same PID and start time), or when the leader is gone and members are
        left: a process group id is not reused while the group has members.
        """
        pgid = agent.pid
        if pgid is None:
            return
        leader_is_ours = _process_identity(pgid) == agent.pid_start
        if not leader_is_ours and _process_identity(pgid) is not None:
            for_agent(logger, agent.spec.agent_id).warning(
                "pid %s now belongs to another process; not signalling it",
                pgid,
            )
            return

        _signal_group(pgid, signal.SIGTERM)
        if not await _wait_group_gone(pgid, agent, self._settings.stop_grace_seconds):
            for_agent(logger, agent.spec.agent_id).warning(
                "still running after %ss grace period, killing",
                self._settings.stop_grace_seconds,
            )
            _signal_group(pgid, signal.SIGKILL)
            await _wait_group_gone(pgid, agent, 5.0)
        if agent.popen is not None:
            agent.popen.poll()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _wait_group_gone(pgid: int, agent: _Agent, seconds: float) -> bool:
    """Whether the group emptied within ``seconds``."""
    deadline = time.monotonic() + seconds
    # Polling: the kernel offers no event for "process group is empty".
    while _group_alive(pgid, agent):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def _group_alive(pgid: int, agent: _Agent) -> bool:
    """Whether a process of the group still runs (zombies do not count)."""
    if agent.popen is not None:
        agent.popen.poll()
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Orphans are reparented to PID 1, which in some containers never reaps them;
    # their zombies keep the group "existing" for kill(), so look closer.
    return any(_group_of(pid) == pgid for pid in _all_pids())


def _all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _group_of(pid: int) -> int | None:
    """The process group of a live (non-zombie) process, else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else int(fields[2])


def _process_identity(pid: int | None) -> int | None:
    """The process's start time in clock ticks since boot, or None when it does not exist.

    Together with the PID this identifies a process across PID reuse.
    """
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def _listening_inode(port: int) -> int | None:
    """Inode of the TCP socket listening on ``port`` (IPv4 or IPv6), if any."""
    wanted = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local_address ends with :PORT in hex; state 0A is LISTEN.
            if fields[1].endswith(wanted) and fields[3] == "0A":
                return int(fields[9])
    return None


def _inode_held_by_group(inode: int, pgid: int | None) -> bool:
    if pgid is None:
        return False
    target = f"socket:[{inode}]"
    for pid in _all_pids():
        if _group_of(pid) != pgid:
            continue
        try:
            descriptors = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for descriptor in descriptors:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{descriptor}") == target:
                    return True
    return False


def _shims_logging_to(directory: Path) -> list[int]:
    """PIDs of shims started with ``--log-dir directory`` (their command line says so)."""
    wanted = ["--log-dir", str(directory)]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = [a.decode() for a in (entry / "cmdline").read_bytes().split(b"\0")]
        except (OSError, UnicodeDecodeError):
            continue
        if any(args[i : i + 2] == wanted for i in range(len(args) - 1)):
            found.append(int(entry.name))
    return found


def _port_is_free(port: int) -> bool:
    """Whether a server could listen on the port now (connections in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
