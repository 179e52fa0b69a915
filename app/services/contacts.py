"""Contacts: create, upsert, batch, read, search, merge-patch, tags — with field-level history.

Hot paths use SQLAlchemy Core and read `.mappings()`: a row mapping goes straight to the presenter.
The unique indexes on email and external_id are the only duplicate guard (no check-then-insert race):
inserts use `ON CONFLICT DO NOTHING` and a missing RETURNING row means "someone holds the key".

The unique index on email is also what serializes a write with the erasure of that address: a write giving a
contact the email of a person being erased waits on the index until the erasure commits, then goes through. So
the suppression list is checked after the write, in the same transaction (`_refuse_suppressed`), where that
erasure's suppression entry is visible; a check before would have read the list too early.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import phonenumbers
from pydantic_core import to_json
from sqlalchemy import ColumnElement, and_, exists, func, literal, literal_column, or_, select, tuple_
from sqlalchemy import update as update_statement
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import driver_connection, is_unique_violation
from app.errors import ContactNotFound, DuplicateContact, InvalidInput, PreconditionFailed
from app.models import Contact, ListMembership
from app.models.base import new_id, utc_now
from app.models.contacts import off_default, tagged
from app.schemas.contacts import ContactCreate, ContactPatch, ContactSort, ContactUpsert
from app.schemas.types import normalize_phone
from app.security import Principal
from app.services import attributes as attributes_service
from app.services import history, locks, outbox, suppressions
from app.services import tags as tags_service
from app.services.pagination import Cursor, CursorCodec

__all__ = [
    "ContactFilters",
    "Upserted",
    "add_tag",
    "create",
    "fast_upsert",
    "get",
    "get_fast",
    "list_page",
    "lock_batch",
    "remove_tag",
    "set_delivery_facts",
    "update",
    "upsert",
]

_t = Contact.__table__  # type: ignore[attr-defined]
_members = ListMembership.__table__  # type: ignore[attr-defined]
_ALL = tuple(_t.c)
_SIMPLE = (
    "external_id", "email", "phone", "first_name", "last_name", "company", "job_title", "sector", "gender",
    "birth_date", "language", "source", "first_contact_at", "first_contact_channel", "kind",
)
ADDRESS = {"line1": "address_line1", "line2": "address_line2", "postal_code": "postal_code", "city": "city",
           "region": "region", "country": "country"}
_KEYS = ("email", "external_id", "phone")
_MISSING: Any = object()

Row = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Upserted:
    row: Row
    created: bool


# ---- use cases -------------------------------------------------------------------------------------------


async def get(session: AsyncSession, contact_id: uuid.UUID) -> Row:
    row = (await session.execute(select(*_ALL).where(_t.c.id == contact_id))).mappings().first()
    if row is None:
        raise ContactNotFound(f"no contact with id {contact_id}")
    return row


# The hot read, as plain SQL built once from the table definition (asyncpg prepares and caches it).
_COLUMN_LIST = ", ".join(f'"{column.name}"' for column in _ALL)
_GET_SQL = f"SELECT {_COLUMN_LIST} FROM contact WHERE id = $1"  # noqa: S608 (column names from our own table)


async def get_fast(connection: asyncpg.Connection, contact_id: uuid.UUID) -> Row:
    """`get` on a bare asyncpg connection: one round trip, no transaction (see app.db.BareConnection)."""
    row = await connection.fetchrow(_GET_SQL, contact_id)
    if row is None:
        raise ContactNotFound(f"no contact with id {contact_id}")
    return row  # type: ignore[no-any-return]  # asyncpg.Record is a read-only mapping


# ---- the upsert in autocommit: one statement, two for a changed contact ---------------------------------------
#
# On the bare connection without BEGIN/COMMIT, each statement is its own transaction: the contact, its history rows
# and its outbox row are written together or not at all. The first statement matches by either key and inserts a new
# contact; only when it found the contact and the payload changes it does a second one update it, the changes computed
# in SQL from the row it matches then, applied only if that contact is still at the version it read. One statement for
# both outcomes was measured slower: PostgreSQL sets up every part of a statement each time it runs it, the parts that
# write nothing included, and the update's (`contact`'s generated key columns and indexes, history, outbox) cost
# ~160 µs of database CPU on each creation (~700 → ~520 µs: docs/performance.md, "(c) Fourth pass"), more than the
# round trip it saved on a changed contact. Whenever a statement cannot tell the whole story (a key taken meanwhile or
# held by another contact, a suppressed address, a moved version), it writes nothing and `fast_upsert` answers None:
# the caller then runs `upsert`, which locks, decides and explains. A creation's history is one entry naming the
# fields set (`_creation`); an update's rows are built in SQL (to_jsonb of the old and new columns, timestamps written
# as `datetime.isoformat` writes them, a JSON null there is SQL NULL, as history.record stores None).
# tests/test_fastpath.py checks that both paths write the same rows.

# What SQLAlchemy's insert adds for the columns a create leaves out (the model's scalar defaults: kind, version, ...);
# the server's own defaults give the rest.
_SCALAR_DEFAULTS = {c.name: c.default.arg for c in _ALL if c.default is not None and c.default.is_scalar}
_WIRE_FIELD = {column: f"address.{name}" for name, column in ADDRESS.items()}
_TIMESTAMPS = frozenset(c.name for c in _ALL if getattr(c.type, "timezone", False))
_MATCHED = f"SELECT {_COLUMN_LIST} FROM contact WHERE external_id = $1 OR email = $2"  # noqa: S608 (our names)


@functools.lru_cache(maxsize=256)  # one text per set of columns inserted
def _fast_create_sql(inserted: tuple[str, ...]) -> str:
    """Match by either key, else insert these columns with the creation's history entry and outbox row.
    $1..$7: the keys, the suppression digests' kinds and digests, the creation entry's value, the actor, via; then
    the columns.

    Rows out: ('created', the new row) or ('matched', each contact holding a key).
    A key taken by another writer since the statement's snapshot is a unique violation, and nothing is written: a
    plain INSERT, because `ON CONFLICT DO NOTHING` would probe the three unique indexes before every insertion to
    spare that rare error.
    """
    params = ", ".join(f"${i}" for i in range(8, 8 + len(inserted)))
    guard = _GUARD.format(kinds="$3", digests="$4") if _ADDRESSES.intersection(inserted) else ""
    names = ", ".join(f'"{name}"' for name in inserted)
    return f"""
WITH matched AS (
    {_MATCHED}
), new AS (
    INSERT INTO contact ({names})
    SELECT {params}
    WHERE NOT EXISTS (SELECT 1 FROM matched) AND NOT EXISTS ({_SUPPRESSED.format(kinds="$3", digests="$4")})
    RETURNING {_COLUMN_LIST}
), history AS (
    INSERT INTO contact_history (contact_id, field, old_value, new_value, subject, via, at)
    SELECT new.id, '{history.CREATED}', NULL, $5::jsonb, $6, $7, new.created_at FROM new
), announced AS (
    INSERT INTO outbox_message (topic, contact_id, payload, created_at)
    SELECT 'contact.created', new.id, jsonb_build_object('contact_id', new.id), new.created_at FROM new
)
SELECT 'created' AS outcome, {_COLUMN_LIST} FROM new {guard}
UNION ALL
SELECT 'matched', {_COLUMN_LIST} FROM matched
"""  # noqa: S608 (names from our own table; every value is a parameter)


@functools.lru_cache(maxsize=256)  # one text per set of columns given (and of those given a value)
def _fast_update_sql(given: tuple[str, ...], valued: tuple[str, ...]) -> str:
    """Apply the given columns to the one contact holding the keys, with one history row per changed field and the
    outbox row. $1..$5: the keys, the actor, via, the time of the write; then the `valued` columns (those given a
    value: the others are cleared); then, when an address is given, the suppression digests' kinds and digests.

    Rows out: ('matched', each contact holding a key), ('updated', the written row).
    The given columns always hold a key (ContactUpsert requires one), so none of the lists below is empty.
    """
    param = {name: f"${i}" for i, name in enumerate(valued, start=6)}
    value = {name: param.get(name, "NULL") for name in given}
    kinds, digests = f"${6 + len(valued)}", f"${7 + len(valued)}"  # passed only when an address is given
    flags = ", ".join(f'm."{c}" AS o_{c}, m."{c}" IS DISTINCT FROM {value[c]} AS d_{c}' for c in given)
    any_change = " OR ".join(f"d_{c}" for c in given)
    by_wire = sorted(given, key=lambda c: _WIRE_FIELD.get(c, c))  # history rows in _diff's order
    entries = ", ".join(
        f"({n}, '{_WIRE_FIELD.get(c, c)}', ch.d_{c}, {_json('ch.o_' + c, c)}, {_json('u.' + c, c)})"
        for n, c in enumerate(by_wire))
    fields = ", ".join(f"CASE WHEN ch.d_{c} THEN '{c}' END" for c in sorted(given))
    addresses = sorted(_ADDRESSES.intersection(given))
    changed_address = " OR ".join(f"(s.kind = '{c}' AND t.d_{c})" for c in addresses)
    suppressed = (f"AND NOT EXISTS ({_SUPPRESSED.format(kinds=kinds, digests=digests)} AND ({changed_address}))"
                  if addresses else "")
    # The check after the write, for the addresses the update changes (an unchanged one was checked when written).
    written = " OR ".join(f"(a.kind = '{c}' AND ch.d_{c})" for c in addresses)
    update_guard = (f"WHERE carnet_refuse_suppressed("  # noqa: S608 (our own names)
                    f"ARRAY(SELECT a.kind FROM unnest({kinds}::text[], {digests}::text[]) a(kind, digest) "
                    f"WHERE {written}), "
                    f"ARRAY(SELECT a.digest FROM unnest({kinds}::text[], {digests}::text[]) a(kind, digest) "
                    f"WHERE {written}))"
                    if addresses else "")
    assignments = ", ".join(f'"{c}" = {value[c]}' for c in given)
    returned = ", ".join(f'c."{column.name}"' for column in _ALL)
    return f"""
WITH matched AS (
    {_MATCHED}
), target AS (  -- _pick_match: the only holder of either key, by external_id, or by email if its own agrees
    SELECT m.id, m.version, {flags} FROM matched m
    WHERE (SELECT count(*) FROM matched) = 1 AND (m.external_id = $1 OR m.external_id IS NULL OR $1 IS NULL)
), changed AS (
    SELECT * FROM target t WHERE ({any_change}) {suppressed}
), updated AS (
    UPDATE contact c SET {assignments}, version = c.version + 1, updated_at = $5
    FROM changed ch WHERE c.id = ch.id AND c.version = ch.version
    RETURNING {returned}
), written_history AS (
    INSERT INTO contact_history (contact_id, field, old_value, new_value, subject, via, at)
    SELECT u.id, f.field, f.old, f.new, $3, $4, $5
    FROM updated u JOIN changed ch ON ch.id = u.id
    CROSS JOIN LATERAL (VALUES {entries}) AS f(n, field, changed, old, new)
    WHERE f.changed
    ORDER BY f.n
), written_announced AS (
    INSERT INTO outbox_message (topic, contact_id, payload, created_at)
    SELECT 'contact.updated', u.id, jsonb_build_object('contact_id', u.id, 'fields',
           to_jsonb(array_remove(ARRAY[{fields}]::text[], NULL))), $5
    FROM updated u JOIN changed ch ON ch.id = u.id
)
SELECT 'matched' AS outcome, {_COLUMN_LIST} FROM matched
UNION ALL
SELECT 'updated', u.* FROM updated u JOIN changed ch ON ch.id = u.id {update_guard}
"""  # noqa: S608 (names from our own table; every value is a parameter)


def _json(expression: str, column: str) -> str:
    """A column's value as history stores it (history.jsonable): timestamps as `datetime.isoformat` writes them."""
    if column not in _TIMESTAMPS:
        return f"to_jsonb({expression})"
    utc = f"({expression} AT TIME ZONE 'UTC')"
    return (f"to_jsonb(to_char({utc}, {_ISO_SECONDS}) || CASE WHEN date_trunc('second', {expression}) "
            f"= {expression} THEN '' ELSE to_char({utc}, '.US') END || '+00:00')")


_ISO_SECONDS = """'YYYY-MM-DD"T"HH24:MI:SS'"""
_SUPPRESSED = """SELECT 1 FROM suppression s WHERE s.released_at IS NULL
    AND (s.kind, s.digest) IN (SELECT * FROM unnest({kinds}::text[], {digests}::text[]))"""
# The check after the write (see the module docstring), inside the statement: the row is written before this filter
# reads it; the function reads the list with a fresh snapshot and raises SUPPRESSED_SQLSTATE, undoing the statement.
_GUARD = "WHERE carnet_refuse_suppressed({kinds}::text[], {digests}::text[])"
# The values the suppression list keeps (the column's name is the entry's kind): an erased person's customer number
# brings them back as surely as their address (docs/gdpr.md, "What suppression covers").
_ADDRESSES = frozenset({"email", "phone", "external_id"})


async def fast_upsert(
    connection: asyncpg.Connection, payload: ContactUpsert, *, actor: Principal, via: str = "api"
) -> Upserted | None:
    """`upsert` in one round trip (a new or unchanged contact) or two (a changed one); None: run `upsert` instead.

    Only for payloads without attributes or tags (those need definitions and the tag catalogue). None is
    answered only when nothing was written.
    """
    columns, attrs, tags = _columns_from(payload)
    if attrs is not _MISSING or tags is not _MISSING:
        return None
    values = _SCALAR_DEFAULTS | _row_values(columns, via=via)
    digests = suppressions.checked(email=values.get("email"), phone=values.get("phone"),  # the mailbox's too
                                   external_id=values.get("external_id"))
    _, _, created = _creation(values)
    rows = await _fast_statement(
        connection, _fast_create_sql(tuple(values)), payload.external_id, payload.email, *digests,
        to_json(created).decode(), actor.subject, via, *values.values(),
    )
    if rows is None:
        return None
    if rows and rows[0]["outcome"] == "created":
        return Upserted(rows[0], created=True)
    current = _pick_match(rows, payload.external_id, payload.email)
    if current is None:  # a suppressed address, or keys held by two contacts or by one whose other key disagrees
        return None
    if not _column_changes(current, columns):
        return Upserted(current, created=False)
    valued = tuple(c for c in columns if c in values)
    rows = await _fast_statement(
        connection, _fast_update_sql(tuple(columns), valued), payload.external_id, payload.email, actor.subject, via,
        values["updated_at"], *(values[c] for c in valued), *(digests if _ADDRESSES.intersection(columns) else ()),
    )
    if rows is None:
        return None
    updated = next((row for row in rows if row["outcome"] == "updated"), None)
    if updated is not None:
        return Upserted(updated, created=False)
    current = _pick_match(rows, payload.external_id, payload.email)
    if current is None or _column_changes(current, columns):  # a key taken meanwhile, or the update did not apply
        return None
    return Upserted(current, created=False)


async def _fast_statement(connection: asyncpg.Connection, sql: str, *args: Any) -> list[asyncpg.Record] | None:
    """One of fast_upsert's statements; None when it wrote nothing because of a writer it raced."""
    try:
        return await connection.fetch(sql, *args)  # type: ignore[no-any-return]
    except asyncpg.UniqueViolationError:  # a key taken by another writer after the statement's snapshot
        return None
    except asyncpg.PostgresError as exc:
        if exc.sqlstate != suppressions.SUPPRESSED_SQLSTATE:
            raise
        return None  # erased meanwhile: nothing was written, the transactional path explains


async def create(session: AsyncSession, payload: ContactCreate, *, actor: Principal, via: str = "api") -> Row:
    """Insert a contact, or raise DuplicateContact naming the contact that holds the email or external_id."""
    values = await _new_values(session, payload, via=via)
    row = await _insert(session, values)
    if row is None:
        raise DuplicateContact(
            "a contact already holds this email or external_id", existing_id=await _holder_id(session, values)
        )
    await _created(session, row, actor=actor, via=via)
    return row


async def upsert(session: AsyncSession, payload: ContactUpsert, *, actor: Principal, via: str = "api") -> Upserted:
    """Create or update, matched by external_id, else email.

    Scalars given replace stored ones (null clears), attributes merge by key, tags are only added:
    an upsert from a back office never removes what a marketer set.
    """
    for _attempt in range(3):
        current = await _match_for_update(session, payload.external_id, payload.email)
        if current is not None:
            changes = await _changes(session, current, payload, tags_mode="add")
            return Upserted(await _write(session, current, changes, actor=actor, via=via), created=False)
        values = await _new_values(session, payload, via=via)
        row = await _insert(session, values)
        if row is not None:
            await _created(session, row, actor=actor, via=via)
            return Upserted(row, created=True)
        # A concurrent request inserted the key between our lookup and insert: match again.
    keys = {"email": payload.email, "external_id": payload.external_id}
    raise DuplicateContact("the contact keys are held by another contact", existing_id=await _holder_id(session, keys))


async def lock_batch(session: AsyncSession, payloads: Sequence[ContactUpsert]) -> None:
    """Lock what a batch's items will write, before the first of them runs: the buckets of the keys no contact holds
    yet (`locks.lock_new_keys`: the contacts it creates are met in item order), then the contacts holding its keys,
    in id order (FOR UPDATE: an upsert may change keys). Each item then finds its contact locked already, and two
    batches naming the same contacts, existing or new, in another order queue on the first lock instead of each
    holding one the other waits for (services/locks.py)."""
    emails = sorted({p.email for p in payloads if p.email})
    external_ids = sorted({p.external_id for p in payloads if p.external_id})
    keys = [*([_t.c.email.in_(emails)] if emails else []),
            *([_t.c.external_id.in_(external_ids)] if external_ids else [])]
    if not keys:
        return
    await locks.lock_new_keys(await driver_connection(session), emails=emails, external_ids=external_ids)
    await locks.lock_contacts(session, await session.scalars(select(_t.c.id).where(or_(*keys))), key_change=True)


async def update(
    session: AsyncSession,
    contact_id: uuid.UUID,
    patch: ContactPatch,
    *,
    actor: Principal,
    expected_version: int | None = None,
    via: str = "api",
) -> Row:
    """JSON merge patch: absent fields untouched, null clears, attributes merge by key, tags replace."""
    current = await _lock(session, contact_id, expected_version)
    changes = await _changes(session, current, patch, tags_mode="replace")
    merged = {**current, **changes}
    if not any(merged.get(k) for k in _KEYS):
        raise InvalidInput.one("body", "a contact keeps at least one of email, phone or external_id",
                               "identifier_required")
    return await _write(session, current, changes, actor=actor, via=via)


async def add_tag(
    session: AsyncSession, contact_id: uuid.UUID, name: str, *, actor: Principal, expected_version: int | None = None
) -> Row:
    current = await _lock(session, contact_id, expected_version, key_change=False)
    if name in current["tags"]:
        return current
    await tags_service.ensure(session, [name])
    return await _write(session, current, {"tags": [*current["tags"], name]}, actor=actor, via="api")


async def remove_tag(
    session: AsyncSession, contact_id: uuid.UUID, name: str, *, actor: Principal, expected_version: int | None = None
) -> Row:
    current = await _lock(session, contact_id, expected_version, key_change=False)
    if name not in current["tags"]:
        return current
    return await _write(session, current, {"tags": [t for t in current["tags"] if t != name]}, actor=actor, via="api")


async def set_delivery_facts(
    session: AsyncSession, contact_id: uuid.UUID, *, actor: Principal, via: str, email_status: str | None = None,
    email: str | None = None,
) -> Row:
    """What an emailing tool tells us about an address (bounced, complained, changed by the person there).

    Not part of the public write model: `email_status` is Carnet's to set from such facts only.
    """
    current = await _lock(session, contact_id, key_change=email is not None)
    changes: dict[str, Any] = {}
    if email_status is not None and current["email_status"] != email_status:
        changes["email_status"] = email_status
    if email is not None and current["email"] != email:
        changes.update(email=email, email_status="unverified")
    row = await _write(session, current, changes, actor=actor, via=via)
    if row["email_status"] != current["email_status"]:  # not a wire-writable field, so _write's diff skips it
        await history.record(session, row["id"], [("email_status", current["email_status"], row["email_status"])],
                             actor=actor, via=via)
    return row


# ---- listing ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class ContactFilters:
    q: str | None = None
    email: str | None = None
    external_id: str | None = None
    tags: list[str] = field(default_factory=list)
    list_id: uuid.UUID | None = None
    kind: str | None = None
    lifecycle_stage: str | None = None
    city: str | None = None
    postal_code: str | None = None
    country: str | None = None
    created_after: datetime | None = None
    updated_after: datetime | None = None
    segment_condition: ColumnElement[bool] | None = None   # a compiled segment filter (app.services.segments)


# NULL sorts as 1970 (before any order; asyncpg maps year 1 to -infinity) so (expression, id) is a total order the
# keyset indexes serve.
NO_ORDER_YET = literal_column("'1970-01-01 00:00:00+00'::timestamptz")
_SORT_EXPR: dict[str, ColumnElement[Any]] = {
    "created_at": _t.c.created_at,
    "updated_at": _t.c.updated_at,
    # '' as a constant: a bound parameter would not match the index expression in a generic plan
    "last_name": func.coalesce(func.lower(_t.c.last_name), literal_column("''")),
    "last_order_at": func.coalesce(_t.c.last_order_at, NO_ORDER_YET),
}


async def list_page(
    session: AsyncSession,
    filters: ContactFilters,
    *,
    sort: ContactSort,
    limit: int,
    cursor: str | None,
    codec: CursorCodec,
) -> tuple[list[Row], str | None]:
    """One keyset page: rows after the cursor's (sort value, id), and the cursor of the next page."""
    descending = sort.value.startswith("-")
    key = sort.value.lstrip("-")
    expr = _SORT_EXPR[key]
    query = select(*_ALL, expr.label("_sort")).where(*_conditions(filters))
    if cursor:
        after = codec.decode(cursor, sort=sort.value)
        position = tuple_(expr, _t.c.id)
        bound = tuple_(literal(_cursor_value(key, after.value), type_=expr.type), literal(_uuid(after.id)))
        query = query.where(position < bound if descending else position > bound)
    order = (expr.desc(), _t.c.id.desc()) if descending else (expr.asc(), _t.c.id.asc())
    rows = list((await session.execute(query.order_by(*order).limit(limit + 1))).mappings())
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    token = codec.encode(Cursor(sort.value, _cursor_json(last["_sort"]), str(last["id"])))
    return rows[:limit], token


def _cursor_json(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _cursor_value(key: str, value: Any) -> Any:
    try:
        if not isinstance(value, str):
            raise ValueError
        return value if key == "last_name" else datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput.one("cursor", "not a cursor issued by this server", "invalid_cursor") from None


def _uuid(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidInput.one("cursor", "not a cursor issued by this server", "invalid_cursor") from None


def _conditions(f: ContactFilters) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if f.q:
        where.append(_search(f.q))
    if f.email is not None:
        where.append(_t.c.email == f.email)
    if f.external_id is not None:
        where.append(_t.c.external_id == f.external_id)
    if f.tags:
        where.append(tagged(_t.c.tags.contains(f.tags)))
    if f.list_id is not None:
        where.append(exists().where(and_(_members.c.contact_id == _t.c.id, _members.c.list_id == f.list_id,
                                         _members.c.status == "subscribed")))
    if f.kind is not None:
        where.append(and_(_t.c.kind == f.kind, off_default("kind", [f.kind])))
    if f.lifecycle_stage is not None:
        stage = _t.c.lifecycle_stage == f.lifecycle_stage
        where.append(and_(stage, off_default("lifecycle_stage", [f.lifecycle_stage])))
    if f.city is not None:
        where.append(func.lower(_t.c.city) == f.city.lower())
    if f.postal_code is not None:
        where.append(_t.c.postal_code == f.postal_code)
    if f.country is not None:
        where.append(_t.c.country == f.country)
    if f.created_after is not None:
        where.append(_t.c.created_at > f.created_after)
    if f.updated_after is not None:
        where.append(_t.c.updated_at > f.updated_after)
    if f.segment_condition is not None:
        where.append(f.segment_condition)
    return where


def _search(q: str) -> ColumnElement[bool]:
    """Every word must start one of last name, first name, company or email; or q is the phone number.

    Prefix matching is what `text_pattern_ops` indexes serve without pg_trgm.
    """
    words = q.lower().split()[:5]
    per_word = [
        or_(
            func.lower(_t.c.last_name).like(_prefix(w), escape="\\"),
            func.lower(_t.c.first_name).like(_prefix(w), escape="\\"),
            func.lower(_t.c.company).like(_prefix(w), escape="\\"),
            _t.c.email.like(_prefix(w), escape="\\"),
        )
        for w in words
    ]
    matched = and_(*per_word) if per_word else literal(False)
    phone = _as_phone(q)
    return or_(matched, _t.c.phone == phone) if phone else matched


def _prefix(word: str) -> str:
    return word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _as_phone(q: str) -> str | None:
    if sum(c.isdigit() for c in q) < 6:
        return None
    try:
        return normalize_phone(q)
    except (ValueError, phonenumbers.NumberParseException):
        return None


# ---- writing ---------------------------------------------------------------------------------------------


async def _new_values(session: AsyncSession, payload: ContactCreate | ContactUpsert, *, via: str) -> dict[str, Any]:
    columns, attrs, tags = _columns_from(payload)
    values = _row_values(columns, via=via)
    if attrs is not _MISSING and attrs:
        normalized = await attributes_service.normalize_values(session, attrs)
        values["attributes"] = {k: v for k, v in normalized.items() if v is not None}
    if tags is not _MISSING and tags:
        values["tags"] = list(dict.fromkeys(tags))
        await tags_service.ensure(session, values["tags"])
    return values


def _row_values(columns: Mapping[str, Any], *, via: str) -> dict[str, Any]:
    """The columns a new contact is inserted with; the server's defaults give the rest."""
    values = {k: v for k, v in columns.items() if v is not None}
    values.setdefault("source", via)  # how it entered: "api" unless a caller says otherwise
    now = utc_now()
    values.update(id=new_id(), created_at=now, updated_at=now)
    return values


async def _insert(session: AsyncSession, values: dict[str, Any]) -> Row | None:
    statement = insert(_t).values(values).on_conflict_do_nothing().returning(*_ALL)
    return (await session.execute(statement)).mappings().first()


async def _changes(
    session: AsyncSession, current: Row, payload: ContactUpsert | ContactPatch, *, tags_mode: str
) -> dict[str, Any]:
    """The column values that differ from `current` once the payload is applied."""
    columns, attrs, tags = _columns_from(payload)
    changes = _column_changes(current, columns)
    if attrs is not _MISSING:
        merged = dict(current["attributes"])
        for name, value in (await attributes_service.normalize_values(session, attrs or {})).items():
            if value is None:
                merged.pop(name, None)
            else:
                merged[name] = value
        if attrs is None:  # "attributes": null in a merge patch removes them all
            merged = {}
        if merged != current["attributes"]:
            changes["attributes"] = merged
    if tags is not _MISSING:
        wanted = list(dict.fromkeys(tags or []))
        new_tags = list(dict.fromkeys([*current["tags"], *wanted])) if tags_mode == "add" else wanted
        if new_tags != list(current["tags"]):
            await tags_service.ensure(session, [t for t in new_tags if t not in current["tags"]])
            changes["tags"] = new_tags
    return changes


async def _write(
    session: AsyncSession, current: Row, changes: dict[str, Any], *, actor: Principal, via: str
) -> Row:
    """Apply changes with a version bump and one history row per changed field."""
    if not changes:
        return current
    statement = (
        update_statement(_t)
        .where(_t.c.id == current["id"])
        .values(**changes, version=_t.c.version + 1, updated_at=utc_now())
        .returning(*_ALL)
    )
    if any(k in changes for k in ("email", "external_id")):
        try:
            async with session.begin_nested():  # keep the transaction usable to name the holder
                row = (await session.execute(statement)).mappings().one()
        except IntegrityError as exc:
            if not is_unique_violation(exc):
                raise
            raise DuplicateContact(
                "another contact already holds this email or external_id",
                existing_id=await _holder_id(session, changes, excluding=current["id"]),
            ) from None
    else:
        row = (await session.execute(statement)).mappings().one()
    # An erased person's address may not come back by an edit (checked after the write: module docstring).
    await _refuse_suppressed(session, email=changes.get("email"), phone=changes.get("phone"),
                             external_id=changes.get("external_id"))
    await history.record(session, row["id"], _diff(current, row), actor=actor, via=via)
    await outbox.add(session, "contact.updated", contact_id=row["id"],
                     payload={"contact_id": str(row["id"]), "fields": sorted(changes)})
    return row


async def _created(session: AsyncSession, row: Row, *, actor: Principal, via: str) -> None:
    """History of a new contact, and the news for destinations (in the creating transaction).

    An erased person's address refuses the creation (checked after the insert: module docstring).
    """
    await _refuse_suppressed(session, email=row["email"], phone=row["phone"], external_id=row["external_id"])
    await history.record(session, row["id"], [_creation(row)], actor=actor, via=via)
    await outbox.add(session, "contact.created", contact_id=row["id"], payload={"contact_id": str(row["id"])})


async def _refuse_suppressed(session: AsyncSession, *, email: str | None, phone: str | None,
                             external_id: str | None) -> None:
    """SuppressedContact (409) when the address or customer number just written belongs to an erased person; the
    caller's transaction (or savepoint, in a batch) then undoes the write. A value the contact already held is not
    given: the contact that holds a number now is matched by it, whoever held it before."""
    if email or phone or external_id:
        await suppressions.ensure_not_suppressed(session, email=email, phone=phone, external_id=external_id)


async def _lock(
    session: AsyncSession, contact_id: uuid.UUID, expected_version: int | None = None, *, key_change: bool = True
) -> Row:
    """The contact, locked for this transaction; PreconditionFailed if it moved past `expected_version`.

    FOR UPDATE when the write may change its email or external_id, else FOR NO KEY UPDATE (services/locks.py).
    """
    query = select(*_ALL).where(_t.c.id == contact_id)
    query = query.with_for_update() if key_change else query.with_for_update(key_share=True)
    row = (await session.execute(query)).mappings().first()
    if row is None:
        raise ContactNotFound(f"no contact with id {contact_id}")
    if expected_version is not None and row["version"] != expected_version:
        raise PreconditionFailed(f"the contact is at version {row['version']}", current_version=row["version"])
    return row


async def _match_for_update(session: AsyncSession, external_id: str | None, email: str | None) -> Row | None:
    """The contact holding external_id, else the one holding email; one round trip, both rows locked."""
    keys = []
    if external_id:
        keys.append(_t.c.external_id == external_id)
    if email:
        keys.append(_t.c.email == email)
    rows = list((await session.execute(select(*_ALL).where(or_(*keys)).with_for_update())).mappings())
    return _pick_match(rows, external_id, email)


def _pick_match(rows: Sequence[Row], external_id: str | None, email: str | None) -> Row | None:
    """Among the contacts holding either key: the external_id's, else the email's (if its external_id agrees)."""
    by_external = next((r for r in rows if external_id and r["external_id"] == external_id), None)
    if by_external is not None:
        return by_external
    by_email = next((r for r in rows if email and r["email"] == email), None)
    if by_email is not None and external_id and by_email["external_id"] not in (None, external_id):
        raise DuplicateContact(
            "this email belongs to a contact with another external_id", existing_id=str(by_email["id"])
        )
    return by_email


def _column_changes(current: Row, columns: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in columns.items() if current[k] != v}


async def _holder_id(
    session: AsyncSession, values: Mapping[str, Any], *, excluding: uuid.UUID | None = None
) -> str | None:
    keys = [_t.c[k] == values[k] for k in ("email", "external_id") if values.get(k) is not None]
    if not keys:
        return None
    query = select(_t.c.id).where(or_(*keys))
    if excluding is not None:
        query = query.where(_t.c.id != excluding)
    holder = await session.scalar(query.limit(1))
    return str(holder) if holder else None


def _columns_from(payload: ContactCreate | ContactUpsert | ContactPatch) -> tuple[dict[str, Any], Any, Any]:
    """Column values the payload sets (explicit nulls included), its attributes patch and its tags."""
    data = payload.model_dump(exclude_unset=True)
    columns = {name: data[name] for name in _SIMPLE if name in data}
    if "address" in data:
        address = data["address"]
        if address is None:
            columns.update(dict.fromkeys(ADDRESS.values()))
        else:
            columns.update({ADDRESS[k]: v for k, v in address.items()})
    return columns, data.get("attributes", _MISSING), data.get("tags", _MISSING)


def _wire_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row as the flat wire fields history speaks of: `email`, `address.city`, `attributes.size`, `tags`."""
    out = {name: row.get(name) for name in _SIMPLE}
    out.update({f"address.{k}": row.get(col) for k, col in ADDRESS.items()})
    out.update({f"attributes.{k}": v for k, v in (row.get("attributes") or {}).items()})
    out["tags"] = list(row.get("tags") or []) or None
    return out


def _creation(row: Mapping[str, Any]) -> history.Change:
    """The history of a creation: one entry naming the fields set, in `_diff`'s order. Their values are not copied:
    each is the contact's own until a later entry records it as the old value (docs/api.md "History")."""
    return history.CREATED, None, {"fields": [k for k, v in sorted(_wire_fields(row).items()) if v is not None]}


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> Sequence[history.Change]:
    before, after = _wire_fields(old), _wire_fields(new)
    return [(k, before.get(k), after.get(k)) for k in sorted(before.keys() | after.keys())
            if before.get(k) != after.get(k)]
