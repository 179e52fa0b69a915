"""Ids and keyed digests: tiny, dependency-free helpers.

They live apart from app.models so that the import's validating processes (spawned, one per core) can
make contact ids and suppression digests without importing SQLAlchemy, FastAPI and every table model:
that import alone was ~85 MB of each process's memory (docs/performance.md, "Import").
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
import uuid

__all__ = ["keyed_digest", "new_id", "new_id_text"]

_VERSION_7 = 0x7 << 76
_VARIANT_RFC = 0x2 << 62
_KEEP_RANDOM = ~(0xF << 76) & ~(0x3 << 62)


def new_id() -> uuid.UUID:
    """A UUIDv7 (RFC 9562): Unix milliseconds, then 74 random bits.

    Ids made later sort later, so the primary key and every `(…, id)` index grow at their right edge
    instead of each insert landing on a random page (docs/performance.md "Import"). Unguessable like a
    v4, but an id tells when it was made: never use one as a secret (tokens have their own random values).
    """
    return uuid.UUID(int=_new_id_int())


def new_id_text() -> str:
    """`str(new_id())` without the UUID object: 3.5-4.4 µs instead of 5.2-6.8 (the import makes one per row)."""
    h = f"{_new_id_int():032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _new_id_int() -> int:
    random_bits = int.from_bytes(os.urandom(10)) & _KEEP_RANDOM
    return (time.time_ns() // 1_000_000) << 80 | random_bits | _VERSION_7 | _VARIANT_RFC


def keyed_digest(key: bytes, kind: str, value: str) -> str:
    """HMAC-SHA256 of `kind:value`: how the suppression list keeps an erased person's email or phone."""
    return hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()
