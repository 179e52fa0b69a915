"""`GET /v1/contacts/duplicates` and `POST /v1/contacts/{contact_id}/merge`.

Included before the contacts router (app/main.py), so `/v1/contacts/duplicates` is never read as a contact id.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from app.db import ReadSession, WriteSession
from app.errors import ContactNotFound, IdempotencyKeyReused, PreconditionFailed, problems
from app.routers.contacts import written
from app.routers.deps import AUTH_PROBLEMS, CursorParam, Idempotency, IfMatch, JSONBody, etag
from app.schemas.contacts import WRITTEN, ContactWritten, present_contact
from app.schemas.merge import DuplicatesPage, MergeRequest
from app.schemas.types import Limit
from app.security import Principal, Scope, require
from app.security.costly import COSTLY_PROBLEMS, costly
from app.services import duplicates as duplicates_service
from app.services import merge as merge_service
from app.services.duplicates import Reason
from app.services.merge import ContactAlreadyMerged
from app.timeouts import session_within

__all__ = ["router"]

router = APIRouter(prefix="/v1/contacts", tags=["contacts"], responses=AUTH_PROBLEMS)


@router.get("/duplicates", response_model=DuplicatesPage, responses=problems(*COSTLY_PROBLEMS))
async def list_duplicate_candidates(
    session: ReadSession,
    request: Request,
    caller: Annotated[Principal, costly(Scope.CONTACTS_READ, Scope.PII_READ)],  # over every contact: costly
    reason: Annotated[list[Reason], Query(
        max_length=len(Reason), description="Repeatable: only pairs matched by these rules")] = [],  # noqa: B006
    limit: Limit = 50,
    cursor: CursorParam = None,
) -> Any:
    """Pairs of contacts that are probably one person, each with its reasons.

    Needs `pii:read`: every rule compares masked values (the same phone, name, mailbox), so a pair alone tells a
    masked reader that two hidden values are equal."""
    async with session_within(session, request.app.state.timeouts.costly, kind="a page of duplicate candidates"):
        pairs, next_cursor = await duplicates_service.candidates_page(
            session, reasons=reason, limit=limit, cursor=cursor, codec=request.app.state.cursor_codec)
    return JSONBody({
        "data": [{"contacts": [present_contact(p.first, reveal_pii=caller.sees_pii),
                               present_contact(p.second, reveal_pii=caller.sees_pii)],
                  "reasons": p.reasons} for p in pairs],
        "next_cursor": next_cursor,
    })


@router.post("/{contact_id}/merge", response_model=ContactWritten,
             responses={200: {"description": f"The survivor. {WRITTEN}"},
                        **problems(ContactNotFound, ContactAlreadyMerged, PreconditionFailed, IdempotencyKeyReused)})
async def merge_contact(
    contact_id: uuid.UUID,
    payload: MergeRequest,
    request: Request,
    session: WriteSession,
    caller: Annotated[Principal, require(Scope.CONTACTS_WRITE)],
    expected_version: IfMatch,
    idem: Idempotency,
) -> Any:
    """Merge `duplicate_id` into this contact, which is kept (If-Match applies to it); the duplicate is deleted."""
    if idem.replay:
        return idem.replay
    merged = await merge_service.merge(
        session, contact_id, payload.duplicate_id, actor=caller, policy=request.app.state.lifecycle_policy,
        expected_version=expected_version,
    )
    return await idem.respond(200, written(merged.survivor, caller),
                              {"ETag": etag(merged.survivor["version"])})
