"""Where the time goes: samples a server process with py-spy while a workload runs.

py-spy is a bench-time tool, not a dependency of the product
(``.venv/bin/pip install py-spy``); without it, profiling is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

TOP = 15
# Areas a sampled frame belongs to, first match wins (substring of the frame).
AREAS = (
    ("libc.so", "kernel calls (libc)"),
    ("agentapi_gateway", "gateway"),
    ("agentapi_proxy", "control plane"),
    ("grpc", "grpc"),
    ("google/protobuf", "protobuf"),
    ("_message.abi3", "protobuf"),
    ("aiohttp", "aiohttp"),
    ("yarl", "aiohttp"),
    ("multidict", "aiohttp"),
    ("asyncio", "asyncio"),
    ("selectors.py", "asyncio"),
    ("libpython", "python runtime"),
    ("object.h", "python runtime"),
    (".c)", "python runtime"),
)
# Leaf frames of a thread that waits for I/O: not work, left out of every figure.
IDLE_LEAVES = ("epoll_wait (", "poll (", "select (", "futex_wait")
# Python frames whose thread, when it sits in libc, waits for work (a lock or a queue).
WAITING_THREADS = ("_worker (concurrent/futures/thread.py)", "Thread.run (threading.py)")
# Frames of the process's own start-up, on every stack: no news in an inclusive list.
_OUTER_FILES = ("agentapi_proxy/__main__.py", "agentapi_proxy/cli.py")
_LINE_NUMBER = re.compile(r":\d+\)$")


def py_spy() -> str | None:
    """The py-spy executable beside our Python, else on PATH, else None."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _frame(frame: str) -> str:
    """``function (path/file.py)``: the frame without its line number."""
    return _LINE_NUMBER.sub(")", frame)


def _area(frame: str) -> str:
    for needle, area in AREAS:
        if needle in frame:
            return area
    return "other"


def _is_project(frame: str) -> bool:
    return ("agentapi_proxy/" in frame or "agentapi_gateway/" in frame) and not any(
        outer in frame for outer in _OUTER_FILES
    )


def _idle(leaf: str, caller: str) -> bool:
    """Whether a sample shows a thread waiting rather than working.

    Without native frames py-spy itself leaves idle threads out; with them,
    a wait in epoll, or a futex (named ``syscall`` or unresolved) under a
    worker thread's loop, shows up and is dropped here.
    """
    if leaf.startswith(IDLE_LEAVES):
        return True
    waiting_call = leaf.startswith(("syscall (", "0x")) and "libc.so" in leaf
    return waiting_call and caller in WAITING_THREADS


def summarize_collapsed(text: str, *, rate: int, seconds: float) -> dict[str, Any]:
    """What py-spy's raw (collapsed) output says: ``frame;frame;... count`` per line.

    - "self": a function was running itself (for native frames: the C
      function, e.g. a system call's libc wrapper);
    - "project_inclusive": one of our functions was anywhere on the stack;
    - "kernel_calls_by_caller": samples inside libc, by the innermost Python
      frame that led there.

    Percentages are of the busy samples (a thread waiting in epoll is idle);
    "busy_percent" compares them with what one always-busy thread gives.
    """
    own: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    kernel: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";")]
        leaf = frames[-1]
        python_frames = [f for f in frames if ".py)" in f]
        caller = python_frames[-1] if python_frames else "?"
        if _idle(leaf, caller):
            continue
        total += count
        own[leaf] += count
        areas[_area(leaf)] += count
        if "libc.so" in leaf:
            kernel[f"{leaf.split(' ')[0]} from {caller}"] += count
        for frame in set(frames):
            if _is_project(frame):
                ours[frame] += count

    def top(counter: Counter[str], limit: int = TOP) -> list[dict[str, Any]]:
        return [
            {"frame": frame, "samples": n, "percent": round(100 * n / total, 1)}
            for frame, n in counter.most_common(limit)
        ]

    if not total:
        return {"samples": 0, "busy_percent": 0.0}
    return {
        "samples": total,
        "busy_percent": round(100 * total / (rate * seconds), 1),
        "self_by_area": {area: round(100 * n / total, 1) for area, n in areas.most_common()},
        "top_self": top(own),
        "project_inclusive": top(ours),
        "kernel_calls_by_caller": top(kernel, 8),
    }


async def profile_while(
    pid: int,
    *,
    seconds: int,
    output: Path,
    workload: Callable[[], Awaitable[object]],
    rate: int = 100,
) -> dict[str, Any]:
    """Sample ``pid`` for ``seconds`` while ``workload()`` runs again and again.

    Writes py-spy's raw output to ``output`` and returns its summary, or a
    dict with an "error" when py-spy is missing or fails.
    """
    executable = py_spy()
    if executable is None:
        return {"error": "py-spy is not installed (.venv/bin/pip install py-spy)"}
    # Native frames show the C side (gRPC core, system calls) but need py-spy to
    # pause the process for each sample; without them it samples non-blocking.
    for native in (True, False):
        mode = ["--native"] if native else ["--nonblocking"]
        returncode, message = await _record(
            [
                executable,
                "record",
                f"--pid={pid}",
                f"--duration={seconds}",
                f"--rate={rate}",
                "--format=raw",
                f"--output={output}",
                *mode,
            ],
            seconds=seconds,
            workload=workload,
        )
        summary = _summary(
            output, returncode=returncode, message=message, rate=rate, seconds=seconds
        )
        summary["native"] = native
        if "error" not in summary:
            break
    return summary


async def _record(
    command: list[str], *, seconds: int, workload: Callable[[], Awaitable[object]]
) -> tuple[int | None, str]:
    """Run py-spy while ``workload()`` runs again and again; its exit code and stderr."""
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    waiting = asyncio.create_task(proc.wait())
    try:
        # Bounded: py-spy stops after ``seconds``; the slack covers attaching.
        async with asyncio.timeout(seconds + 30):
            while not waiting.done():
                await workload()
            await waiting
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        waiting.cancel()
    assert proc.stderr is not None
    message = (await proc.stderr.read()).decode(errors="replace")
    return proc.returncode, message


def _summary(
    output: Path, *, returncode: int | None, message: str, rate: int, seconds: float
) -> dict[str, Any]:
    if returncode != 0 or not output.exists():
        return {"error": f"py-spy exited with {returncode}: {message.strip()[-300:]}"}
    summary = summarize_collapsed(output.read_text(), rate=rate, seconds=seconds)
    summary["raw_output"] = str(output)
    return summary
