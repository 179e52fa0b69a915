"""Per-token rate limiting: a token bucket per token id, in this process."""

from __future__ import annotations

import math
import time

__all__ = ["TokenBuckets"]


class TokenBuckets:
    """`rate` requests per second on average, bursts up to `burst`; `take` returns the wait if refused."""

    def __init__(self, *, rate: float, burst: int, max_keys: int = 100_000) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> int | None:
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return max(1, math.ceil((1 - tokens) / self.rate))
        if len(self._buckets) >= self.max_keys and key not in self._buckets:
            self._buckets.clear()  # bounded memory; a reset only ever lets requests through
        self._buckets[key] = (tokens - 1, now)
        return None
