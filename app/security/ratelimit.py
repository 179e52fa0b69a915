"""Rate limiting in this process: token buckets per token id, and the public signup's limits."""

from __future__ import annotations

import hashlib
import ipaddress
import math
import time
import uuid

__all__ = ["SignupLimits", "TokenBuckets", "client_key"]


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


class SignupLimits:
    """Public signups (no token to count by): per client address and per list, answered 429 + Retry-After; and
    per address signed up, silently (at most two confirmation emails per address and list in ten minutes, so
    the form cannot be used to flood someone's inbox, and a refusal tells nothing about the address)."""

    def __init__(self, *, ip_per_minute: float, ip_burst: int, list_per_minute: float, list_burst: int) -> None:
        self.per_ip = TokenBuckets(rate=ip_per_minute / 60, burst=ip_burst)
        self.per_list = TokenBuckets(rate=list_per_minute / 60, burst=list_burst)
        self.per_address = TokenBuckets(rate=1 / 300, burst=2)

    def client_wait(self, address: str | None) -> int | None:
        """Take from the client's bucket (`client_key`); the wait in seconds if refused."""
        return self.per_ip.take(client_key(address))

    def address_allows(self, list_id: uuid.UUID, email: str) -> bool:
        key = hashlib.sha256(f"{list_id}:{email}".encode()).hexdigest()[:32]  # no address kept, even in memory
        return self.per_address.take(key) is None


def client_key(address: str | None) -> str:
    """The bucket a client address counts in: an IPv4 address alone, an IPv6 one by its /64. One subscriber's line
    gets a /64 (or more) and a host may pick any of its 2^64 addresses, so counting each one alone would let a
    single client make its own fresh bucket for every request."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return address or "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
