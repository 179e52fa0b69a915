"""`/v1/contacts/{contact_id}/consents` and `/can-email`: the GDPR consent ledger of a contact."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter

from app.access import reveal
from app.db import ReadSession, WriteSession
from app.errors import ContactNotFound, IdempotencyKeyReused, problems
from app.routers.deps import Idempotency, JSONBody
from app.schemas.consents import CanEmail, ConsentCreate, ConsentEventRead, ConsentLedger, present_event
from app.security import Principal, Scope, require
from app.services import consents as consents_service

__all__ = ["router"]

router = APIRouter(prefix="/contacts", tags=["consents"])

Reader = Annotated[Principal, require(Scope.CONSENTS_READ)]
Writer = Annotated[Principal, require(Scope.CONSENTS_WRITE)]


@router.post("/{contact_id}/consents", status_code=201, response_model=ConsentEventRead,
             responses=problems(ContactNotFound, IdempotencyKeyReused))
async def record_consent(
    contact_id: uuid.UUID, payload: ConsentCreate, session: WriteSession, caller: Writer, idem: Idempotency
) -> Any:
    """Append an event to the ledger (never edited, never deleted).

    Withdrawing `email_marketing` unsubscribes every list membership of the contact.
    """
    if caller.sees_pii:  # the answer (or its replay) shows the proof's IP, user agent and form URL in clear
        reveal(contact_id)
    if idem.replay:
        return idem.replay
    row = await consents_service.record(session, contact_id, payload, actor=caller)
    return await idem.respond(201, present_event(row, reveal_pii=caller.sees_pii))


@router.get("/{contact_id}/consents", response_model=ConsentLedger, responses=problems(ContactNotFound))
async def get_consents(contact_id: uuid.UUID, session: ReadSession, caller: Reader) -> Any:
    """The current state of every purpose, and the whole ledger in the order things happened."""
    ledger = await consents_service.ledger(session, contact_id)
    events = [present_event(r, reveal_pii=caller.sees_pii) for r in ledger["events"]]
    if events and caller.sees_pii:  # the proofs' IP, user agent and form URL in clear
        reveal(contact_id)
    return JSONBody({**ledger, "events": events})


@router.get("/{contact_id}/can-email", response_model=CanEmail, responses=problems(ContactNotFound))
async def get_can_email(contact_id: uuid.UUID, session: ReadSession, _: Reader) -> Any:
    return JSONBody(await consents_service.can_email(session, contact_id))
