"""Merges of duplicate contacts, and the indexes that find duplicate candidates.

`contact_merge` keeps one row per contact merged away: who absorbed it, when, and who asked. It has no
foreign keys: the merged row is deleted by the merge, and the survivor may later be merged or erased.

The candidate indexes sit on `contact` (declared here, built by migration 0007) and serve the self-joins
of `app/services/duplicates.py`: an expression index on the folded name + postal code, and one on the
email as the provider's rules read it. Both SQL functions return NULL when there is no key. The email
index is partial on `IS NOT NULL` (most addresses have no key); the name index is not (migration 0012:
a predicate made every insert compute the costly name key twice).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import ClassVar

from sqlalchemy import Index, func
from sqlmodel import Field, SQLModel

from app.models.base import TZ, utc_now
from app.models.contacts import Contact

__all__ = ["EMAIL_KEY", "NAME_KEY", "ContactMerge"]

_contact = Contact.__table__  # type: ignore[attr-defined]

# The SQL functions (migration 0007) applied to contact columns; queries must use these very expressions.
NAME_KEY = func.carnet_name_key(_contact.c.first_name, _contact.c.last_name, _contact.c.postal_code)
EMAIL_KEY = func.carnet_email_key(_contact.c.email)

Index("ix_contact_name_key", NAME_KEY)
Index("ix_contact_email_key", EMAIL_KEY, postgresql_where=EMAIL_KEY.is_not(None))


class ContactMerge(SQLModel, table=True):
    __tablename__: ClassVar[str] = "contact_merge"  # type: ignore[misc]

    merged_id: uuid.UUID = Field(primary_key=True)        # the contact merged away (its row is gone)
    survivor_id: uuid.UUID = Field(index=True)            # the contact that absorbed it
    merged_at: datetime = Field(default_factory=utc_now, sa_type=TZ)
    subject: str                                          # token subject of who merged
