"""Shared column helpers for the table models."""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime

from sqlalchemy import DateTime

__all__ = ["TZ", "new_id", "utc_now"]

TZ = DateTime(timezone=True)

_VERSION_7 = 0x7 << 76
_VARIANT_RFC = 0x2 << 62
_KEEP_RANDOM = ~(0xF << 76) & ~(0x3 << 62)


def new_id() -> uuid.UUID:
    """A UUIDv7 (RFC 9562): Unix milliseconds, then 74 random bits.

    Ids made later sort later, so the primary key and every `(…, id)` index grow at their right edge
    instead of each insert landing on a random page (docs/performance.md "Import"). Unguessable like a
    v4, but an id tells when it was made: never use one as a secret (tokens have their own random values).
    """
    random_bits = int.from_bytes(os.urandom(10)) & _KEEP_RANDOM
    return uuid.UUID(int=(time.time_ns() // 1_000_000) << 80 | random_bits | _VERSION_7 | _VARIANT_RFC)


def utc_now() -> datetime:
    return datetime.now(UTC)
