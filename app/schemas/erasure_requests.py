"""The admin's view of erasure requests filed from the preference center."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, Field, StringConstraints

from app.access import reveal
from app.schemas.base import InputSchema
from app.schemas.types import NON_BLANK, LongText
from app.security.masking import mask_email, mask_name

__all__ = ["ErasureRequestPage", "ErasureRequestRead", "ErasureRequestStatus", "Refusal", "present_request"]


class ErasureRequestStatus(StrEnum):
    OPEN = "open"
    COMPLETED = "completed"
    REFUSED = "refused"


class RequestedBy(BaseModel):
    email: str | None
    first_name: str | None
    last_name: str | None


class ErasureRequestRead(BaseModel):
    id: uuid.UUID
    contact_id: uuid.UUID
    status: ErasureRequestStatus
    source: str = Field(description="preference_center")
    requested_at: datetime
    due_by: datetime = Field(description="One month after the request (GDPR art. 12(3))")
    resolved_at: datetime | None
    resolved_by: str | None = Field(description="The admin's subject, or self_service")
    note: str | None = Field(description="Why it was refused")
    contact: RequestedBy | None = Field(description="Who asked (null once erased); masked without pii:read")


class ErasureRequestPage(BaseModel):
    data: list[ErasureRequestRead]
    next_cursor: str | None


class Refusal(InputSchema):
    note: Annotated[LongText, StringConstraints(min_length=1), NON_BLANK] = Field(
        description="The reason (GDPR art. 17(3): a legal obligation to keep, e.g. invoices); kept with the request")


def present_request(row: Mapping[str, Any], *, reveal_pii: bool) -> dict[str, Any]:
    out = {k: row[k] for k in ("id", "contact_id", "status", "source", "requested_at", "due_by", "resolved_at",
                                "resolved_by", "note")}
    if row["email"] is None and row["first_name"] is None and row["last_name"] is None:
        out["contact"] = None
    elif reveal_pii:
        out["contact"] = {k: row[k] for k in ("email", "first_name", "last_name")}
        if row["contact_id"] is not None:
            reveal(row["contact_id"])  # journaled (app.access)
    else:
        out["contact"] = {"email": mask_email(row["email"]), "first_name": mask_name(row["first_name"]),
                          "last_name": mask_name(row["last_name"])}
    return out
