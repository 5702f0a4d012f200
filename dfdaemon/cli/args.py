"""Argument types the CLIs share: human sizes and durations, checked before anything is sent."""

from __future__ import annotations

import argparse
import math

from dfdaemon.units import MAX_DURATION_SECONDS, parse_duration, parse_size


def positive_duration(text: str) -> float:
    """Seconds from ``30s``/``5m``/``2h``/plain seconds; zero would expire at once."""
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be positive")
    if seconds > MAX_DURATION_SECONDS:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be at most 100 years")
    return seconds


def positive_size(text: str) -> int:
    """Bytes from ``4MiB``-style sizes; zero would make every piece empty."""
    try:
        size = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be positive")
    if size >= 2**64:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must fit 64 bits")
    return size
