"""The benchmark keeps working: one ``--quick`` run, end to end, checked for shape, never speed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.servers import chp_available

REPO = Path(__file__).resolve().parent.parent

# Every ratio the run must produce: (path of keys in the JSON result).
REQUIRED_RATIOS = [
    ("traffic", "http", "ratios", "gateway_vs_direct", "requests_per_s"),
    ("traffic", "http", "ratios", "gateway_vs_direct", "p50"),
    ("traffic", "http", "ratios", "gateway_vs_direct", "p99"),
    ("traffic", "sse", "ratios", "gateway_vs_direct", "p50"),
    ("traffic", "sse", "ratios", "gateway_vs_direct", "p99"),
    ("create_to_ready", "ratios", "status_vs_bare", "median"),
    ("create_to_ready", "ratios", "status_vs_bare", "p90"),
    ("create_to_ready", "ratios", "wait_ready_vs_bare", "median"),
    ("create_to_ready", "ratios", "stop_vs_bare", "median"),
    ("logs", "throughput", "ratios", "stream_logs_vs_file", "lines_per_s"),
    ("logs", "latency", "ratios", "stream_logs_vs_tail", "p50"),
    ("logs", "latency", "ratios", "stream_logs_vs_tail", "p99"),
    ("logs", "followers", "ratios", "rss_most_vs_none"),
    ("logs", "followers", "ratios", "p50_latency_most_vs_fewest"),
    ("scale", "ratios", "rss_most_vs_none"),
    ("scale", "ratios", "list_p50_most_vs_none"),
    ("scale", "ratios", "agent_pss_vs_rss_most"),
    ("scale_provision", "ratios", "rss_most_vs_fewest"),
    ("scale_provision", "ratios", "list_p50_most_vs_fewest"),
    ("scale_provision", "ratios", "list_api_calls_most_vs_fewest"),
    ("scale_provision", "ratios", "create_api_calls_most_vs_fewest"),
]
CHP_RATIOS = [
    ("traffic", "http", "ratios", "chp_vs_direct", "requests_per_s"),
    ("traffic", "http", "ratios", "gateway_vs_chp", "p50"),
    ("traffic", "sse", "ratios", "chp_vs_direct", "p50"),
]


def _lookup(result: dict[str, Any], keys: tuple[str, ...]) -> Any:
    value: Any = result
    for key in keys:
        assert isinstance(value, dict) and key in value, f"missing {'.'.join(keys)}"
        value = value[key]
    return value


def _all_ratios(node: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf under any "ratios" key, with its dotted path."""
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key == "ratios":
            yield from _leaves(value, f"{where}.ratios")
        else:
            yield from _all_ratios(value, f"{where}.{key}")


def _leaves(node: Any, where: str) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{where}.{key}")
    else:
        yield where, node


def _processes_under(root: Path) -> list[str]:
    """Processes whose command line or working directory lies under ``root``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if str(root) in cmdline or cwd.startswith(str(root)):
            found.append(f"{entry.name}: {cmdline[:200]}")
    return found


def test_quick_bench_writes_every_section_with_ratios(tmp_path: Path) -> None:
    out = tmp_path / "results" / "bench.json"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    # The bench's temporary state directories land in scratch/, so leftovers can be found.
    env = {**os.environ, "TMPDIR": str(scratch)}
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(out)],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert str(out) in done.stdout
    for heading in ("1. Agent traffic", "4. Scale", "4b. Scale: provision mode"):
        assert heading in done.stdout

    result = json.loads(out.read_text())
    for section in ("traffic", "create_to_ready", "logs", "scale", "scale_provision"):
        assert "error" not in result[section], result[section].get("trace")
    for keys in REQUIRED_RATIOS + (CHP_RATIOS if chp_available() else []):
        value = _lookup(result, keys)
        assert isinstance(value, float | int), f"{'.'.join(keys)} = {value!r}"
    # Provision mode: every agent turned READY and the double's request log was read.
    provisioned = result["scale_provision"]["points"][-1]
    assert provisioned["not_ready"] == 0
    assert provisioned["api_calls"]["CreateAgent"]["by_call"]["create statefulsets"] == 1
    ratios = list(_all_ratios(result))
    assert len(ratios) >= len(REQUIRED_RATIOS)
    for where, value in ratios:
        assert isinstance(value, float | int) and math.isfinite(value) and value > 0, (where, value)

    # Everything the bench started is gone, and so is its scratch state.
    assert _processes_under(scratch) == []
    assert list(scratch.iterdir()) == []
