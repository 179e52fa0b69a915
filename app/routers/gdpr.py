"""GDPR rights over HTTP: export (access), erase, the suppression list, retention runs."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.access import reveal
from app.db import ReadSession, WriteSession, get_sessionmaker
from app.errors import ContactNotFound, InvalidInput, PreconditionFailed, problems
from app.models.base import utc_now
from app.routers.deps import IfMatch, JSONBody
from app.schemas.gdpr import (
    RETENTION_IDS_SHOWN,
    ContactExportRead,
    RetentionReportRead,
    RetentionRun,
    SuppressionCheck,
    SuppressionRelease,
    SuppressionReleased,
    present_export,
)
from app.schemas.types import Email, ExternalId, PhoneLookup
from app.security import Principal, Scope, require
from app.services import gdpr as gdpr_service
from app.services import suppressions as suppressions_service

__all__ = ["router"]

router = APIRouter(tags=["gdpr"])

Eraser = Annotated[Principal, require(Scope.CONTACTS_ERASE)]


@router.get("/contacts/{contact_id}/export", response_model=ContactExportRead, responses=problems(ContactNotFound))
async def export_contact(
    contact_id: uuid.UUID, session: ReadSession, caller: Annotated[Principal, require(Scope.EXPORTS_READ)]
) -> Any:
    """Right of access (art. 15): everything held about the person, in one JSON document.

    Personal data is masked, as everywhere, for a token without `pii:read`.
    """
    data = await gdpr_service.export(session, contact_id)
    if data.orders or data.carts:  # a person's purchases have no masked form: journaled for every token
        reveal(contact_id)
    return JSONBody(present_export(data, reveal_pii=caller.sees_pii, generated_at=utc_now()))


@router.delete("/contacts/{contact_id}", status_code=204, response_class=Response,
               responses=problems(ContactNotFound, PreconditionFailed))
async def erase_contact(
    contact_id: uuid.UUID, session: WriteSession, caller: Eraser, expected_version: IfMatch
) -> Response:
    """Right to erasure (art. 17), in one transaction: see docs/gdpr.md for exactly what goes and what stays.

    The email, phone and external_id join the suppression list, so the person is never re-created by accident.
    """
    await gdpr_service.erase(session, contact_id, actor=caller, expected_version=expected_version)
    return Response(status_code=204)


@router.get("/suppressions/check", response_model=SuppressionCheck)
async def check_suppression(
    session: ReadSession,
    _: Annotated[Principal, require(Scope.CONTACTS_READ, Scope.PII_READ)],
    email: Annotated[Email | None, Query(
        description="An email address (normalized like a contact's); `email`, `phone` or `external_id` is "
                    "required")] = None,
    phone: Annotated[PhoneLookup | None, Query(
        description="A phone number (compared in E.164; one that is not valid is not suppressed); `email`, `phone` "
                    "or `external_id` is required")] = None,
    external_id: Annotated[ExternalId | None, Query(
        description="A customer number (compared as stored: trimmed, case kept)")] = None,
) -> Any:
    """Whether an address or customer number belongs to an erased person (one suppressed value is enough).

    Needs `pii:read`: it is a lookup by an address, like `?email=`, telling a prober who was a customer."""
    if not (email or phone or external_id):
        raise InvalidInput.one("email", "email, phone or external_id is required", "missing")
    kinds = await suppressions_service.suppressed_kinds(session, email=email, phone=phone, external_id=external_id)
    return JSONBody({"suppressed": bool(kinds)})


@router.post("/suppressions/release", response_model=SuppressionReleased,
             responses=problems(suppressions_service.SuppressionNotFound))
async def release_suppression(payload: SuppressionRelease, session: WriteSession, caller: Eraser) -> Any:
    """Re-admit an erased person who asked to come back: the address may be added again.

    The entry keeps who released it, when, and the person's proof. Marketing still needs a new consent.
    """
    proof = payload.proof.model_dump(mode="json", exclude_none=True)
    kinds = await suppressions_service.release(session, email=payload.email, phone=payload.phone, proof=proof,
                                               actor=caller, external_id=payload.external_id)
    return JSONBody({"released": kinds})


@router.post("/retention/run", response_model=RetentionReportRead)
async def run_retention(
    payload: RetentionRun, request: Request,
    makers: Annotated[async_sessionmaker[AsyncSession], Depends(get_sessionmaker)],
    caller: Annotated[Principal, require(Scope.RETENTION_RUN)],
) -> Any:
    """Erase prospects with no activity for RETENTION_PROSPECT_DAYS (CNIL: three years); `dry_run` lists them.

    A real run commits every 1,000 people: one stopped halfway (an error answer) leaves those erased, and running
    it again erases the rest (docs/gdpr.md).
    """
    report = await gdpr_service.run_retention(
        makers, days=request.app.state.settings.retention_prospect_days, dry_run=payload.dry_run, actor=caller,
        statement_timeout=request.app.state.timeouts.worker,
    )
    ids = report.contact_ids
    return JSONBody({"dry_run": report.dry_run, "retention_days": report.retention_days, "cutoff": report.cutoff,
                     "erased": len(ids), "contact_ids": ids[:RETENTION_IDS_SHOWN],
                     "contact_ids_truncated": len(ids) > RETENTION_IDS_SHOWN})
