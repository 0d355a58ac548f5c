"""The StatefulSet controller's revision hash, and why long names fail only sometimes.

The real controller stores each pod template in a ControllerRevision and labels
pods ``controller-revision-hash={set name}-{hash}``. The hash is the 32-bit
FNV-1 hash (Go's ``hash/fnv.New32``, not FNV-1a) of the revision data (plus the
collision count), printed in decimal and mapped character by character onto the
"safe" alphabet ``bcdfghjklmnpqrstvwxz2456789``. A decimal uint32 has 10 digits
for about 77% of values and fewer otherwise, so the label of a set whose name
has 53 to 55 characters exceeds 63 characters for some templates and not for
others (case K01). The bytes hashed here are not byte-for-byte those of the Go
controller (its JSON field order differs); the length distribution is the same.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

_FNV32_OFFSET: Final = 0x811C9DC5
_FNV32_PRIME: Final = 0x01000193
_SAFE_ALPHABET: Final = "bcdfghjklmnpqrstvwxz2456789"

LABEL_VALUE_MAX: Final = 63


def fnv1_32(data: bytes) -> int:
    """32-bit FNV-1: multiply, then xor (FNV-1a does the opposite)."""
    value = _FNV32_OFFSET
    for byte in data:
        value = (value * _FNV32_PRIME) & 0xFFFFFFFF
        value ^= byte
    return value


def safe_encode(text: str) -> str:
    """Map each character onto an alphabet without vowels (no accidental words)."""
    return "".join(_SAFE_ALPHABET[ord(char) % len(_SAFE_ALPHABET)] for char in text)


def revision_hash(template: Mapping[str, Any], *, collision_count: int = 0) -> str:
    """The hash of a pod template: 1 to 10 characters, usually 10.

    Deterministic: the same template (after defaulting) always gives the same hash. The
    controller always hashes the collision count too (0 unless revision names collided).
    """
    patch = {"spec": {"template": {**template, "$patch": "replace"}}}
    raw = json.dumps(patch, sort_keys=True, separators=(",", ":")).encode()
    return safe_encode(str(fnv1_32(raw + str(collision_count).encode())))


def revision_label(set_name: str, template: Mapping[str, Any], *, collision_count: int = 0) -> str:
    """``{set name}-{hash}``: the controller-revision-hash label value of the set's pods."""
    return f"{set_name}-{revision_hash(template, collision_count=collision_count)}"
