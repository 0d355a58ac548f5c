"""The shim, run as the control plane runs it, with real agent commands.

Every shim is started in a new session (so its pid is its group id) and its
whole group is killed in teardown, whatever the test left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from agentapi_proxy import shim
from agentapi_proxy.logs import LogRecord, parse_record, parse_timestamp
from tests.harness import group_members

# Hang guard for every wait; never an expectation about speed.
DEADLINE = 30.0

Start = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def start_shim(tmp_path: Path) -> Iterator[Start]:
    started: list[subprocess.Popen[bytes]] = []

    def start(
        *command: str,
        log_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stdin: int = subprocess.DEVNULL,
    ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-I",
                "-S",
                shim.__file__,
                "--log-dir",
                str(log_dir or tmp_path / "logs"),
                "--",
                *command,
            ],
            stdin=stdin,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env=env,
            cwd=cwd,
        )
        started.append(proc)
        return proc

    yield start

    for proc in started:
        if group_members(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=DEADLINE)
        for pipe in (proc.stdin, proc.stderr):
            if pipe is not None:
                pipe.close()


def wait_exit(proc: subprocess.Popen[bytes]) -> int:
    """Waits for the shim; returns its exit code after checking it complained of nothing."""
    code = proc.wait(timeout=DEADLINE)
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert err == b"", err
    return code


def records(log_dir: Path) -> list[LogRecord]:
    with open(log_dir / shim.LOG_FILE, "rb") as log:
        return [parse_record(line) for line in log]


def exit_status(log_dir: Path) -> dict[str, object]:
    status = json.loads((log_dir / shim.EXIT_FILE).read_text())
    assert isinstance(status, dict)
    return status


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def log_contains(log_dir: Path, text: bytes) -> Callable[[], bool]:
    def check() -> bool:
        path = log_dir / shim.LOG_FILE
        return path.exists() and text in path.read_bytes()

    return check


class TestRecords:
    def test_stdout_and_stderr_become_full_records_in_order(
        self, start_shim: Start, tmp_path: Path
    ) -> None:
        logs = tmp_path / "logs"
        proc = start_shim("sh", "-c", "echo one; sleep 0.1; echo two >&2; sleep 0.1; echo three")
        assert wait_exit(proc) == 0

        got = records(logs)
        assert [(r.stream, r.partial, r.content) for r in got] == [
            ("stdout", False, b"one"),
            ("stderr", False, b"two"),
            ("stdout", False, b"three"),
        ]
        times = [r.time_ns for r in got]
        assert times == sorted(times)
        assert abs(times[0] - time.time_ns()) < 600 * 10**9
        # RFC 3339 UTC with nine fraction digits, like the kubelet's.
        assert all(len(r.timestamp) == 30 and r.timestamp.endswith("Z") for r in got)

    def test_empty_lines_and_a_missing_final_newline(
        self, start_shim: Start, tmp_path: Path
    ) -> None:
        proc = start_shim("sh", "-c", "printf 'a\\n\\nb'")
        assert wait_exit(proc) == 0

        raw = (tmp_path / "logs" / shim.LOG_FILE).read_bytes().splitlines()
        assert [line.split(b" ", 1)[1] for line in raw] == [
            b"stdout F a",
            b"stdout F ",
            b"stdout F b",
        ]

    def test_a_long_line_is_split_into_partial_records(
        self, start_shim: Start, tmp_path: Path
    ) -> None:
        size = 2 * shim.MAX_RECORD_CONTENT + 100
        script = f"import sys; sys.stdout.write('x' * {size} + '\\nshort\\n')"
        proc = start_shim(sys.executable, "-c", script)
        assert wait_exit(proc) == 0

        got = records(tmp_path / "logs")
        assert [(r.partial, len(r.content)) for r in got] == [
            (True, shim.MAX_RECORD_CONTENT),
            (True, shim.MAX_RECORD_CONTENT),
            (False, 100),
            (False, 5),
        ]

    def test_a_line_of_exactly_the_record_size_is_one_full_record(
        self, start_shim: Start, tmp_path: Path
    ) -> None:
        script = f"import sys; sys.stdout.write('y' * {shim.MAX_RECORD_CONTENT})"
        proc = start_shim(sys.executable, "-c", script)
        assert wait_exit(proc) == 0

        got = records(tmp_path / "logs")
        assert [(r.partial, len(r.content)) for r in got] == [(False, shim.MAX_RECORD_CONTENT)]

    def test_a_huge_line_is_written_while_it_arrives(
        self, start_shim: Start, tmp_path: Path
    ) -> None:
        logs = tmp_path / "logs"
        size = 5 * 1024 * 1024
        script = (
            "import sys, time\n"
            f"sys.stdout.write('z' * {size})\n"
            "sys.stdout.flush()\n"
            "time.sleep(60)\n"
        )
        proc = start_shim(sys.executable, "-c", script)

        # No newline yet, the agent still runs: the line is already in the log.
        whole_parts = size // shim.MAX_RECORD_CONTENT - 1
        wait_for(
            lambda: len(records(logs)) >= whole_parts if (logs / shim.LOG_FILE).exists() else False,
            "partial records",
        )
        assert proc.poll() is None
        assert all(r.partial for r in records(logs))

        os.kill(proc.pid, signal.SIGTERM)
        assert wait_exit(proc) == 128 + signal.SIGTERM
        got = records(logs)
        assert sum(len(r.content) for r in got) == size
        assert [r.partial for r in got] == [True] * (len(got) - 1) + [False]
        assert max(len(r.content) for r in got) == shim.MAX_RECORD_CONTENT

    def test_the_log_is_appended_to(self, start_shim: Start, tmp_path: Path) -> None:
        logs = tmp_path / "logs"
        assert wait_exit(start_shim("echo", "first")) == 0
        assert wait_exit(start_shim("echo", "second")) == 0
        assert [r.content for r in records(logs)] == [b"first", b"second"]


class TestAgentEnvironment:
    def test_cwd_env_and_process_group_come_from_the_shim(
        self, start_shim: Start, tmp_path: Path
    ) -> None:
        workdir = tmp_path / "work"
        workdir.mkdir()
        proc = start_shim(
            "sh",
            "-c",
            "pwd; echo \"$GREETING\"; cut -d' ' -f5 /proc/$$/stat",
            env={**os.environ, "GREETING": "hello"},
            cwd=workdir,
        )
        assert wait_exit(proc) == 0

        assert [r.content for r in records(tmp_path / "logs")] == [
            str(workdir).encode(),
            b"hello",
            str(proc.pid).encode(),
        ]

    def test_stdin_is_dev_null_not_the_shims(self, start_shim: Start, tmp_path: Path) -> None:
        logs = tmp_path / "logs"
        # The shim's own stdin stays open until the end: cat would wait on it.
        proc = start_shim("sh", "-c", "cat; echo done", stdin=subprocess.PIPE)
        wait_for(log_contains(logs, b"done"), "the agent to read end of input")
        assert proc.stdin is not None
        proc.stdin.close()
        assert wait_exit(proc) == 0
        assert [r.content for r in records(logs)] == [b"done"]

    def test_sigpipe_has_its_default_action_in_the_agent(
        self, start_shim: Start, tmp_path: Path
    ) -> None:
        # `yes` ends through SIGPIPE when head closes the pipe; ignored, it would loop for ever.
        proc = start_shim("sh", "-c", "yes | head -n 2; echo end")
        assert wait_exit(proc) == 0
        assert [r.content for r in records(tmp_path / "logs")] == [b"y", b"y", b"end"]


class TestExit:
    def test_exit_code_is_recorded_and_returned(self, start_shim: Start, tmp_path: Path) -> None:
        logs = tmp_path / "logs"
        assert wait_exit(start_shim("sh", "-c", "exit 3")) == 3

        status = exit_status(logs)
        assert status["exit_code"] == 3
        assert status["signal"] is None
        assert isinstance(status["finished_at"], str)
        parse_timestamp(status["finished_at"])
        assert not (logs / (shim.EXIT_FILE + ".tmp")).exists()

    def test_death_by_signal_is_recorded(self, start_shim: Start, tmp_path: Path) -> None:
        assert wait_exit(start_shim("sh", "-c", "kill -KILL $$")) == 128 + signal.SIGKILL

        status = exit_status(tmp_path / "logs")
        assert status["exit_code"] is None
        assert status["signal"] == signal.SIGKILL

    def test_a_stale_exit_file_is_removed_before_the_agent_starts(
        self, start_shim: Start, tmp_path: Path
    ) -> None:
        logs = tmp_path / "logs"
        logs.mkdir()
        (logs / shim.EXIT_FILE).write_text('{"exit_code": 9, "signal": null}')

        proc = start_shim("sh", "-c", "echo up; sleep 60")
        wait_for(log_contains(logs, b"up"), "the agent to start")
        assert not (logs / shim.EXIT_FILE).exists()
        os.kill(proc.pid, signal.SIGTERM)
        wait_exit(proc)

    @pytest.mark.parametrize(
        ("command", "code"),
        [("/nonexistent/agent", 127), ("/dev/null", 126)],
    )
    def test_an_agent_that_cannot_start(
        self, start_shim: Start, tmp_path: Path, command: str, code: int
    ) -> None:
        logs = tmp_path / "logs"
        assert wait_exit(start_shim(command, "--flag")) == code

        (record,) = records(logs)
        assert record.stream == "stderr"
        assert record.content.startswith(b"shim: cannot start '" + command.encode())
        assert exit_status(logs)["exit_code"] == code

    def test_bad_arguments(self, tmp_path: Path) -> None:
        result = subprocess.run(
            [sys.executable, "-I", "-S", shim.__file__, "--", "true"],
            capture_output=True,
            timeout=DEADLINE,
            check=False,
        )
        assert result.returncode == 2
        assert b"usage" in result.stderr


class TestSignals:
    @pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
    def test_signals_reach_the_agent_and_its_last_words_are_kept(
        self, start_shim: Start, tmp_path: Path, sig: signal.Signals
    ) -> None:
        logs = tmp_path / "logs"
        script = (
            "trap 'echo stopping; sleep 0.2; echo bye >&2; exit 7' TERM; "
            "echo ready; while :; do sleep 0.05; done"
        )
        proc = start_shim("sh", "-c", script)
        wait_for(log_contains(logs, b"ready"), "the agent to start")

        # Only the shim is signalled; it passes SIGTERM on.
        os.kill(proc.pid, sig)
        assert wait_exit(proc) == 7
        assert [r.content for r in records(logs)] == [b"ready", b"stopping", b"bye"]
        assert exit_status(logs)["exit_code"] == 7


class TestDescendants:
    def test_shim_exits_when_the_agent_does_even_if_a_child_holds_the_pipes(
        self, start_shim: Start, tmp_path: Path
    ) -> None:
        logs = tmp_path / "logs"
        proc = start_shim("sh", "-c", "sleep 3600 & echo agent-up; exec sh -c 'exit 5'")

        assert wait_exit(proc) == 5
        assert exit_status(logs)["exit_code"] == 5
        assert [r.content for r in records(logs)] == [b"agent-up"]

        # The sleep is still there, in the shim's group: the teardown's killpg is needed.
        leftovers = group_members(proc.pid)
        assert leftovers
        os.killpg(proc.pid, signal.SIGKILL)
        wait_for(lambda: not group_members(proc.pid), "the group to die")

    def test_output_of_descendants_before_the_agent_exits_is_kept(
        self, start_shim: Start, tmp_path: Path
    ) -> None:
        script = "(echo from-child; sleep 3600) & sleep 0.3; echo agent-done"
        proc = start_shim("sh", "-c", script)
        assert wait_exit(proc) == 0
        assert sorted(r.content for r in records(tmp_path / "logs")) == [
            b"agent-done",
            b"from-child",
        ]
