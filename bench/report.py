"""The table printed at the end of a run, made from the run's JSON result."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bench.stats import ratio


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell; the first left-aligned, the others right."""
    cells = [list(headers), *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  " + "  ".join(parts).rstrip())
    return "\n".join(lines)


def _failed(section: Mapping[str, Any] | None) -> str | None:
    if section is None:
        return "  (not run)"
    if "error" in section:
        return f"  FAILED: {section['error']}"
    return None


def _traffic(section: Mapping[str, Any]) -> list[str]:
    http, sse = section["http"], section["sse"]
    paths = http["paths"]
    direct = paths["direct"]
    out = [
        f"1. Agent traffic: GET /status, {http['clients']} concurrent clients, "
        f"{http['rounds']} x {http['seconds_per_round']} s per path",
        table(
            [
                "path",
                "req/s",
                "p50 ms",
                "p99 ms",
                "errors",
                "CPU ms/req",
                "x req/s",
                "x p50",
                "x p99",
            ],
            [
                [
                    path,
                    figures["requests_per_s"],
                    figures["p50_ms"],
                    figures["p99_ms"],
                    figures["errors"],
                    " ".join(
                        f"{role}={_cell(ms)}" for role, ms in figures["cpu_ms_per_request"].items()
                    ),
                    ratio(figures["requests_per_s"], direct["requests_per_s"]),
                    ratio(figures["p50_ms"], direct["p50_ms"]),
                    ratio(figures["p99_ms"], direct["p99_ms"]),
                ]
                for path, figures in paths.items()
            ],
        ),
        "  (x: ratio to direct in this run; CPU ms per request of each process on the path)",
        "",
        f"   SSE: POST /message (direct) to its message_update on each path, "
        f"{sse['messages']} messages, {sse['lost']} lost",
        table(
            ["path", "p50 ms", "p99 ms", "x p50", "x p99"],
            [
                [
                    path,
                    figures["p50_ms"],
                    figures["p99_ms"],
                    ratio(figures["p50_ms"], sse["paths"]["direct"]["p50_ms"]),
                    ratio(figures["p99_ms"], sse["paths"]["direct"]["p99_ms"]),
                ]
                for path, figures in sse["paths"].items()
            ],
        ),
    ]
    out += [f"  note: {note}" for note in section.get("notes", [])]
    return out


def _startup(section: Mapping[str, Any]) -> list[str]:
    figures = section["figures"]
    bare = figures["bare_status"]
    bare_stop = figures["bare_stop"]
    rows = [
        ["CreateAgent -> GET /status answers", figures["cp_status"], bare],
        ["CreateAgent -> WaitAgent READY", figures["cp_wait_ready"], bare],
        ["CreateAgent call alone", figures["cp_create_call"], bare],
        ["by hand: start -> GET /status answers", bare, bare],
        ["DeleteAgent (SIGTERM, wait for group)", figures["cp_stop"], bare_stop],
        ["by hand: SIGTERM -> exit", bare_stop, bare_stop],
    ]
    return [
        f"2. Create to ready: reference agent, {section['repetitions']} repetitions each",
        table(
            ["what", "median ms", "p90 ms", "x median", "x p90"],
            [
                [
                    name,
                    mine["p50_ms"],
                    mine["p90_ms"],
                    ratio(mine["p50_ms"], base["p50_ms"]),
                    ratio(mine["p90_ms"], base["p90_ms"]),
                ]
                for name, mine, base in rows
            ],
        ),
        "  (x: ratio to the same step by hand in this run)",
    ]


def _logs(section: Mapping[str, Any]) -> list[str]:
    throughput, latency, followers = (
        section["throughput"],
        section["latency"],
        section["followers"],
    )
    readers = throughput["readers"]
    lat = latency["readers"]
    out = [
        f"3. Logs: catch-up on {readers['file']['lines']:,} lines ({throughput['log_mib']} MiB), "
        f"best of {throughput['repetitions']}",
        table(
            ["reader", "lines/s", "MiB/s", "x lines/s"],
            [
                [
                    name,
                    figures["lines_per_s"],
                    figures["mib_per_s"],
                    ratio(figures["lines_per_s"], readers["file"]["lines_per_s"]),
                ]
                for name, figures in (
                    ("StreamLogs follow (gRPC)", readers["stream_logs"]),
                    ("file read + CRI parse", readers["file"]),
                )
            ],
        ),
        "",
        f"   write-to-reader latency, {latency['lines_per_s_written']:g} lines/s for "
        f"{latency['seconds']} s",
        table(
            ["reader", "lines", "p50 ms", "p99 ms", "x p50", "x p99"],
            [
                [
                    name,
                    figures["samples"],
                    figures["p50_ms"],
                    figures["p99_ms"],
                    ratio(figures["p50_ms"], lat["tail"]["p50_ms"]),
                    ratio(figures["p99_ms"], lat["tail"]["p99_ms"]),
                ]
                for name, figures in (
                    ("StreamLogs follow (gRPC)", lat["stream_logs"]),
                    ("tail -F (inotify)", lat["tail"]),
                )
            ],
        ),
        "",
        f"   followers of one log ({followers['lines_per_s_written']:g} lines/s), control plane "
        f"RSS {followers['baseline_rss_mib']} MiB with none",
        table(
            [
                "followers",
                "RSS MiB",
                "x none",
                "KiB/follower",
                "CPU %",
                "msgs/s",
                "p50 ms",
                "p99 ms",
            ],
            [
                [
                    point["followers"],
                    point["rss_mib"],
                    ratio(point["rss_mib"], followers["baseline_rss_mib"]),
                    point["kib_per_follower"],
                    point["control_plane_cpu_percent"],
                    point["messages_per_s"],
                    point["p50_ms"],
                    point["p99_ms"],
                ]
                for point in followers["points"]
            ],
        ),
    ]
    return out


def _scale(section: Mapping[str, Any]) -> list[str]:
    points = section["points"]
    none = points[0]
    out = [
        "4. Scale: tiny agents (legacy mode), control plane",
        table(
            [
                "agents",
                "RSS MiB",
                "x none",
                "idle CPU %",
                "List p50 ms",
                "List p99 ms",
                "x p50",
                "pages",
                "creates/s",
            ],
            [
                [
                    point["agents"],
                    point["rss_mib"],
                    ratio(point["rss_mib"], none["rss_mib"]),
                    point["idle_cpu_percent"],
                    point["list"]["p50_ms"],
                    point["list"]["p99_ms"],
                    ratio(point["list"]["p50_ms"], none["list"]["p50_ms"]),
                    point.get("list_pages"),
                    point.get("creates_per_s"),
                ]
                for point in points
            ],
        ),
        "",
        "   memory of the agents' processes (shim + sleep), MiB per agent",
        table(
            ["agents", "processes", "RSS", "PSS", "private", "x PSS/RSS"],
            [
                [
                    point["agents"],
                    point["agent_processes"],
                    point["agent_processes_rss_mib_per_agent"],
                    point.get("agent_processes_pss_mib_per_agent"),
                    point.get("agent_processes_private_mib_per_agent"),
                    ratio(
                        point.get("agent_processes_pss_mib_per_agent"),
                        point["agent_processes_rss_mib_per_agent"],
                    ),
                ]
                for point in points[1:]
            ],
        ),
        "  (RSS counts shared pages such as libpython in every process; PSS splits them among",
        "   the processes that share them; private is what one more agent adds)",
    ]
    out += [f"  note: {note}" for note in section.get("notes", [])]
    return out


def _calls(figures: Mapping[str, Any]) -> str:
    return f"{figures['during']}+{figures['after']}"


def _scale_provision(section: Mapping[str, Any]) -> list[str]:
    points = section["points"]
    none, fewest = points[0], points[1] if len(points) > 1 else points[0]
    counts = [point["agents"] for point in points]
    operations = ["CreateAgent", "GetAgent", "ListAgents", "DeleteAgent"]
    out = [
        "4b. Scale: provision mode (StatefulSets in the Kubernetes test double), control plane",
        table(
            [
                "agents",
                "RSS MiB",
                "x fewest",
                "KiB/agent",
                "idle CPU %",
                "List p50 ms",
                "List p99 ms",
                "x p50",
                "pages",
                "creates/s",
                "API calls/create",
                "double CPU %",
            ],
            [
                [
                    point["agents"],
                    point["rss_mib"],
                    ratio(point["rss_mib"], fewest["rss_mib"]),
                    point["kib_per_agent"],
                    point["idle_cpu_percent"],
                    point["list"]["p50_ms"],
                    point["list"]["p99_ms"],
                    ratio(point["list"]["p50_ms"], fewest["list"]["p50_ms"]),
                    point["list_pages"],
                    point.get("creates_per_s"),
                    point.get("bulk_create", {}).get("api_calls_per_agent"),
                    point.get("kube_double_idle_cpu_percent"),
                ]
                for point in points
            ],
        ),
        f"  (x: ratio to {fewest['agents']} agents; KiB/agent: RSS above {none['rss_mib']} MiB "
        "with none; API calls/create: all requests during the bulk create divided by agents;",
        "   idle CPU % of the control plane and of the double over the idle window)",
        "",
        "   Kubernetes API requests per operation (during the call + after it), and idle, "
        "with N agents",
        table(
            ["operation", *(f"N={count:,}" for count in counts)],
            [
                *(
                    [name, *(_calls(point["api_calls"][name]) for point in points)]
                    for name in operations
                ),
                [
                    f"idle, per s ({section['idle_seconds']:g} s)",
                    *(point["idle_api_calls"]["per_s"] for point in points),
                ],
            ],
        ),
    ]
    out += [f"  note: {note}" for note in section.get("notes", [])]
    return out


def _profiles(result: Mapping[str, Any]) -> list[str]:
    found = []
    traffic = result.get("traffic", {})
    logs = result.get("logs", {})
    for name, profile in (
        ("gateway traffic (serve process)", traffic.get("profile")),
        ("StreamLogs catch-up (control plane)", logs.get("throughput", {}).get("profile")),
        ("StreamLogs followers (control plane)", logs.get("followers", {}).get("profile")),
    ):
        if not profile:
            continue
        if "error" in profile:
            found.append(f"   {name}: {profile['error']}")
            continue
        areas = ", ".join(f"{area} {pct}%" for area, pct in profile["self_by_area"].items())
        kind = "native + Python frames" if profile.get("native") else "Python frames"
        found += [
            f"   {name}: busy {profile['busy_percent']}% of one core ({kind})",
            f"     self time by area: {areas}",
            "     top self:",
            *(f"     {f['percent']:5.1f}%  {f['frame']}" for f in profile["top_self"][:8]),
            "     inclusive, our functions:",
            *(f"     {f['percent']:5.1f}%  {f['frame']}" for f in profile["project_inclusive"][:6]),
        ]
        if profile.get("kernel_calls_by_caller"):
            found += [
                "     system calls by caller:",
                *(
                    f"     {f['percent']:5.1f}%  {f['frame']}"
                    for f in profile["kernel_calls_by_caller"][:5]
                ),
            ]
    return ["5. Where the time goes (py-spy; % of busy samples)", *found] if found else []


def render(result: Mapping[str, Any]) -> str:
    """The whole table of a run's result."""
    meta = result["meta"]
    out = [
        f"agentapi-proxy bench, plan {meta['plan']['name']}, {meta['started']}, "
        f"{meta['cpus']} CPUs, load average {meta['load_average_before'][0]} before and "
        f"{meta['load_average_after'][0]} after, {meta['seconds']} s",
        "",
    ]
    if "error" in result:
        out += [f"RUN FAILED: {result['error']}", ""]
    for name, render_section in (
        ("traffic", _traffic),
        ("create_to_ready", _startup),
        ("logs", _logs),
        ("scale", _scale),
        ("scale_provision", _scale_provision),
    ):
        section = result.get(name)
        problem = _failed(section)
        if problem is not None:
            out += [f"{name}:", problem, ""]
            continue
        assert section is not None
        try:
            out += [*render_section(section), ""]
        except (KeyError, TypeError) as exc:
            out += [f"{name}: cannot show ({exc!r})", ""]
    return "\n".join(out + _profiles(result))
