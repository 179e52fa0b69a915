"""`/v1/journal`: who read, exported or changed whose personal data (admin only)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from app.access import describe, reveal
from app.db import ReadSession
from app.errors import MissingScope
from app.routers.deps import JSONBody
from app.schemas.journal import JournalPage, present_entry
from app.schemas.types import Email, Limit, PhoneLookup, QueryTimestamp, SearchText
from app.security import Principal, Scope, require
from app.services import history as history_service
from app.services import journal as journal_service
from app.services import suppressions as suppressions_service
from app.services.journal import JournalFilter

__all__ = ["router"]

router = APIRouter(prefix="/journal", tags=["journal"])


@router.get("", response_model=JournalPage)
async def list_journal_entries(
    request: Request,
    session: ReadSession,
    caller: Annotated[Principal, require(Scope.JOURNAL_READ)],
    contact_id: Annotated[uuid.UUID | None, Query(description="Entries that reached this contact")] = None,
    email: Annotated[Email | None, Query(
        description="Entries that reached this address's person, erased since or not (its keyed digest). Needs "
                    "pii:read")] = None,
    phone: Annotated[PhoneLookup | None, Query(description="Likewise, by phone. Needs pii:read")] = None,
    subject: SearchText | None = None,
    token_id: Annotated[SearchText | None, Query(max_length=64)] = None,
    since: QueryTimestamp | None = None,
    until: QueryTimestamp | None = None,
    limit: Limit = 50,
    cursor: Annotated[str | None, Query(max_length=20, pattern=r"^[0-9]+$")] = None,
) -> Any:
    """Newest first. `contact_id`, `email` and `phone` together match any of them: "who reached this person?"."""
    # A lookup by address says whether it is (or was) in the file, and under which contact: the question
    # `GET /v1/contacts?email=` and `/v1/suppressions/check` keep for pii:read (docs/security.md, Class 8).
    if (email or phone) and not caller.sees_pii:
        raise MissingScope("looking entries up by email or phone tells who holds, or held, that address: pii:read "
                           "is needed", missing_scopes=[Scope.PII_READ.value])
    refs = [str(contact_id)] if contact_id else []
    if email or phone:
        refs += journal_service.erased_refs(suppressions_service.digests(email=email, phone=phone).values())
        refs += [str(i) for i in await journal_service.contacts_holding(session, email=email, phone=phone)]
    query = JournalFilter(refs=refs, subject=subject, token_id=token_id, since=since, until=until)
    if (contact_id or email or phone) and not refs:
        return JSONBody({"data": [], "next_cursor": None})
    rows = await journal_service.page(session, query, limit=limit, before_seq=history_service.id_cursor(cursor))
    # Reading the journal is itself journaled: it names collaborators, clients' addresses and contacts.
    # The contact looked up goes in the entry's refs, not its filter: erasure rewrites refs, never the hashed detail.
    describe("journal.read", kind="admin", filter=journal_service.search_detail(
        request.query_params, hidden=("email", "phone"), drop=("cursor", "contact_id")))
    if contact_id:
        reveal(contact_id)
    return JSONBody({"data": [present_entry(r) for r in rows[:limit]],
                     "next_cursor": str(rows[limit - 1]["seq"]) if len(rows) > limit else None})
