"""Opaque keyset cursors: `(sort value, id)` of the last row of a page, encrypted and authenticated."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import ColumnElement, Select
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import InvalidInput

__all__ = ["Cursor", "CursorCodec", "page_by_name"]

_NONCE_BYTES = 12


@dataclass(frozen=True, slots=True)
class Cursor:
    sort: str
    value: Any
    id: str


class CursorCodec:
    """AES-GCM over the cursor: a forged or edited one is a clean 422, never a query on attacker values, and
    the sort value inside (a last name, an email) is unreadable to a caller whose token masks personal data."""

    def __init__(self, secret: str) -> None:
        self._aead = AESGCM(hashlib.sha256(b"carnet-cursor:" + secret.encode()).digest())

    def encode(self, cursor: Cursor) -> str:
        # UTF-8, not \u escapes: a non-ASCII sort value (a Cyrillic last name) takes 2-3 bytes a letter, not 6
        payload = json.dumps([cursor.sort, cursor.value, cursor.id], separators=(",", ":"), ensure_ascii=False).encode()
        nonce = os.urandom(_NONCE_BYTES)
        return base64.urlsafe_b64encode(nonce + self._aead.encrypt(nonce, payload, None)).decode().rstrip("=")

    def decode(self, token: str, *, sort: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            payload = self._aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], None)
            sort_name, value, row_id = json.loads(payload)
        except (ValueError, TypeError, InvalidTag) as exc:
            raise InvalidInput.one("cursor", "not a cursor issued by this server", "invalid_cursor") from exc
        if sort_name != sort:
            raise InvalidInput.one("cursor", "this cursor belongs to another sort order", "invalid_cursor")
        return Cursor(sort_name, value, row_id)


async def page_by_name(
    session: AsyncSession, query: Select[Any], name: ColumnElement[str], *, sort: str, limit: int,
    cursor: str | None, codec: CursorCodec,
) -> tuple[list[Mapping[str, Any]], str | None]:
    """A page of rows by a unique `name` column (lists, segments, destinations): keyset on the name."""
    if cursor:
        query = query.where(name > codec.decode(cursor, sort=sort).value)
    rows = list((await session.execute(query.order_by(name).limit(limit + 1))).mappings())
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    return rows[:limit], codec.encode(Cursor(sort, last["name"], str(last["id"])))
