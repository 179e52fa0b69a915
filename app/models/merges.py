"""Merges of duplicate contacts, and the indexes that find duplicate candidates.

`contact_merge` keeps one row per contact merged away: who absorbed it, when, and who asked. It has no
foreign keys: the merged row is deleted by the merge, and the survivor may later be merged or erased.

The duplicate finder's keys (`app/services/duplicates.py`) are two SQL functions (migration 0007), stored on
`contact` as generated columns `name_key` and `email_key` with a partial index each (migration 0028): the
folded name + postal code, and the email as the provider's rules read it; NULL when there is no key. They
exist only in the database (alembic/env.py), so that no `select(*contact.c)` returns them.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import ClassVar

from sqlmodel import Field, SQLModel

from app.models.base import TZ, utc_now

__all__ = ["ContactMerge"]


class ContactMerge(SQLModel, table=True):
    __tablename__: ClassVar[str] = "contact_merge"  # type: ignore[misc]

    merged_id: uuid.UUID = Field(primary_key=True)        # the contact merged away (its row is gone)
    survivor_id: uuid.UUID = Field(index=True)            # the contact that absorbed it
    merged_at: datetime = Field(default_factory=utc_now, sa_type=TZ)
    subject: str                                          # token subject of who merged
