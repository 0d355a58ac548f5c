"""Agent traffic: small requests and SSE events, through each path to the same agent.

A *path* is a base URL that ends up at one agent: directly, through the
gateway (``/agents/{id}/proxy``) or through configurable-http-proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.procfs import CpuMeter
from bench.stats import ratio, summarize_ms

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=10)
# How long one SSE wait may take before the message counts as lost (a hang guard).
EVENT_TIMEOUT = 10.0


@dataclass
class LoadRun:
    """What a closed-loop run against one path measured."""

    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    cpu: dict[str, float] = field(default_factory=dict)

    def add(self, other: LoadRun) -> None:
        self.seconds += other.seconds
        self.latencies += other.latencies
        self.errors += other.errors
        for role, used in other.cpu.items():
            self.cpu[role] = self.cpu.get(role, 0.0) + used


async def closed_loop(
    session: aiohttp.ClientSession, url: str, *, clients: int, seconds: float
) -> LoadRun:
    """``clients`` workers each send GET ``url`` again as soon as the last answer is read.

    Runs for ``seconds``; an answer other than 200 or a failed request counts as an error.
    """
    run = LoadRun()
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            try:
                async with session.get(url) as response:
                    await response.read()
                    ok = response.status == 200
            except (aiohttp.ClientError, OSError, TimeoutError):
                ok = False
            if ok:
                run.latencies.append(time.perf_counter() - sent)
            else:
                run.errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    run.seconds = time.perf_counter() - started
    return run


async def http_load(
    urls: Mapping[str, str],
    *,
    clients: int,
    rounds: int,
    seconds: float,
    warmup: float,
    roles: Mapping[str, Callable[[], Iterable[int]]],
    path_roles: Mapping[str, Iterable[str]],
) -> dict[str, Any]:
    """Requests/s, latency and CPU per request of GET ``urls[path]`` for each path.

    The paths take turns, ``rounds`` times each, so that a noisy neighbour
    slows them alike. ``roles`` name the processes whose CPU time is counted;
    ``path_roles[path]`` are the ones that path goes through.
    """
    meter = CpuMeter({**roles, "client": lambda: [os.getpid()]})
    totals = {path: LoadRun() for path in urls}
    sessions = {
        path: aiohttp.ClientSession(
            timeout=REQUEST_TIMEOUT, connector=aiohttp.TCPConnector(limit=clients)
        )
        for path in urls
    }
    try:
        for path, url in urls.items():
            await closed_loop(sessions[path], url, clients=clients, seconds=warmup)
        order = list(urls)
        for round_index in range(rounds):
            for path in order[round_index % len(order) :] + order[: round_index % len(order)]:
                meter.start()
                run = await closed_loop(
                    sessions[path], urls[path], clients=clients, seconds=seconds
                )
                run.cpu = meter.stop()
                totals[path].add(run)
    finally:
        for session in sessions.values():
            await session.close()

    paths: dict[str, Any] = {}
    for path, total in totals.items():
        requests = len(total.latencies)
        involved = [*path_roles[path], "client"]
        paths[path] = {
            "requests": requests,
            "errors": total.errors,
            "seconds": round(total.seconds, 3),
            "requests_per_s": round(requests / total.seconds, 1) if total.seconds else None,
            **summarize_ms(total.latencies),
            "cpu_ms_per_request": {
                role: round(1000 * total.cpu.get(role, 0.0) / requests, 4) if requests else None
                for role in involved
            },
        }
    return {
        "clients": clients,
        "rounds": rounds,
        "seconds_per_round": seconds,
        "paths": paths,
        "ratios": _path_ratios(
            paths,
            {"requests_per_s": "requests_per_s", "p50": "p50_ms", "p99": "p99_ms"},
        ),
    }


def _path_ratios(paths: Mapping[str, Any], figures: Mapping[str, str]) -> dict[str, Any]:
    """Each proxy against direct, and both gateway paths against configurable-http-proxy."""
    pairs = [
        ("gateway", "direct"),
        ("gateway_direct", "direct"),
        ("chp", "direct"),
        ("gateway", "chp"),
        ("gateway_direct", "chp"),
    ]
    return {
        f"{a}_vs_{b}": {name: ratio(paths[a][key], paths[b][key]) for name, key in figures.items()}
        for a, b in pairs
        if a in paths and b in paths
    }


@dataclass(frozen=True)
class Event:
    name: str
    data: Any
    at: float


class Subscriber:
    """One open ``GET /events`` whose events are queued with their arrival time."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        name, data = "", ""
        async for raw in self.response.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event:"):
                name = line[len("event:") :].strip()
            elif line.startswith("data:"):
                data = line[len("data:") :].strip()
            elif not line and data:
                self.events.put_nowait(Event(name, json.loads(data), time.perf_counter()))
                name, data = "", ""

    async def wait_for(self, match: Callable[[Event], bool]) -> Event:
        """The next event that ``match`` accepts; raises TimeoutError after EVENT_TIMEOUT."""
        async with asyncio.timeout(EVENT_TIMEOUT):
            while True:
                event = await self.events.get()
                if match(event):
                    return event

    async def close(self) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        self.response.close()


async def sse_latency(
    events_urls: Mapping[str, str], *, message_url: str, messages: int
) -> dict[str, Any]:
    """Time from POST /message (sent directly) to its ``message_update`` on each path.

    All paths subscribe to the same agent at once, so every message is one
    sample for each of them. The sample is the user message's own event,
    which the agent publishes while answering the POST (its answer's events
    come after a deliberate delay that would only add a constant).
    """
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with _subscribers(session, events_urls) as subscribers:
            for subscriber in subscribers.values():
                await subscriber.wait_for(lambda e: e.name == "status_change")
            samples: dict[str, list[float]] = {path: [] for path in events_urls}
            lost = 0
            nonce = os.urandom(3).hex()
            for index in range(messages):
                tag = f"bench {nonce} {index}"
                sent = await _post_message(session, message_url, tag)
                for path, subscriber in subscribers.items():
                    try:
                        event = await subscriber.wait_for(_user_message(tag))
                        samples[path].append(event.at - sent)
                        await subscriber.wait_for(_stable)
                    except TimeoutError:
                        lost += 1
                        logger.warning("%s: no event for message %d", path, index)
    paths = {path: summarize_ms(values) for path, values in samples.items()}
    return {
        "messages": messages,
        "lost": lost,
        "paths": paths,
        "ratios": _path_ratios(paths, {"p50": "p50_ms", "p99": "p99_ms"}),
    }


def _user_message(content: str) -> Callable[[Event], bool]:
    def match(event: Event) -> bool:
        return (
            event.name == "message_update"
            and event.data.get("role") == "user"
            and event.data.get("message") == content
        )

    return match


def _stable(event: Event) -> bool:
    return event.name == "status_change" and event.data.get("status") == "stable"


@contextlib.asynccontextmanager
async def _subscribers(
    session: aiohttp.ClientSession, urls: Mapping[str, str]
) -> AsyncIterator[dict[str, Subscriber]]:
    subscribers: dict[str, Subscriber] = {}
    try:
        for path, url in urls.items():
            response = await session.get(url)
            if response.status != 200 or not response.content_type.startswith("text/event-stream"):
                body = await response.text()
                response.close()
                raise RuntimeError(f"{path}: GET {url} answered {response.status}: {body[:200]}")
            subscribers[path] = Subscriber(response)
        yield subscribers
    finally:
        for subscriber in subscribers.values():
            await subscriber.close()


async def _post_message(session: aiohttp.ClientSession, url: str, content: str) -> float:
    """POST a user message, retrying while the agent is busy; returns when it was sent."""
    deadline = time.monotonic() + EVENT_TIMEOUT
    while True:
        sent = time.perf_counter()
        async with session.post(url, json={"content": content, "type": "user"}) as response:
            if response.status == 200:
                return sent
            if response.status != 409 or time.monotonic() > deadline:
                raise RuntimeError(
                    f"POST {url} answered {response.status}: {await response.text()}"
                )
        await asyncio.sleep(0.01)
