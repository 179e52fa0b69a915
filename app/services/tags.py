"""Tags: the catalogue, and adding or removing one on contacts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, exists, func, literal, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import Conflict, TagNotFound
from app.models import Contact, ContactHistory, Tag
from app.models.base import utc_now
from app.models.contacts import tagged
from app.schemas.attributes import TagCreate
from app.security import Principal

__all__ = ["create", "delete_tag", "ensure", "list_all"]

_tags = Tag.__table__  # type: ignore[attr-defined]
_contacts = Contact.__table__  # type: ignore[attr-defined]
_history = ContactHistory.__table__  # type: ignore[attr-defined]


class DuplicateTag(Conflict):
    slug, title = "duplicate-tag", "A tag with this name already exists"


async def list_all(session: AsyncSession) -> list[dict[str, Any]]:
    rows = await session.execute(select(_tags).order_by(_tags.c.name))
    return [dict(r) for r in rows.mappings()]


async def create(session: AsyncSession, data: TagCreate) -> dict[str, Any]:
    row = (
        await session.execute(
            insert(_tags).values(**data.model_dump(), created_at=utc_now()).on_conflict_do_nothing().returning(*_tags.c)
        )
    ).mappings().first()
    if row is None:
        raise DuplicateTag(f"a tag named {data.name!r} already exists")
    return dict(row)


async def ensure(session: AsyncSession, names: Sequence[str]) -> None:
    """Tags named on a contact exist in the catalogue afterwards (created on first use), and stay there until this
    transaction ends: each is locked FOR KEY SHARE, so a `delete_tag` waits for the contact written here to commit
    and then takes the tag off it too (its UPDATE would not see a contact tagged by a transaction still open)."""
    wanted = sorted(set(names))
    for _attempt in range(3):
        if not wanted:
            return
        locked = set((await session.scalars(
            select(_tags.c.name).where(_tags.c.name.in_(wanted)).order_by(_tags.c.name)
            .with_for_update(read=True, key_share=True))).all())
        missing = [n for n in wanted if n not in locked]
        if not missing:
            return
        created = set((await session.scalars(
            insert(_tags).values([{"name": n, "created_at": utc_now()} for n in missing]).on_conflict_do_nothing()
            .returning(_tags.c.name))).all())  # ours until we commit: no one else sees them
        wanted = [n for n in missing if n not in created]  # created meanwhile by another writer: locked next round


async def delete_tag(session: AsyncSession, name: str, *, actor: Principal) -> int:
    """Delete a tag and take it off every contact (recorded in each contact's history, set-based)."""
    found = await session.execute(delete(_tags).where(_tags.c.name == name).returning(_tags.c.name))
    if found.first() is None:
        raise TagNotFound(f"no tag named {name!r}")
    # Repeated until no contact holds it: each pass is a new statement, so it sees what committed while the last one
    # waited for a contact's lock, such as a merge that gave the survivor the duplicate's tag while the pass waited
    # for the duplicate (and found it gone). Taggers through `ensure` wait for the DELETE above instead.
    total = 0
    while True:
        total += await _untag(session, name, actor=actor)
        if not await session.scalar(select(exists().where(tagged(_contacts.c.tags.contains([name]))))):
            return total


async def _untag(session: AsyncSession, name: str, *, actor: Principal) -> int:
    """Take the tag off every contact holding it in this statement's snapshot, each with its history row."""
    changed = (
        update(_contacts)
        .where(tagged(_contacts.c.tags.contains([name])))
        .values(tags=func.array_remove(_contacts.c.tags, name), version=_contacts.c.version + 1, updated_at=utc_now())
        .returning(_contacts.c.id, _contacts.c.tags)
        .cte("changed")
    )
    old_tags = func.array_append(changed.c.tags, name)
    result = await session.execute(
        insert(_history).from_select(
            ["contact_id", "field", "old_value", "new_value", "subject", "via", "at"],
            select(
                changed.c.id,
                literal("tags"),
                func.to_jsonb(old_tags),
                func.to_jsonb(changed.c.tags),
                literal(actor.subject),
                literal("api"),
                literal(utc_now()),
            ),
        )
    )
    return result.rowcount or 0
