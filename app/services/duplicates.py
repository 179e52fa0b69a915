"""Duplicate candidates: pairs of contacts that are probably one person, each with the reasons why.

Reasons (docs/api.md "Duplicate candidates"):

- `phone`: the same E.164 phone (phones are stored normalized);
- `name_postal_code`: the same first and last name, case, accents and separators folded, and the same
  postal code (spaces ignored) — `carnet_name_key(...)`, stored as `contact.name_key`;
- `email`: the same mailbox after the provider's rules (Gmail/Googlemail ignore dots and `+tag`; Outlook,
  Hotmail, Live, MSN, iCloud, Proton, Fastmail and Yandex ignore `+tag`) — `carnet_email_key(email)`, stored
  as `contact.email_key`.

Each rule is a key column with an index (`ix_contact_phone`, and the two of migration 0028). A page walks the
chosen rules in turn, and each rule's keys in index order from where the last page stopped, keeping only the
keys two contacts or more hold: an index-only scan, so a file where duplicates are rare costs one read of
each index over all its pages (~0.65 s per million keys), not an index probe per contact (~30 µs each, which
ran a million contacts into the statement timeout). The pairs of a key are listed by (first id, second id). A
pair that several chosen rules match is listed once, under the first of them (in the order of `Reason`'s
values), with every chosen rule that matches it as its reasons. The cursor holds (rule, key, first id, second
id), encrypted as every cursor; a key too long for a cursor is left out and read again from the pair's first
contact (if it changed meanwhile, the cursor is a 422).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import InvalidInput
from app.models import Contact
from app.services.pagination import Cursor, CursorCodec

__all__ = ["KEYS_MARKER", "DuplicatePair", "Reason", "candidates_page"]

_t = Contact.__table__  # type: ignore[attr-defined]

Row = Mapping[str, Any]


class Reason(StrEnum):
    PHONE = "phone"
    NAME_POSTAL_CODE = "name_postal_code"
    EMAIL = "email"


_KEY_COLUMN: dict[Reason, str] = {Reason.PHONE: "phone", Reason.NAME_POSTAL_CODE: "name_key",
                                  Reason.EMAIL: "email_key"}
KEYS_MARKER = "HAVING count(*) > 1"  # tests/test_index_budget.py finds the keys query by it
# A key travels in the cursor when its JSON is at most this many bytes of UTF-8, so that the cursor stays
# well within the 2,048 characters a `cursor` parameter may have (a name key folds up to ~530 characters, 2-4 bytes each
# when not ASCII).
_CURSOR_KEY_BYTES = 400


@dataclass(frozen=True, slots=True)
class DuplicatePair:
    first: Row            # the contact with the smaller id
    second: Row
    reasons: list[str]    # sorted


@dataclass(frozen=True, slots=True)
class _Position:
    """Where a page starts: within `rule`, after `key` whole (first is None), or after the pair (first, second)."""

    rule: int
    key: str | None = None
    first: uuid.UUID | None = None
    second: uuid.UUID | None = None
    digest: str | None = None   # a cursor without its key (too long): the key's digest, to tell it is unchanged


@dataclass(frozen=True, slots=True)
class _Found:
    rule: int
    key: str
    first: uuid.UUID
    second: uuid.UUID
    reasons: list[str]


async def candidates_page(
    session: AsyncSession,
    *,
    reasons: Sequence[Reason],
    limit: int,
    cursor: str | None,
    codec: CursorCodec,
) -> tuple[list[DuplicatePair], str | None]:
    """One keyset page of candidate pairs; `reasons` narrows the rules."""
    chosen = sorted(set(reasons) or set(Reason))
    sort = "duplicates:" + ",".join(chosen)  # a cursor is only valid for the rules it was issued for
    start = _Position(0)
    if cursor:
        start = _position(codec.decode(cursor, sort=sort), len(chosen))
        if start.digest is not None:  # a key too long to travel: the first contact of the pair still holds it
            start = await _key_of_first(session, _KEY_COLUMN[chosen[start.rule]], start)
    found = [pair async for pair in _pairs(session, chosen, start, want=limit + 1)]
    next_cursor = None
    if len(found) > limit:
        found = found[:limit]
        last = found[-1]
        value: list[Any] = [last.rule, last.key, str(last.first)]
        if len(json.dumps(last.key, ensure_ascii=False).encode()) > _CURSOR_KEY_BYTES:
            value = [last.rule, None, str(last.first), _digest(last.key)]
        next_cursor = codec.encode(Cursor(sort, value, str(last.second)))
    ids = {p.first for p in found} | {p.second for p in found}
    contacts = {}
    if ids:
        rows = await session.execute(select(*_t.c).where(_t.c.id.in_(ids)))
        contacts = {r["id"]: r for r in rows.mappings()}
    # a pair whose contact was merged or erased between the statements above is left out, not a KeyError
    return [DuplicatePair(contacts[p.first], contacts[p.second], p.reasons) for p in found
            if p.first in contacts and p.second in contacts], next_cursor


async def _pairs(
    session: AsyncSession, chosen: Sequence[Reason], start: _Position, *, want: int
) -> AsyncIterator[_Found]:
    """Up to `want` pairs from `start` on, rule after rule, each rule's keys in index order."""
    given = 0
    position = start
    while position.rule < len(chosen) and given < want:
        column = _KEY_COLUMN[chosen[position.rule]]
        keys = await _shared_keys(session, column, position, count=want - given)
        if not keys:
            position = _Position(position.rule + 1)
            continue
        members = await _holders(session, column, keys)
        for key in keys:
            for pair in _key_pairs(chosen, position, key, members.get(key, [])):
                yield pair
                given += 1
                if given == want:
                    return
        position = _Position(position.rule, keys[-1])  # every pair of these keys was given


async def _shared_keys(session: AsyncSession, column: str, position: _Position, *, count: int) -> list[str]:
    """The next `count` keys of this rule held by two contacts or more, in index order (the index alone)."""
    if position.key is None:
        after = ""
    elif position.first is None:
        after = f"AND {column} > :key"
    else:
        after = f"AND {column} >= :key"
    statement = text(f"""
        SELECT {column} AS key FROM contact WHERE {column} IS NOT NULL {after}
        GROUP BY {column} {KEYS_MARKER} ORDER BY {column} LIMIT :count
    """)  # noqa: S608 (a column name from _KEY_COLUMN; values are bound parameters)
    params: dict[str, Any] = {"count": count}
    if position.key is not None:
        params["key"] = position.key
    return [row[0] for row in await session.execute(statement, params)]


async def _holders(session: AsyncSession, column: str, keys: list[str]) -> dict[str, list[Row]]:
    """The contacts holding these keys, by key, in id order, with every rule's key to tell the reasons."""
    statement = text(f"""
        SELECT {column} AS key, id, {", ".join(_KEY_COLUMN.values())} FROM contact
        WHERE {column} = ANY(:keys) ORDER BY {column}, id
    """)  # noqa: S608 (column names from _KEY_COLUMN)
    holders: dict[str, list[Row]] = {}
    for row in (await session.execute(statement, {"keys": keys})).mappings():
        holders.setdefault(row["key"], []).append(row)
    return holders


def _key_pairs(chosen: Sequence[Reason], position: _Position, key: str, holders: list[Row]) -> Iterator[_Found]:
    """The pairs of one key in (first id, second id) order, after the position, each under its first rule."""
    resume = position.key == key and position.first is not None
    earlier = chosen[:position.rule]
    for i, first in enumerate(holders):
        if resume and first["id"] < position.first:  # type: ignore[operator]
            continue
        for second in holders[i + 1:]:
            if resume and (first["id"], second["id"]) <= (position.first, position.second):
                continue
            if any(_matches(rule, first, second) for rule in earlier):
                continue  # listed under that earlier rule
            yield _Found(position.rule, key, first["id"], second["id"],
                         [rule.value for rule in chosen if _matches(rule, first, second)])


def _matches(rule: Reason, a: Row, b: Row) -> bool:
    column = _KEY_COLUMN[rule]
    return a[column] is not None and a[column] == b[column]


def _position(cursor: Cursor, rules: int) -> _Position:
    """[rule, key, first] as issued, or [rule, None, first, the key's digest] for a key too long to travel."""
    try:
        rule, key, first, *rest = cursor.value
        digest = rest[0] if rest else None
        if not (isinstance(rule, int) and 0 <= rule < rules and isinstance(key or digest, str)):
            raise ValueError(rule)
        return _Position(rule, key, uuid.UUID(str(first)), uuid.UUID(str(cursor.id)), digest)
    except (TypeError, ValueError):
        raise InvalidInput.one("cursor", "not a cursor issued by this server", "invalid_cursor") from None


async def _key_of_first(session: AsyncSession, column: str, position: _Position) -> _Position:
    """The position of a cursor issued without its key: the key its pair's first contact holds, if unchanged."""
    statement = text(f"SELECT {column} FROM contact WHERE id = :id")  # noqa: S608 (a column from _KEY_COLUMN)
    key = (await session.execute(statement, {"id": position.first})).scalar()
    if key is None or _digest(key) != position.digest:  # merged, erased or changed since: the place is lost
        raise InvalidInput.one("cursor", "the pair this page ended at has changed since: start again without a cursor",
                               "invalid_cursor")
    return _Position(position.rule, key, position.first, position.second)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]
