"""Segments on the wire. The filter is checked (and compiled) by app.services.segments, which names the
faulty part by its JSON path (`filter.all[2].op`)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Self

from pydantic import BaseModel, Field, StringConstraints, WithJsonSchema, model_validator

from app.schemas.base import InputSchema
from app.schemas.contacts import ContactRead
from app.schemas.types import NON_BLANK, LongText, ShortText, absent_or_set

__all__ = [
    "SegmentCount",
    "SegmentCreate",
    "SegmentPage",
    "SegmentPatch",
    "SegmentPreview",
    "SegmentPreviewRequest",
    "SegmentRead",
    "present_segment",
]

SegmentName = Annotated[ShortText, StringConstraints(min_length=1, max_length=100), NON_BLANK]
FILTER_DOC = ('{"all": [...]} / {"any": [...]} / {"not": {...}} nesting {"field", "op", "value"} conditions '
              "(docs/api.md, Segments)")
# Declared as the component SegmentFilter, which app.main adds (built from the compiler's tables by
# app.services.segment_schema); the compiler checks it.
FILTER_REF = "#/components/schemas/SegmentFilter"
Filter = Annotated[dict[str, Any], WithJsonSchema({"allOf": [{"$ref": FILTER_REF}]}), Field(description=FILTER_DOC, examples=[
    {"all": [{"field": "address.city", "op": "eq", "value": "Lyon"},
             {"field": "orders.category", "op": "eq", "value": "shoes", "within_days": 90}]}])]


class SegmentCreate(InputSchema):
    name: SegmentName
    description: LongText | None = None
    filter: Filter


class SegmentPatch(InputSchema):
    """Merge patch: absent fields untouched; null clears description."""

    name: SegmentName | None = absent_or_set()
    description: LongText | None = None
    filter: Filter | None = absent_or_set()

    @model_validator(mode="after")
    def _required_fields_stay(self) -> Self:
        for name in ("name", "filter"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null")
        return self


class SegmentPreviewRequest(InputSchema):
    filter: Filter


class SegmentRead(BaseModel):
    id: uuid.UUID
    name: str
    description: str | None
    filter: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    version: int


class SegmentPage(BaseModel):
    data: list[SegmentRead]
    next_cursor: str | None


class SegmentCount(BaseModel):
    count: int


class SegmentPreview(BaseModel):
    count: int
    data: list[ContactRead] = Field(description="The first matching contacts (at most 20), in id order")


def present_segment(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("id", "name", "description", "filter", "created_at", "updated_at", "version")}
