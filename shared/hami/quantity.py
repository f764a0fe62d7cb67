"""Kubernetes resource quantities ("500m", "2Gi", "1e3", "100") as exact fractions.

The grammar is the API server's: a signed decimal number, then either a binary suffix
(Ki Mi Gi Ti Pi Ei), a decimal suffix (n u m k M G T P E) or a decimal exponent (e3).
Exact arithmetic, so "0.1" CPUs is exactly 100 milli-CPUs.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_RE = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))(?:([eE][+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?)$")

MIB = 1 << 20


class QuantityError(ValueError):
    """Not a Kubernetes quantity."""


def parse_quantity(value: str | int | float) -> Fraction:
    """The exact value of a quantity; raises :class:`QuantityError` with the text."""
    if isinstance(value, bool):
        raise QuantityError(f"{value!r} is not a quantity")
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, float):
        return Fraction(str(value))
    text = str(value).strip()
    m = _RE.match(text)
    if not m:
        raise QuantityError(f"{value!r} is not a quantity (examples: 1, 500m, 2Gi)")
    number = Fraction(m.group(1))
    if m.group(2):
        return number * Fraction(10) ** int(m.group(2)[1:])
    suffix = m.group(3) or ""
    if suffix in _BINARY:
        return number * (1 << (10 * _BINARY[suffix]))
    return number * Fraction(10) ** _DECIMAL[suffix]


def ceil_int(q: Fraction) -> int:
    return math.ceil(q)


def milli(value: str | int | float) -> int:
    """CPU quantity in milli-units, rounded up (as the scheduler counts it)."""
    return math.ceil(parse_quantity(value) * 1000)


def mib(value: str | int | float) -> int:
    """Memory quantity (bytes) in MiB, rounded up."""
    return math.ceil(parse_quantity(value) / MIB)
