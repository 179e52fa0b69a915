"""Segments on the wire. The filter is checked (and compiled) by app.services.segments, which names the
faulty part by its JSON path (`filter.all[2].op`)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field, StringConstraints, WithJsonSchema, field_validator

from app.errors import InvalidInput
from app.schemas.base import InputSchema, VersionReceipt
from app.schemas.contacts import ContactRead
from app.schemas.types import NON_BLANK, LongText, ShortText, absent_or_set, refuse_null

__all__ = [
    "MAX_CONDITIONS",
    "MAX_DEPTH",
    "MAX_FILTER_VALUES",
    "SegmentCreate",
    "SegmentMemberCount",
    "SegmentPage",
    "SegmentPatch",
    "SegmentPreview",
    "SegmentPreviewRequest",
    "SegmentRead",
    "SegmentWritten",
    "check_filter_bounds",
    "present_segment",
]

MAX_DEPTH = 8            # nested groups
MAX_CONDITIONS = 100     # leaf conditions in one filter
# JSON values in one filter, containers and their members all counted: 100 conditions of an `in` of 100 values
# take ~10,600; anything past this is not a filter anyone wrote.
MAX_FILTER_VALUES = 12_000
_GROUPS = ("all", "any", "not")


def check_filter_bounds(filter_: Any, path: str = "filter") -> None:
    """422 naming the part at fault when a filter is too large or nested too deep, BEFORE anything else reads it
    (pydantic, the compiler, the renderer of its errors): one iterative walk that stops at the first container
    taking it past a bound, without looking inside it. So `{"all": [{}, {}, ...]}` of 1.7M members costs a
    `len()`, not 1.7M error entries (issue 15, class 2)."""
    stack: list[tuple[Any, str, int | None]] = [(filter_, path, 0)]  # (value, its path, group depth or None)
    seen = 1
    conditions = 0
    while stack:
        value, at, depth = stack.pop()
        if not isinstance(value, dict | list):
            continue
        seen += len(value)
        if seen > MAX_FILTER_VALUES:
            raise InvalidInput.one(path, f"a filter holds at most {MAX_FILTER_VALUES:,} JSON values in all",
                                   "too_large")
        group = next(iter(value)) if depth is not None and isinstance(value, dict) and len(value) == 1 else None
        if depth is not None and group in _GROUPS:
            if depth >= MAX_DEPTH:
                raise InvalidInput.one(at, f"groups nest at most {MAX_DEPTH} deep", "too_deep")
            members = value[group]
            if group == "not":
                stack.append((members, f"{at}.not", depth + 1))
                continue
            if isinstance(members, list) and len(members) > MAX_CONDITIONS:
                raise InvalidInput.one(f"{at}.{group}", f"a group holds at most {MAX_CONDITIONS} members, a filter "
                                       f"at most {MAX_CONDITIONS} conditions", "too_many_conditions")
            if isinstance(members, list):
                stack.extend((m, f"{at}.{group}[{i}]", depth + 1) for i, m in enumerate(members))
                continue
        elif depth is not None and isinstance(value, dict):
            conditions += 1
            if conditions > MAX_CONDITIONS:
                raise InvalidInput.one(at, f"a filter holds at most {MAX_CONDITIONS} conditions",
                                       "too_many_conditions")
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, at, None) for child in children)  # inside a condition: counted, not paths


def _bounded(value: Any) -> Any:
    # Raised as itself (not a ValueError): pydantic lets it through, and the 422 names the part at fault.
    check_filter_bounds(value)
    return value

SegmentName = Annotated[ShortText, StringConstraints(min_length=1, max_length=100), NON_BLANK]
FILTER_DOC = ('{"all": [...]} / {"any": [...]} / {"not": {...}} nesting {"field", "op", "value"} conditions '
              f"(docs/api.md, Segments). Bounds: groups nest at most {MAX_DEPTH} deep, a group holds at most "
              f"{MAX_CONDITIONS} members, a filter at most {MAX_CONDITIONS} conditions and {MAX_FILTER_VALUES:,} JSON "
              "values in all (422 `too_deep`, `too_many_conditions`, `too_large`)")
# maxProperties: a group has 1 key, a condition at most 5 (the compiler names any other key).
# Declared as the component SegmentFilter, which app.main adds (built from the compiler's tables by
# app.services.segment_schema); the compiler checks it.
FILTER_REF = "#/components/schemas/SegmentFilter"
Filter = Annotated[dict[str, Any], BeforeValidator(_bounded), WithJsonSchema({"allOf": [{"$ref": FILTER_REF}]}), Field(
    json_schema_extra={"maxProperties": 5}, description=FILTER_DOC, examples=[
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

    _required_fields_stay = field_validator("name", "filter", mode="before")(refuse_null)


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


# A segment's definition is segments:read's: a PATCH answers a token without it a receipt (security.md, 11).
SegmentWritten = SegmentRead | VersionReceipt


class SegmentPage(BaseModel):
    data: list[SegmentRead]
    next_cursor: str | None


# Not named SegmentCount: that component is the filter grammar's `count` of a condition (app.services.segment_schema).
class SegmentMemberCount(BaseModel):
    """How many contacts match the segment now."""

    count: int


class SegmentPreview(BaseModel):
    count: int
    data: list[ContactRead] = Field(description="The first matching contacts (at most 20), in id order")


def present_segment(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("id", "name", "description", "filter", "created_at", "updated_at", "version")}
