"""CPU time and memory of processes, read from ``/proc`` (Linux only)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Iterable[int]) -> float:
    """User plus system CPU seconds used so far by the given processes (gone ones count 0)."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        # Fields 14 and 15 of proc(5): utime and stime; fields[0] is field 3.
        total += int(fields[11]) + int(fields[12])
    return total / _TICKS_PER_SECOND


def rss_bytes(pid: int) -> int:
    """Resident set size of the process; 0 when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class CpuMeter:
    """CPU seconds per role (e.g. "agent", "gateway") between :meth:`start` and :meth:`stop`.

    ``roles`` maps a role to a function listing its PIDs now; it is called at
    both ends so that processes are looked up again (an agent's group can change).
    """

    def __init__(self, roles: Mapping[str, Callable[[], Iterable[int]]]) -> None:
        self._roles = dict(roles)
        self._start: dict[str, float] = {}

    def start(self) -> None:
        self._start = {role: cpu_seconds(pids()) for role, pids in self._roles.items()}

    def stop(self) -> dict[str, float]:
        """CPU seconds used by each role since :meth:`start`."""
        return {
            role: max(0.0, cpu_seconds(pids()) - self._start.get(role, 0.0))
            for role, pids in self._roles.items()
        }


def processes_by_group() -> dict[int, list[int]]:
    """Live (not zombie) PIDs by process group id, from one pass over ``/proc``."""
    groups: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":
            groups.setdefault(int(fields[2]), []).append(int(entry.name))
    return groups
