"""Units a user types for the cost model: ``--bandwidth 1Gbps`` / ``100Mbit`` / ``1GB/s`` and ``--rtt 1ms``.

A string always needs its unit (a bare ``10`` once meant bit/s beside an RTT whose bare ``1`` meant
ms); a Python number is taken in bit/s and seconds.
"""

from __future__ import annotations

import re

from ..errors import DeepShareError

__all__ = ["parse_bandwidth", "parse_duration"]

_BW_UNITS = {"bps": 1, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9, "tbps": 1e12,
             "bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
             "b/s": 8, "kb/s": 8e3, "mb/s": 8e6, "gb/s": 8e9}  # fmt: skip
_TIME_UNITS = {"s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_bandwidth(text: str | float) -> float:
    """'1Gbps' / '100Mbit' / '1.5 GB/s' -> bits per second; a Python number is taken as bits per second.

    A string needs its unit: a bare '10' used to mean 10 bit/s beside an --rtt whose bare
    '1' meant 1 ms, so neither is guessed any more.
    """
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([a-zA-Z/]*)\s*", text)
    unit = m.group(2).lower().removesuffix("/s") if m and m.group(2).lower().endswith("bit/s") else (
        m.group(2).lower() if m else None)  # fmt: skip
    if m and unit == "":
        raise DeepShareError(f"--bandwidth {text!r} needs a unit: {m.group(1)}Mbps, {m.group(1)}Gbps "
                             f"(bits per second) or {m.group(1)}MB/s (bytes)")  # fmt: skip
    if not m or unit not in _BW_UNITS or float(m.group(1)) <= 0:
        raise DeepShareError(f"--bandwidth {text!r} is not a bandwidth like 1Gbps, 100Mbit or 1GB/s")
    return float(m.group(1)) * _BW_UNITS[unit]


def parse_duration(text: str | float) -> float:
    """'1ms' / '0.5ms' / '20us' / '0.001s' -> seconds; a Python number is taken as seconds (a string needs a unit)."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([a-zA-Zµ]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if m and unit == "":
        raise DeepShareError(f"--rtt {text!r} needs a unit: {m.group(1)}ms, {m.group(1)}us or {m.group(1)}s")
    if not m or unit not in _TIME_UNITS:
        raise DeepShareError(f"--rtt {text!r} is not a duration like 1ms, 20us or 0.01s")
    return float(m.group(1)) * _TIME_UNITS[unit]
