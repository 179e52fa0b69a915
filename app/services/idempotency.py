"""Idempotency-Key: the first response of a create is stored with the change it made, and replayed.

The key row is inserted in the request's own transaction, so the unique key itself serializes
concurrent repeats: a second request with the same key waits for the first to commit, then replays it.
If the first request fails, its transaction (key row included) rolls back and the key is free again.
Keys are per subject; a stored response is replayed only to the token it was sent to (docs/security.md).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import FieldError, IdempotencyKeyReused, InvalidInput
from app.models import IdempotencyRecord
from app.models.base import utc_now
from app.services.sweeps import Sweep
from app.settings import Settings

__all__ = ["KEEP_FOR", "KEY_PATTERN", "IdempotencyExpiry", "Stored", "claim", "complete", "request_fingerprint"]

KEEP_FOR = timedelta(hours=24)
# 1 to 255 printable Latin-1 characters (what an HTTP header carries), neither starting nor ending with a space (HTTP
# strips those: " k" arrives as "k"). The contract declares it; `claim` enforces it.
_PRINTABLE = r"\x21-\x7e\xa1-\xac\xae-\xff"
KEY_PATTERN = rf"^[{_PRINTABLE}]([ {_PRINTABLE}]{{0,253}}[{_PRINTABLE}])?$"
_KEY = re.compile(KEY_PATTERN)
_t = IdempotencyRecord.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Stored:
    status_code: int
    body: Any
    headers: dict[str, str]


def request_fingerprint(method: str, path: str, body: bytes) -> str:
    """Same JSON (whatever its spacing or key order) → same fingerprint."""
    try:
        canonical = json.dumps(json.loads(body or b"null"), sort_keys=True, separators=(",", ":")).encode()
    except ValueError:
        canonical = body
    return hashlib.sha256(method.encode() + b" " + path.encode() + b"\n" + canonical).hexdigest()


async def claim(
    session: AsyncSession, *, subject: str, token_id: str, key: str, method: str, path: str, fingerprint: str
) -> Stored | None:
    """None: go ahead (the key is ours now). Stored: replay it. Raises if the key served another request, or
    another token: a stored response is replayed only to the token it was sent to, which could receive it (its
    masking and scopes are the same); any other token, even of the same subject, gets a 422 and nothing of it."""
    if not _KEY.fullmatch(key):
        raise InvalidInput.one("Idempotency-Key", "1 to 255 printable characters", "invalid_idempotency_key")
    now = utc_now()
    values = {"subject": subject, "key": key, "token_id": token_id, "method": method, "path": path,
              "request_hash": fingerprint, "created_at": now}
    where = and_(_t.c.subject == subject, _t.c.key == key)
    for _attempt in range(3):
        claimed = await session.execute(insert(_t).values(values).on_conflict_do_nothing().returning(_t.c.key))
        if claimed.first() is not None:
            return None
        existing = (await session.execute(select(_t).where(where).with_for_update())).mappings().first()
        if existing is not None:
            break
        # Deleted between the conflict and the lock (expired by the sweep, or forgotten with the person it named by
        # an erasure): the key is free again, as for a request arriving a moment later.
    else:
        raise RuntimeError("an Idempotency-Key row kept vanishing between its conflict and its lock")
    if existing["created_at"] < now - KEEP_FOR:  # expired: the key starts a new life
        await session.execute(update(_t).where(where).values(values | {"status_code": None, "response_body": None}))
        return None
    if existing["token_id"] != token_id:
        raise IdempotencyKeyReused(FieldError(
            "Idempotency-Key", "already used by another token: its response is replayed only to that token",
            "idempotency_key_other_token"))
    if existing["request_hash"] != fingerprint:
        raise IdempotencyKeyReused(
            FieldError("Idempotency-Key", "already used with another request body or path", "idempotency_key_reused")
        )
    return Stored(existing["status_code"], existing["response_body"], existing["response_headers"] or {})


async def complete(
    session: AsyncSession, *, subject: str, key: str, status_code: int, body: Any, headers: dict[str, str]
) -> None:
    await session.execute(
        update(_t)
        .where(and_(_t.c.subject == subject, _t.c.key == key))
        .values(status_code=status_code, response_body=body, response_headers=headers)
    )


class IdempotencyExpiry(Sweep):
    """Stored responses (a create's body names the person) are deleted once they can no longer be replayed
    (`KEEP_FOR`): kept, they would be personal data with no purpose left."""

    statement = text("""
        DELETE FROM idempotency_record WHERE (subject, key) IN (
            SELECT subject, key FROM idempotency_record WHERE created_at < now() - make_interval(secs => :seconds)
            LIMIT :limit)
    """)

    def params(self, settings: Settings) -> dict[str, Any]:
        return {"seconds": KEEP_FOR.total_seconds()}

