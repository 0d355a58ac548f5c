"""Timestamps as the API server and the kubelet print them."""

from __future__ import annotations

import time


def rfc3339(at: float | None = None) -> str:
    """``metav1.Time``: whole seconds, UTC, e.g. ``2024-05-01T12:00:00Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if at is None else at))


def rfc3339_micro(at: float | None = None) -> str:
    """``metav1.MicroTime`` (Event.eventTime): microseconds, UTC."""
    at = time.time() if at is None else at
    micros = round((at % 1) * 1_000_000) % 1_000_000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{micros:06d}Z"


def rfc3339_nano(time_ns: int) -> str:
    """``2024-05-01T12:00:00.123456789Z`` with trailing zeros trimmed, like Go's RFC3339Nano."""
    seconds, nanos = divmod(time_ns, 1_000_000_000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    fraction = f"{nanos:09d}".rstrip("0")
    return f"{stamp}.{fraction}Z" if fraction else f"{stamp}Z"


def parse_rfc3339(text: str) -> float:
    """Seconds since the epoch of an RFC 3339 time (fractions and offsets allowed)."""
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
