"""Logs: StreamLogs (gRPC, follow) against reading the agent's log file directly.

The agents here run :mod:`bench.log_writer`, whose lines carry the wall-clock
time they were written at. The direct reader of a live log is ``tail -F``
(inotify), the usual way to follow a file on one machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from agentapi_proxy.v1 import agent_service_pb2 as pb
from agentapi_proxy.v1 import agent_service_pb2_grpc as pb_grpc
from bench.procfs import CpuMeter, rss_bytes
from bench.stats import ratio, summarize_ms

logger = logging.getLogger(__name__)

BURST_DONE = b"burst-done"
STREAM_SETUP_TIMEOUT = 60.0
MIB = 1024 * 1024


def ticks(data: bytes, received_ns: int) -> Iterator[tuple[int, float]]:
    """(sequence number, seconds from write to ``received_ns``) of each tick line in ``data``."""
    for line in data.split(b"\n"):
        parts = line.split(b" ")
        if len(parts) == 3 and parts[0] == b"tick":
            yield int(parts[1]), (received_ns - int(parts[2])) / 1e9


def cri_content(record: bytes) -> bytes:
    """The content of a CRI log record (``TIME STREAM TAG CONTENT``)."""
    parts = record.split(b" ", 3)
    return parts[3] if len(parts) == 4 else b""


def burst_size(log_path: Path) -> int | None:
    """The log's size once it ends with the writer's ``burst-done`` line, else None."""
    try:
        with log_path.open("rb") as log:
            size = log.seek(0, os.SEEK_END)
            log.seek(max(0, size - 64))
            return size if log.read().endswith(b" " + BURST_DONE + b"\n") else None
    except FileNotFoundError:
        return None


async def wait_for_burst(log_path: Path) -> int:
    """Wait until the writer's burst is in the log; returns the log's size then."""
    # Polling: the file is written by another process, and there is no portable event for it.
    while True:
        size = burst_size(log_path)
        if size is not None:
            return size
        await asyncio.sleep(0.05)


def read_file_directly(log_path: Path) -> int:
    """Read the log from its start up to ``burst-done`` as a client on the host would:
    blocks of 64 KiB, split into records, content cut out. Returns the lines read."""
    lines = 0
    carry = b""
    with log_path.open("rb", buffering=0) as log:
        while block := log.read(64 * 1024):
            buf = carry + block
            end = buf.rfind(b"\n")
            for record in buf[:end].split(b"\n"):
                lines += 1
                if cri_content(record) == BURST_DONE:
                    return lines
            carry = buf[end + 1 :]
    raise RuntimeError(f"{log_path} has no {BURST_DONE!r} line")


async def read_stream_logs(agents: pb_grpc.AgentServiceStub, agent_id: str) -> int:
    """Follow the agent's log from its start up to ``burst-done``; returns the lines read."""
    lines: int = 0
    call = agents.StreamLogs(pb.StreamLogsRequest(agent_id=agent_id, follow=True))
    try:
        async for response in call:
            lines += int(response.data.count(b"\n"))
            if b"\n" + BURST_DONE + b"\n" in response.data or response.data.startswith(
                BURST_DONE + b"\n"
            ):
                return lines
    finally:
        call.cancel()
    raise RuntimeError(f"the log of {agent_id} ended before {BURST_DONE!r}")


async def log_throughput(
    agents: pb_grpc.AgentServiceStub, *, agent_id: str, log_path: Path, repetitions: int
) -> dict[str, Any]:
    """Lines per second reading a finished burst: StreamLogs (follow) against the file."""
    async with asyncio.timeout(STREAM_SETUP_TIMEOUT):
        size = await wait_for_burst(log_path)
    best: dict[str, float] = {}
    lines: dict[str, int] = {}
    for _ in range(repetitions):
        started = time.perf_counter()
        lines["stream_logs"] = await read_stream_logs(agents, agent_id)
        elapsed = time.perf_counter() - started
        best["stream_logs"] = min(best.get("stream_logs", elapsed), elapsed)

        started = time.perf_counter()
        lines["file"] = read_file_directly(log_path)
        elapsed = time.perf_counter() - started
        best["file"] = min(best.get("file", elapsed), elapsed)
    readers = {
        reader: {
            "lines": lines[reader],
            "best_seconds": round(best[reader], 4),
            "lines_per_s": round(lines[reader] / best[reader]),
            "mib_per_s": round(size / MIB / best[reader], 1),
        }
        for reader in best
    }
    return {
        "repetitions": repetitions,
        "log_mib": round(size / MIB, 2),
        "readers": readers,
        "ratios": {
            "stream_logs_vs_file": {
                "lines_per_s": ratio(
                    readers["stream_logs"]["lines_per_s"], readers["file"]["lines_per_s"]
                )
            }
        },
    }


@contextlib.asynccontextmanager
async def tail_follow(log_path: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """``tail -F`` of the log from its current end, stopped (by PID) on exit."""
    proc = await asyncio.create_subprocess_exec(
        "tail",
        "-n",
        "0",
        # Only matters without inotify: then tail polls, at this interval.
        "-s",
        "0.01",
        "-F",
        str(log_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        await proc.wait()


async def log_latency(
    agents: pb_grpc.AgentServiceStub,
    *,
    agent_id: str,
    log_path: Path,
    seconds: float,
    rate: float,
) -> dict[str, Any]:
    """Write-to-reader latency of each line, StreamLogs (follow) against ``tail -F``.

    Both readers run at once on the same agent; only lines both received count.
    """
    received: dict[str, dict[int, float]] = {"stream_logs": {}, "tail": {}}

    async def grpc_reader() -> None:
        call = agents.StreamLogs(pb.StreamLogsRequest(agent_id=agent_id, follow=True, tail_lines=0))
        try:
            async for response in call:
                received["stream_logs"].update(ticks(response.data, time.time_ns()))
        finally:
            call.cancel()

    async def tail_reader(proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            received["tail"].update(ticks(cri_content(line.rstrip(b"\n")), time.time_ns()))

    async with tail_follow(log_path) as proc:
        readers = [asyncio.create_task(grpc_reader()), asyncio.create_task(tail_reader(proc))]
        try:
            await asyncio.sleep(seconds)
        finally:
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
    common = set(received["stream_logs"]) & set(received["tail"])
    paths = {
        reader: summarize_ms([values[seq] for seq in sorted(common)])
        for reader, values in received.items()
    }
    return {
        "seconds": seconds,
        "lines_per_s_written": rate,
        "lines_seen": {reader: len(values) for reader, values in received.items()},
        "readers": paths,
        "ratios": {
            "stream_logs_vs_tail": {
                "p50": ratio(paths["stream_logs"]["p50_ms"], paths["tail"]["p50_ms"]),
                "p99": ratio(paths["stream_logs"]["p99_ms"], paths["tail"]["p99_ms"]),
            }
        },
    }


@dataclass
class _Followers:
    """K open StreamLogs calls; latencies are kept only while ``measuring``."""

    calls: list[grpc.aio.UnaryStreamCall[pb.StreamLogsRequest, pb.StreamLogsResponse]]
    measuring: bool = False
    latencies: list[float] = field(default_factory=list)
    messages: int = 0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def read(
        self, call: grpc.aio.UnaryStreamCall[pb.StreamLogsRequest, pb.StreamLogsResponse]
    ) -> None:
        async for response in call:
            if self.measuring:
                self.messages += 1
                self.latencies.extend(lat for _, lat in ticks(response.data, time.time_ns()))


async def follower_memory(
    agents: pb_grpc.AgentServiceStub,
    *,
    agent_id: str,
    control_plane_pid: int,
    counts: tuple[int, ...],
    seconds: float,
    rate: float,
    profile: Callable[[], Awaitable[dict[str, Any] | None]] | None = None,
) -> dict[str, Any]:
    """Control-plane RSS and CPU, and line latency, with K followers of one agent's log.

    The counts run in increasing order; RSS is read at the end of each window,
    so it includes what earlier, larger allocations left in the heap.
    ``profile()``, when given, runs after the window of the largest count,
    with its followers still open; its result is returned under "profile".
    """
    profiled: dict[str, Any] | None = None
    await asyncio.sleep(0.5)
    baseline = rss_bytes(control_plane_pid)
    meter = CpuMeter({"control_plane": lambda: [control_plane_pid]})
    points: list[dict[str, Any]] = []
    for count in counts:
        request = pb.StreamLogsRequest(agent_id=agent_id, follow=True, tail_lines=0)
        followers = _Followers(calls=[agents.StreamLogs(request) for _ in range(count)])
        followers.tasks = [asyncio.create_task(followers.read(call)) for call in followers.calls]
        try:
            async with asyncio.timeout(STREAM_SETUP_TIMEOUT):
                await asyncio.gather(*(call.initial_metadata() for call in followers.calls))
            # Let every follower see one wake-up before measuring.
            await asyncio.sleep(max(0.5, 2.0 / rate))
            meter.start()
            followers.measuring = True
            started = time.perf_counter()
            await asyncio.sleep(seconds)
            followers.measuring = False
            elapsed = time.perf_counter() - started
            cpu = meter.stop()["control_plane"]
            rss = rss_bytes(control_plane_pid)
            if profile is not None and count == counts[-1]:
                profiled = await profile()
        finally:
            for call in followers.calls:
                call.cancel()
            await asyncio.gather(*followers.tasks, return_exceptions=True)
        points.append(
            {
                "followers": count,
                "rss_mib": round(rss / MIB, 1),
                "rss_growth_mib": round((rss - baseline) / MIB, 1),
                "kib_per_follower": round((rss - baseline) / 1024 / count, 1),
                "control_plane_cpu_percent": round(100 * cpu / elapsed, 1),
                "messages_per_s": round(followers.messages / elapsed),
                **summarize_ms(followers.latencies),
            }
        )
        await asyncio.sleep(0.5)
    first, last = points[0], points[-1]
    extra = {} if profiled is None else {"profile": profiled}
    return {
        **extra,
        "lines_per_s_written": rate,
        "seconds": seconds,
        "baseline_rss_mib": round(baseline / MIB, 1),
        "points": points,
        "ratios": {
            # "most": the largest follower count, "fewest": the smallest.
            "rss_most_vs_none": ratio(last["rss_mib"], baseline / MIB),
            "rss_most_vs_fewest": ratio(last["rss_mib"], first["rss_mib"]),
            "p50_latency_most_vs_fewest": ratio(last["p50_ms"], first["p50_ms"]),
        },
    }
