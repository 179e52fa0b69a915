"""Wire shapes of the access journal (`GET /v1/journal`)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from app.services.journal import ERASED

__all__ = ["JournalEntryRead", "JournalPage", "present_entry"]


class JournalEntryRead(BaseModel):
    seq: int = Field(description="Position in the hash chain")
    at: datetime = Field(description="When the access or act happened")
    kind: str = Field(description="read | export | admin")
    action: str = Field(description="e.g. personal_data.read, exports.contacts, tokens.created, contacts.erased")
    subject: str = Field(description="Who: the token's subject, or the command (`cli`)")
    token_id: str | None
    role: str | None
    route: str | None = Field(description="Method and route template, e.g. `GET /v1/contacts/{contact_id}`")
    request_id: str | None
    client_addr: str | None
    contact_ids: list[uuid.UUID] = Field(description="The contacts whose data the answer carried")
    erased_refs: list[str] = Field(description="People erased since: keyed digests of their email and phone")
    count: int = Field(description="Contacts answered, or rows exported")
    detail: dict[str, Any] | None = Field(description="The filter, format or target; searched addresses as digests")
    hash: str = Field(description="SHA-256 of the previous entry's hash and this entry (hex)")
    prev_hash: str


class JournalPage(BaseModel):
    data: list[JournalEntryRead]
    next_cursor: str | None


def present_entry(row: Mapping[str, Any]) -> dict[str, Any]:
    detail = row["detail"]
    return {
        **{k: row[k] for k in ("seq", "at", "kind", "action", "subject", "token_id", "role", "route", "request_id",
                               "client_addr")},
        "contact_ids": [ref for ref in row["refs"] if not ref.startswith(ERASED)],
        "erased_refs": [ref for ref in row["refs"] if ref.startswith(ERASED)],
        "count": row["ref_count"],
        "detail": json.loads(detail) if isinstance(detail, str) else detail,
        "hash": row["hash"].hex(),
        "prev_hash": row["prev_hash"].hex(),
    }
