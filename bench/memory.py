"""How much memory processes use, counted three ways, from ``/proc/PID/smaps_rollup``.

- RSS counts every resident page the process maps, shared ones too: N Python
  processes each count libpython and the interpreter's other shared pages in full.
- PSS divides each shared page among the processes that map it, so the PSS of a
  set of processes adds up to what they use together.
- Private (USS) counts only pages no other process maps: what one more identical
  process would add.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_FIELDS = {"Rss:": "rss", "Pss:": "pss", "Private_Clean:": "private", "Private_Dirty:": "private"}


@dataclass(frozen=True)
class Memory:
    """Bytes of resident memory, see the module docstring for what each counts."""

    rss: int = 0
    pss: int = 0
    private: int = 0

    def __add__(self, other: Memory) -> Memory:
        return Memory(
            rss=self.rss + other.rss,
            pss=self.pss + other.pss,
            private=self.private + other.private,
        )


def process_memory(pid: int) -> Memory:
    """The memory of one process; all 0 when it is gone or its smaps cannot be read."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return Memory()
    kib = {"rss": 0, "pss": 0, "private": 0}
    for line in rollup.splitlines():
        name, _, rest = line.partition(" ")
        field = _FIELDS.get(name)
        if field is not None:
            kib[field] += int(rest.split()[0])
    return Memory(rss=kib["rss"] * 1024, pss=kib["pss"] * 1024, private=kib["private"] * 1024)


def total_memory(pids: Iterable[int]) -> Memory:
    """The sum over ``pids`` (gone ones count 0)."""
    total = Memory()
    for pid in pids:
        total += process_memory(pid)
    return total
