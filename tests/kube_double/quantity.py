"""Resource quantities (``500m``, ``1Gi``, ``2e3``) parsed as the API server parses them.

The API server parses quantities while decoding the request body, so a
malformed one is a 400 BadRequest ("... cannot be handled as a StatefulSet:
quantities must match the regular expression ..."), not a 422.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Final

FORMAT_MESSAGE: Final = (
    "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"
)
SUFFIX_MESSAGE: Final = "unable to parse quantity's suffix"

_BINARY: Final = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_DECIMAL: Final = {
    "n": -9,
    "u": -6,
    "m": -3,
    "": 0,
    "k": 3,
    "M": 6,
    "G": 9,
    "T": 12,
    "P": 15,
    "E": 18,
}
_SUFFIX_CHARS: Final = "eEinumkKMGTP"


class QuantityError(ValueError):
    """A quantity the API server would refuse to decode; ``str()`` is its message."""


def _split(text: str) -> tuple[str, str]:
    """Number and suffix, following the API server's scanner (not a regex)."""
    pos = 0
    end = len(text)
    if pos < end and text[pos] in "+-":
        pos += 1
    while pos < end and text[pos].isdigit():
        pos += 1
    if pos < end and text[pos] == ".":
        pos += 1
        while pos < end and text[pos].isdigit():
            pos += 1
    number = text[:pos]
    suffix_start = pos
    while pos < end and text[pos] in _SUFFIX_CHARS:
        pos += 1
    if pos < end and text[pos] in "+-":
        pos += 1
    while pos < end and text[pos].isdigit():
        pos += 1
    if pos < end:
        raise QuantityError(FORMAT_MESSAGE)
    return number, text[suffix_start:]


def parse_quantity(value: object) -> Decimal:
    """The numeric value of ``value`` (a JSON string or number); raises QuantityError."""
    if isinstance(value, bool):
        raise QuantityError(FORMAT_MESSAGE)
    if isinstance(value, int | float):
        return Decimal(str(value))
    if not isinstance(value, str) or not value:
        raise QuantityError(FORMAT_MESSAGE)
    number, suffix = _split(value)
    digits = number.lstrip("+-")
    if digits in ("", "."):
        digits = "0"
    try:
        base = Decimal(digits)
    except InvalidOperation as exc:
        raise QuantityError(FORMAT_MESSAGE) from exc
    if number.startswith("-"):
        base = -base

    if suffix in _BINARY:
        return base * (Decimal(2) ** _BINARY[suffix])
    if suffix in _DECIMAL:
        return base.scaleb(_DECIMAL[suffix])
    if suffix[:1] in ("e", "E"):
        exponent = suffix[1:]
        if exponent.lstrip("+-").isdigit():
            return base.scaleb(int(exponent))
    raise QuantityError(SUFFIX_MESSAGE)
