"""The client commands of ``agentapi-proxy`` against a real control plane.

Every command runs as a real ``python -m agentapi_proxy`` subprocess, the way a
person runs it, against one ``agentapi-proxy control-plane`` shared by the
module. Its agents are the reference agent behind a small shell prefix so that
one ``--env`` makes an agent fail (``FAIL=1``) or never get ready
(``SLOW=1``), and every log starts with the known lines ``line-1`` ..
``line-5``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.harness import ProxyProcess, running_proxy

# Hang guard for every wait; never an expectation about speed.
DEADLINE = 30.0
AGENT_COMMAND = (
    "sh -c '"
    'if [ -n "$FAIL" ]; then echo boom-line; exit 3; fi; '
    'if [ -n "$SLOW" ]; then exec sleep 60; fi; '
    "for i in 1 2 3 4 5; do echo line-$i; done; "
    "exec {python} -m agentapi_proxy.reference_agent --port {port}'"
)
API_KEY = "test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    state = tmp_path_factory.mktemp("plane")
    with running_proxy(
        state, command="control-plane", env={"AGENTAPI_PROCESS_COMMAND": AGENT_COMMAND}
    ) as running:
        yield running


class Cli:
    """Runs ``agentapi-proxy`` as a subprocess, isolated from the caller's settings."""

    def __init__(self, address: str, home: Path) -> None:
        self.address = address
        self.home = home

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith("AGENTAPI_")},
            # No settings file of the machine or the user may leak in.
            "HOME": str(self.home),
            **(extra or {}),
        }

    def argv(self, *args: str, address: bool = True) -> list[str]:
        where = ["--address", self.address] if address else []
        return [sys.executable, "-m", "agentapi_proxy", *where, *args]

    def __call__(
        self, *args: str, address: bool = True, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args, address=address),
            env=self.env(env),
            cwd=self.home,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(*args),
            env=self.env(),
            cwd=self.home,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


@pytest.fixture(scope="module")
def cli(plane: ProxyProcess, tmp_path_factory: pytest.TempPathFactory) -> Cli:
    return Cli(plane.grpc_target, tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="module")
def ready_agent(cli: Cli) -> str:
    """An agent in session ``shared`` that is ready; tests only read it."""
    result = cli("create", "shared", "--id", "shared-1")
    assert result.returncode == 0, result.stderr
    return "shared-1"


class Background:
    """A running command: its stdout lines as they come, its stderr once it has ended."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr = ""

    def wait_for_line(self, text: str) -> str:
        while True:
            line = self.lines.get(timeout=DEADLINE)
            if text in line:
                return line


@contextlib.contextmanager
def background(process: subprocess.Popen[str]) -> Iterator[Background]:
    """Read ``process`` while the block runs; it is killed if still running at the end."""
    running = Background(process)
    assert process.stdout is not None and process.stderr is not None
    stdout, stderr = process.stdout, process.stderr

    def read() -> None:
        for line in stdout:
            running.lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield running
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(DEADLINE)
        reader.join(DEADLINE)
        with stdout, stderr:
            running.stderr = stderr.read()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- create ------------------------------------------------------------------


def test_create_waits_until_ready_and_prints_the_id(cli: Cli) -> None:
    result = cli("create", "s-create", "--id", "made-1", "--env", "A=1", "--label", "team=x")

    assert result.returncode == 0, result.stderr
    assert result.stdout == "made-1\n"
    # Not a terminal: one plain line per state, the last one ready.
    assert result.stderr.splitlines()[-1] == "agent made-1 ready"
    shown = json.loads(cli("get", "made-1", "-o", "json").stdout)
    assert (shown["state"], shown["env"], shown["labels"]) == (
        "AGENT_STATE_READY",
        {"A": "1"},
        {"team": "x"},
    )


def test_create_no_wait_prints_a_generated_id_at_once(cli: Cli) -> None:
    result = cli("create", "s-nowait", "--no-wait")

    assert result.returncode == 0, result.stderr
    agent_id = result.stdout.strip()
    assert agent_id and "\n" not in agent_id
    assert result.stderr == ""
    assert cli("get", agent_id).returncode == 0


def test_create_of_a_failing_agent_exits_1_with_reason_and_log(cli: Cli) -> None:
    result = cli("create", "s-fail", "--id", "fails-1", "--env", "FAIL=1")

    assert result.returncode == 1
    assert result.stdout == "fails-1\n"
    assert "boom-line" in result.stderr
    # The reason depends on the restart policy (Exited, or CrashLoopBackOff while it restarts).
    last = result.stderr.splitlines()[-1]
    assert last.startswith("agentapi-proxy: agent 'fails-1' failed: ")
    assert "exited with code 3" in last
    assert cli("delete", "fails-1").returncode == 0


def test_create_gives_up_after_the_timeout_and_leaves_the_agent(cli: Cli) -> None:
    result = cli("create", "s-slow", "--id", "slow-1", "--env", "SLOW=1", "--timeout", "1")

    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        "agentapi-proxy: agent 'slow-1' is still starting after 1s"
    )
    assert "starting" in cli("get", "slow-1").stdout
    assert cli("delete", "slow-1").returncode == 0


def test_create_on_a_terminal_redraws_one_line(cli: Cli) -> None:
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            cli.argv("create", "s-tty", "--id", "tty-1"),
            env=cli.env(),
            cwd=cli.home,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=terminal,
        )
    finally:
        os.close(terminal)
    chunks: list[bytes] = []

    def read() -> None:
        with contextlib.suppress(OSError):  # EIO once the process closed the terminal
            while chunk := os.read(controller, 4096):
                chunks.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        stdout, _ = process.communicate(timeout=DEADLINE)
        reader.join(DEADLINE)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(DEADLINE)
        os.close(controller)

    assert process.returncode == 0
    assert stdout == b"tty-1\n"
    shown = b"".join(chunks).decode()
    # Every state overwrites the line; only the final state ends it.
    assert "\r\x1b[K" in shown
    assert shown.rstrip("\r\n").rsplit("\x1b[K", 1)[-1].endswith("agent tty-1 ready")
    assert shown.replace("\r\n", "\n").count("\n") == 1


# --- list and get ------------------------------------------------------------


def test_list_prints_a_table_of_the_session(cli: Cli, ready_agent: str) -> None:
    result = cli("list", "--session", "shared")

    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["ID", "SESSION", "STATE", "AGE", "ADDRESS", "REASON"]
    assert len(rows) == 1
    agent_id, session, state, _age, address, reason = rows[0].split()
    assert (agent_id, session, state, reason) == (ready_agent, "shared", "ready", "<none>")
    assert address.startswith("127.0.0.1:")


def test_list_json_is_the_proto3_json_of_the_response(cli: Cli, ready_agent: str) -> None:
    result = cli("list", "-o", "json")

    assert result.returncode == 0, result.stderr
    agents = json.loads(result.stdout)["agents"]
    mine = [a for a in agents if a["agent_id"] == ready_agent]
    assert len(mine) == 1
    assert (mine[0]["session_id"], mine[0]["state"]) == ("shared", "AGENT_STATE_READY")


def test_list_of_an_empty_session_says_so_on_stderr(cli: Cli) -> None:
    result = cli("list", "--session", "nobody-here")

    assert result.returncode == 0
    assert result.stdout == ""
    assert "No agents found in session nobody-here" in result.stderr


def test_get_prints_one_row_and_options_may_follow_the_command(cli: Cli, ready_agent: str) -> None:
    result = cli("get", ready_agent, "--address", cli.address, address=False)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert lines[1].split()[:3] == [ready_agent, "shared", "ready"]


def test_address_comes_from_the_client_setting(cli: Cli, ready_agent: str) -> None:
    result = cli("get", ready_agent, address=False, env={"AGENTAPI_CLIENT_ADDRESS": cli.address})

    assert result.returncode == 0, result.stderr
    assert ready_agent in result.stdout


# --- logs --------------------------------------------------------------------


def test_logs_prints_the_whole_log_or_its_tail(cli: Cli, ready_agent: str) -> None:
    whole = cli("logs", ready_agent)
    tail = cli("logs", ready_agent, "--tail", "2")

    assert whole.returncode == tail.returncode == 0
    assert whole.stdout.splitlines()[:5] == [f"line-{i}" for i in range(1, 6)]
    last_two = tail.stdout.splitlines()
    assert len(last_two) == 2
    assert last_two[0] == "line-5"
    assert "reference agent listening" in last_two[1]


def test_logs_options_reach_the_control_plane(cli: Cli, ready_agent: str) -> None:
    limited = cli("logs", ready_agent, "--limit-bytes", "4")
    stamped = cli("logs", ready_agent, "--timestamps", "--since", "1h", "--tail", "1")
    future = cli("logs", ready_agent, "--since-time", "2999-01-01T00:00:00Z")

    assert limited.stdout == "line"
    assert stamped.stdout.split(" ", 1)[0].endswith("Z")
    assert "reference agent listening" in stamped.stdout
    assert (future.returncode, future.stdout) == (0, "")


def test_logs_follow_ends_when_the_agent_is_deleted(cli: Cli) -> None:
    assert cli("create", "s-follow", "--id", "follow-1").returncode == 0
    with background(cli.popen("logs", "follow-1", "-f")) as follower:
        follower.wait_for_line("reference agent listening")

        assert cli("delete", "follow-1").returncode == 0

        assert follower.process.wait(DEADLINE) == 0
    assert "log stream ended: AgentDeleted" in follower.stderr


def test_logs_follow_exits_quietly_on_ctrl_c(cli: Cli, ready_agent: str) -> None:
    with background(cli.popen("logs", ready_agent, "--follow")) as follower:
        follower.wait_for_line("line-1")

        follower.process.send_signal(signal.SIGINT)

        assert follower.process.wait(DEADLINE) == 130
    assert follower.stderr == ""


# --- delete ------------------------------------------------------------------


def test_delete_removes_every_agent_named(cli: Cli) -> None:
    for agent_id in ("gone-1", "gone-2"):
        assert cli("create", "s-delete", "--id", agent_id, "--no-wait").returncode == 0

    result = cli("delete", "gone-1", "gone-2")

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["agent gone-1 deleted", "agent gone-2 deleted"]
    assert cli("list", "--session", "s-delete").stdout == ""


def test_delete_tries_every_id_and_reports_the_unknown_one(cli: Cli) -> None:
    assert cli("create", "s-delete2", "--id", "gone-3", "--no-wait").returncode == 0

    result = cli("delete", "never-was", "gone-3")

    assert result.returncode == 1
    assert result.stdout == "agent gone-3 deleted\n"
    assert result.stderr.startswith("agentapi-proxy: NOT_FOUND: ")
    assert cli("get", "gone-3").returncode == 1


# --- errors ------------------------------------------------------------------


def test_unknown_agent_is_one_line_not_found(cli: Cli) -> None:
    result = cli("get", "no-such-agent")

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == "agentapi-proxy: NOT_FOUND: agent 'no-such-agent' not found\n"


def test_bad_agent_id_is_invalid_argument(cli: Cli) -> None:
    result = cli("logs", "Not_A_Valid_Id")

    assert result.returncode == 1
    assert result.stderr.startswith("agentapi-proxy: INVALID_ARGUMENT: agent_id 'Not_A_Valid_Id'")
    assert len(result.stderr.splitlines()) == 1


def test_unreachable_control_plane_names_the_address(cli: Cli) -> None:
    address = f"127.0.0.1:{free_port()}"

    result = cli("list", "--address", address, address=False)

    assert result.returncode == 1
    assert result.stderr.startswith(f"agentapi-proxy: cannot reach the control plane at {address}")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["create", "s", "--env", "NO_EQUALS_SIGN"],
        ["logs", "x", "--since", "5 minutes"],
        ["logs", "x", "--since", "5m", "--since-time", "2026-01-01T00:00:00Z"],
        ["logs", "x", "--since-time", "2026-01-01T00:00:00"],
        ["list", "--address", "no-port"],
        ["--address", "127.0.0.1:1", "serve"],
    ],
)
def test_usage_errors_exit_2(cli: Cli, args: list[str]) -> None:
    result = cli(*args, address=False)

    assert result.returncode == 2
    assert "usage: agentapi-proxy" in result.stderr


# --- authentication ------------------------------------------------------------


def test_api_key_is_sent_and_never_printed(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"api_keys": [{"key": API_KEY, "user_id": "u1", "role": "admin"}]}))
    env = {"AGENTAPI_AUTH_ENABLED": "true", "AGENTAPI_AUTH_API_KEYS_FILE": str(keys)}
    with running_proxy(tmp_path, command="control-plane", env=env) as secured:
        cli = Cli(secured.grpc_target, tmp_path)

        anonymous = cli("list")
        wrong = cli("list", "--api-key", API_KEY[::-1])
        by_flag = cli("list", "--api-key", API_KEY)
        by_setting = cli("list", env={"AGENTAPI_CLIENT_API_KEY": API_KEY})

    assert anonymous.returncode == wrong.returncode == 1
    assert anonymous.stderr.startswith("agentapi-proxy: UNAUTHENTICATED: ")
    assert wrong.stderr.startswith("agentapi-proxy: UNAUTHENTICATED: ")
    assert API_KEY[::-1] not in wrong.stderr
    assert by_flag.returncode == by_setting.returncode == 0
    for result in (anonymous, wrong, by_flag, by_setting):
        assert API_KEY not in result.stdout + result.stderr
