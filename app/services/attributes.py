"""Custom attribute definitions, and the check of a contact's `attributes` against them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import (
    AttributeInUse,
    AttributeNotFound,
    DuplicateAttribute,
    FieldError,
    InvalidInput,
    PreconditionFailed,
)
from app.models import AttributeDefinition, Contact
from app.models.base import utc_now
from app.schemas.attributes import AttributeCreate, AttributePatch, AttributeType
from app.schemas.freeform import unstorable_text
from app.schemas.types import ATTRIBUTE_NAME_PATTERN, bounded_decimal
from app.security import Principal, Scope

__all__ = ["NUMBER_DIGITS", "NUMBER_PLACES", "create", "definition_version", "delete_definition", "get", "list_all",
           "normalize_values", "update_definition"]

_defs = AttributeDefinition.__table__  # type: ignore[attr-defined]
_contacts = Contact.__table__  # type: ignore[attr-defined]
MAX_TEXT = 2000
MAX_OPTIONS = 500  # AttributeCreate.options
# A number attribute is stored in JSONB as sent and compared as numeric by segments: bounded so that every
# comparison PostgreSQL makes with it, and every value a filter may compare it with, is an ordinary number.
NUMBER_DIGITS, NUMBER_PLACES = 15, 30
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def definition_version(row: Mapping[str, Any]) -> int:
    """A definition's version for ETag/If-Match: its updated_at in microseconds (opaque, as an order's; every change
    moves it). The table has no version column, and a change of a definition is rare enough for a timestamp."""
    return (row["updated_at"] - _EPOCH) // timedelta(microseconds=1)  # type: ignore[no-any-return]


def _check_version(current: Mapping[str, Any], expected_version: int | None) -> None:
    """If-Match (None: no condition): PreconditionFailed unless the definition is still at that version."""
    if expected_version is not None and definition_version(current) != expected_version:
        raise PreconditionFailed(f"the attribute is at version {definition_version(current)}",
                                 current_version=definition_version(current))


async def list_all(session: AsyncSession) -> list[dict[str, Any]]:
    rows = await session.execute(select(_defs).order_by(_defs.c.name))
    return [dict(r) for r in rows.mappings()]


async def get(session: AsyncSession, name: str, *, lock: str | None = None) -> dict[str, Any]:
    """The definition; `lock`: "update" (to delete it), "no_key_update" (to change it), else not locked."""
    query = select(_defs).where(_defs.c.name == name)
    if lock is not None:
        query = query.with_for_update(key_share=lock == "no_key_update")
    row = (await session.execute(query)).mappings().first()
    if row is None:
        raise AttributeNotFound(f"no attribute named {name!r}")
    return dict(row)


async def create(session: AsyncSession, data: AttributeCreate) -> dict[str, Any]:
    now = utc_now()
    values = {**data.model_dump(), "created_at": now, "updated_at": now}
    row = (
        await session.execute(insert(_defs).values(values).on_conflict_do_nothing().returning(*_defs.c))
    ).mappings().first()
    if row is None:
        raise DuplicateAttribute(f"an attribute named {data.name!r} already exists", existing_name=data.name)
    return dict(row)


async def update_definition(
    session: AsyncSession, name: str, patch: AttributePatch, *, expected_version: int | None = None,
    actor: Principal,
) -> dict[str, Any]:
    # Locked before the options are compared: two PATCHes each adding an option would otherwise both compare with
    # the options before either, and the later one would remove the other's (which contacts may hold by then).
    # FOR NO KEY UPDATE: contact writes checking values against it (FOR KEY SHARE) are not held up.
    current = await get(session, name, lock="no_key_update")
    changes = patch.model_dump(exclude_unset=True)
    if "options" in changes:
        if current["type"] not in (AttributeType.ENUM, AttributeType.MULTI_ENUM):
            raise InvalidInput.one("options", "options are only for enum and multi_enum attributes")
        new_options = changes["options"] or []
        removed = sorted(set(current["options"] or []) - set(new_options))
        if removed:
            # Stored values would stop matching their definition.
            # the stored options are contacts:read's to know (docs/security.md, class 11)
            named = f": {', '.join(removed)}" if actor.reads(Scope.CONTACTS_READ) else " (send every current one)"
            raise InvalidInput.one("options", f"options cannot be removed{named}", "options_removed")
        if len(set(new_options)) != len(new_options):
            raise InvalidInput.one("options", "options must be distinct")
    _check_version(current, expected_version)  # last, on a request otherwise valid (RFC 9110 §13.2.1)
    if not changes:
        return current
    row = (
        await session.execute(
            update(_defs).where(_defs.c.name == name).values(**changes, updated_at=utc_now()).returning(*_defs.c)
        )
    ).mappings().one()
    return dict(row)


async def delete_definition(
    session: AsyncSession, name: str, *, expected_version: int | None = None, actor: Principal
) -> None:
    # Locked before the holders are counted: a contact write that checked a value against the definition holds it
    # FOR KEY SHARE (`normalize_values`) until it commits, so the count below sees its value.
    _check_version(await get(session, name, lock="update"), expected_version)
    holders = await session.scalar(
        select(func.count()).select_from(_contacts).where(_contacts.c.attributes.has_key(name))
    )
    if holders:
        if not actor.reads(Scope.CONTACTS_READ):  # how many hold it is contacts:read's (docs/security.md, 11)
            raise AttributeInUse(f"contacts hold a value for {name!r}; remove those values first")
        raise AttributeInUse(
            f"{holders} contact(s) hold a value for {name!r}; remove those values first", contacts=holders
        )
    await session.execute(delete(_defs).where(_defs.c.name == name))


_DEFINABLE = re.compile(ATTRIBUTE_NAME_PATTERN)


async def normalize_values(
    session: AsyncSession, values: Mapping[str, Any], *, field: str = "attributes"
) -> dict[str, Any]:
    """Check each value against its definition and return the stored form; nulls pass through (removals)."""
    if not values:
        return {}
    # Only a name an attribute can have is looked up: any other (a NUL in it, say) is simply unknown.
    names = sorted(name for name in values if _DEFINABLE.fullmatch(name))
    # FOR KEY SHARE until the write commits: the definition cannot be deleted before the value is stored and seen by
    # `delete_definition`'s count (one deleted first is unknown here). Many writers hold it at once.
    rows = await session.execute(select(_defs).where(_defs.c.name.in_(names)).order_by(_defs.c.name)
                                 .with_for_update(read=True, key_share=True))
    definitions = {r["name"]: r for r in rows.mappings()}
    out: dict[str, Any] = {}
    errors: list[FieldError] = []
    for name, value in values.items():
        where = f"{field}.{name}"
        definition = definitions.get(name)
        if definition is None:
            errors.append(FieldError(where, "unknown attribute: define it with POST /v1/attributes",
                                     "unknown_attribute"))
            continue
        if value is None:
            out[name] = None
            continue
        try:
            out[name] = _coerce(AttributeType(definition["type"]), value, definition["options"] or [])
        except ValueError as exc:
            errors.append(FieldError(where, str(exc), "attribute_type"))
    if errors:
        raise InvalidInput(*errors)
    return out


def _coerce(kind: AttributeType, value: Any, options: list[str]) -> Any:
    match kind:
        case AttributeType.TEXT:
            if not isinstance(value, str):
                raise ValueError("expected text")
            if len(value) > MAX_TEXT or unstorable_text(value):  # a NUL or a lone surrogate: no UTF-8 for PostgreSQL
                raise ValueError(f"text must be at most {MAX_TEXT} characters, without NUL or lone surrogates")
            return value
        case AttributeType.NUMBER:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError("expected a number")
            bounded_decimal(value, integer_digits=NUMBER_DIGITS, places=NUMBER_PLACES)  # ValueError names the bounds
            return value
        case AttributeType.BOOLEAN:
            if not isinstance(value, bool):
                raise ValueError("expected true or false")
            return value
        case AttributeType.DATE:
            if not isinstance(value, str):
                raise ValueError("expected a date as YYYY-MM-DD")
            try:
                return date.fromisoformat(value).isoformat()
            except ValueError:
                raise ValueError("expected a date as YYYY-MM-DD") from None
        case AttributeType.ENUM:
            if value not in options:
                raise ValueError(f"expected one of: {', '.join(options)}")
            return value
        case AttributeType.MULTI_ENUM:
            if not isinstance(value, list) or len(value) > MAX_OPTIONS or any(v not in options for v in value):
                raise ValueError(f"expected a list of: {', '.join(options)}")
            return sorted(set(value), key=value.index)
    raise ValueError("unsupported attribute type")  # pragma: no cover
