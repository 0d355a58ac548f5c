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
# Areas a frame's file belongs to, first match wins (substring of the file path).
AREAS = (
    ("agentapi_gateway", "gateway"),
    ("agentapi_proxy", "control plane"),
    ("grpc", "grpc"),
    ("google/protobuf", "protobuf"),
    ("aiohttp", "aiohttp"),
    ("yarl", "aiohttp"),
    ("multidict", "aiohttp"),
    ("asyncio", "asyncio"),
)
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


def summarize_collapsed(text: str, *, rate: int, seconds: float) -> dict[str, Any]:
    """Top frames of py-spy's raw (collapsed) output: ``frame;frame;... count`` per line.

    "self" counts a function when it was running itself, "inclusive" when it
    was anywhere on the stack; percentages are of all samples taken.
    "busy_percent" compares the samples with what one always-busy thread gives.
    """
    own: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";")]
        total += count
        own[frames[-1]] += count
        areas[_area(frames[-1])] += count
        for frame in set(frames):
            anywhere[frame] += count

    def top(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"frame": frame, "samples": n, "percent": round(100 * n / total, 1)}
            for frame, n in counter.most_common(TOP)
        ]

    return {
        "samples": total,
        "busy_percent": round(100 * total / (rate * seconds), 1),
        "self_by_area": {area: round(100 * n / total, 1) for area, n in areas.most_common()}
        if total
        else {},
        "top_self": top(own) if total else [],
        "top_inclusive": top(anywhere) if total else [],
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
    proc = await asyncio.create_subprocess_exec(
        executable,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(seconds),
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--output",
        str(output),
        # Sampling without pausing the process keeps the profile from slowing it.
        "--nonblocking",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
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
    return _summary(output, returncode=proc.returncode, message=message, rate=rate, seconds=seconds)


def _summary(
    output: Path, *, returncode: int | None, message: str, rate: int, seconds: float
) -> dict[str, Any]:
    if returncode != 0 or not output.exists():
        return {"error": f"py-spy exited with {returncode}: {message.strip()[-300:]}"}
    summary = summarize_collapsed(output.read_text(), rate=rate, seconds=seconds)
    summary["raw_output"] = str(output)
    return summary
