"""Parsing of the human units that configuration files and CLIs accept.

Durations: ``30s``, ``5m``, ``2h``, ``1h30m``, ``250ms``, ``1d`` or plain seconds, and the rest of upstream's
(humantime) syntax: ``720h``, ``1h 30min``, ``2 days``, ``1w``.
Sizes: ``50MB`` (decimal), ``4MiB`` (binary), ``10k``-style short forms, or plain bytes; units in any case and
``Ki``/``Mi`` short forms as upstream's (bytesize) parser takes them: ``4mib``, ``50GB``, ``1 Gi``.
"""

from __future__ import annotations

import re

# Longer leases, timeouts or intervals are mistakes (and would overflow protobuf timestamps).
MAX_DURATION_SECONDS = 100 * 365 * 86400

_DURATION_UNITS: dict[str, tuple[str, ...]] = {
    "ns": ("nsec", "ns"),
    "us": ("usec", "us", "µs"),
    "ms": ("msec", "ms"),
    "s": ("seconds", "second", "secs", "sec", "s"),
    "m": ("minutes", "minute", "mins", "min", "m"),
    "h": ("hours", "hour", "hrs", "hr", "h"),
    "d": ("days", "day", "d"),
    "w": ("weeks", "week", "w"),
}
_DURATION_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION_UNIT = {spelling: unit for unit, spellings in _DURATION_UNITS.items() for spelling in spellings}
# Longest spellings first, so "msec" is not read as "m" followed by garbage.
_DURATION_PART = re.compile(
    r"\s*(\d+(?:\.\d+)?)\s*(" + "|".join(sorted(map(re.escape, _DURATION_UNIT), key=len, reverse=True)) + r")(?![a-zµ])"
)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_SIZE_FACTORS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "p": 1000**5,
    "pb": 1000**5,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
    "pi": 1024**5,
    "pib": 1024**5,
}


def parse_duration(value: object) -> float:
    """Return seconds for a duration given as a number or a string like ``5m``."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"invalid duration {value!r}: must not be negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"invalid duration {value!r}")
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if seconds < 0:
            raise ValueError(f"invalid duration {value!r}: must not be negative")
        return seconds
    pos = 0
    total = 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_SECONDS[_DURATION_UNIT[match.group(2)]]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"invalid duration {value!r} (use e.g. 30s, 5m, 2h or plain seconds)")
    return total


def parse_size(value: object) -> int:
    """Return bytes for a size given as a number or a string like ``50MB`` or ``4MiB``."""
    if isinstance(value, bool):
        raise ValueError(f"invalid size {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"invalid size {value!r}: must not be negative")
        return value
    if not isinstance(value, str):
        raise ValueError(f"invalid size {value!r}")
    match = _SIZE.match(value)
    factor = _SIZE_FACTORS.get(match.group(2).lower()) if match else None
    if match is None or factor is None:
        raise ValueError(f"invalid size {value!r} (use e.g. 50MB, 4MiB or plain bytes)")
    return int(float(match.group(1)) * factor)


def format_size(n: int) -> str:
    """Render bytes for people: ``1.5 MiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
