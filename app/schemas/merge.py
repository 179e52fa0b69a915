"""Wire shapes of duplicate candidates and of a merge."""

from __future__ import annotations

from pydantic import BaseModel, Field

from app.schemas.base import InputSchema
from app.schemas.contacts import ContactRead
from app.schemas.types import Uuid

__all__ = ["DuplicatePairRead", "DuplicatesPage", "MergeRequest"]


class MergeRequest(InputSchema):
    duplicate_id: Uuid = Field(description="The contact merged into this one, then deleted")


class DuplicatePairRead(BaseModel):
    contacts: list[ContactRead] = Field(min_length=2, max_length=2,
                                        description="The two contacts, smaller id first (masked without pii:read)")
    reasons: list[str] = Field(description="phone | name_postal_code | email, sorted")


class DuplicatesPage(BaseModel):
    data: list[DuplicatePairRead]
    next_cursor: str | None
