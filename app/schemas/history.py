"""History entries on the wire, masked like the contact they describe."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from app.access import reveal
from app.security.masking import PII_FIELDS, mask_email, mask_name, mask_phone, mask_text

__all__ = ["HistoryEntry", "HistoryPage", "present_history"]


class HistoryEntry(BaseModel):
    id: int
    field: str
    old_value: Any
    new_value: Any
    subject: str
    via: str
    at: datetime
    contact_id: uuid.UUID


class HistoryPage(BaseModel):
    data: list[HistoryEntry]
    next_cursor: str | None


_MASKERS: dict[str, Callable[[Any], Any]] = {
    "email": mask_email,
    "phone": mask_phone,
    "first_name": mask_name,
    "last_name": mask_name,
    "birth_date": lambda _value: None,  # as on the contact itself
}


def _mask(field: str, value: Any) -> Any:
    field = field.removeprefix("merged_contact.")  # what a merged record was known by: masked as its own fields
    if value is None or field not in PII_FIELDS:
        return value
    return _MASKERS.get(field, mask_text)(value)


def present_history(row: Mapping[str, Any], *, reveal_pii: bool) -> dict[str, Any]:
    entry = {k: row[k] for k in ("id", "field", "old_value", "new_value", "subject", "via", "at", "contact_id")}
    if reveal_pii:
        reveal(row["contact_id"])  # journaled (app.access)
    else:
        entry["old_value"] = _mask(row["field"], row["old_value"])
        entry["new_value"] = _mask(row["field"], row["new_value"])
    return entry
