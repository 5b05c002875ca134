"""Token buckets per client IP and per API key: a burst of N, refilled at N per period.

Limits are written `N/period` (`120/minute`, `5/min`, `2/s`, `1000/hour`); `0` turns a limit
off. A refused request gets 429 with `Retry-After` (seconds until one token is back).
"""

from __future__ import annotations

import math
import re
import time
from collections import OrderedDict
from dataclasses import dataclass

_PERIODS = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
}
_RATE = re.compile(r"^\s*(\d{1,7})\s*(?:/\s*([a-z]+?)s?)?\s*$")


@dataclass(frozen=True)
class Rate:
    """`count` requests per `period` seconds; count 0 means unlimited."""

    count: int
    period: float

    @property
    def unlimited(self) -> bool:
        return self.count == 0

    def __str__(self) -> str:
        if self.unlimited:
            return "0"
        unit = {1.0: "second", 60.0: "minute", 3600.0: "hour", 86400.0: "day"}
        return f"{self.count}/{unit.get(self.period, f'{self.period:g}s')}"


def parse_rate(text: str) -> Rate:
    """Parse `120/minute` (also `/min`, `/m`, `/second`, `/hour`, `/day`) or `0` (off)."""
    match = _RATE.match(text.lower())
    if not match:
        raise ValueError(f"expected a rate such as 120/minute, 5/min or 0 (off), got {text!r}")
    count, unit = int(match.group(1)), match.group(2)
    if count == 0 and unit is None:
        return Rate(0, 1.0)
    if unit is None or unit not in _PERIODS:
        raise ValueError(f"expected a rate such as 120/minute (second, minute, hour), got {text!r}")
    return Rate(count, _PERIODS[unit])


class RateLimiter:
    """Independent token buckets by key (an IP, `key:<id>`, ...), oldest forgotten first."""

    def __init__(self, rate: Rate, max_keys: int = 10_000) -> None:
        self.rate = rate
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def hit(self, key: str, now: float | None = None) -> int | None:
        """Take one token: None when allowed, else the seconds to wait (for Retry-After)."""
        if self.rate.unlimited:
            return None
        now = time.monotonic() if now is None else now
        capacity = float(self.rate.count)
        per_second = self.rate.count / self.rate.period
        tokens, last = self._buckets.pop(key, (capacity, now))
        tokens = min(capacity, tokens + (now - last) * per_second)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            self._forget_oldest()
            return None
        self._buckets[key] = (tokens, now)
        return max(1, math.ceil((1.0 - tokens) / per_second))

    def reset(self, key: str) -> None:
        self._buckets.pop(key, None)

    def _forget_oldest(self) -> None:
        # a full bucket and a forgotten one behave the same; forget least recently used first
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
