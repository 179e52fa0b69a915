"""`/v1/erasure-requests`: what people asked for in the preference center, for an admin to answer."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request

from app.db import ReadSession, WriteSession
from app.errors import ContactNotFound, problems
from app.routers.deps import CursorParam, JSONBody
from app.schemas.erasure_requests import (
    ErasureRequestPage,
    ErasureRequestRead,
    Refusal,
    present_request,
)
from app.schemas.types import Limit
from app.security import Principal, Scope, require
from app.services import erasure_requests as requests_service
from app.services.erasure_requests import ErasureRequestClosed, ErasureRequestNotFound

__all__ = ["router"]

router = APIRouter(prefix="/erasure-requests", tags=["gdpr"])

Eraser = Annotated[Principal, require(Scope.CONTACTS_ERASE)]


@router.get("", response_model=ErasureRequestPage)
async def list_erasure_requests(
    session: ReadSession, request: Request, caller: Eraser,
    status: Annotated[Literal["open", "completed", "refused", "all"], Query(description="Default: open")] = "open",
    limit: Limit = 50, cursor: CursorParam = None,
) -> Any:
    """Oldest first (the first due): who asked, when, by when the answer is due, and what was answered."""
    rows, next_cursor = await requests_service.page(
        session, status=None if status == "all" else status, limit=limit, cursor=cursor,
        codec=request.app.state.cursor_codec)
    return JSONBody({"data": [present_request(r, reveal_pii=caller.sees_pii) for r in rows],
                     "next_cursor": next_cursor})


@router.get("/{request_id}", response_model=ErasureRequestRead, responses=problems(ErasureRequestNotFound))
async def get_erasure_request(request_id: uuid.UUID, session: ReadSession, caller: Eraser) -> Any:
    return JSONBody(present_request(await requests_service.get(session, request_id), reveal_pii=caller.sees_pii))


@router.post("/{request_id}/complete", response_model=ErasureRequestRead,
             responses=problems(ErasureRequestNotFound, ErasureRequestClosed, ContactNotFound))
async def complete_erasure_request(request_id: uuid.UUID, session: WriteSession, caller: Eraser) -> Any:
    """Erase the person now (exactly as DELETE /v1/contacts/{id}, docs/gdpr.md) and close the request."""
    row = await requests_service.complete(session, request_id, actor=caller)
    return JSONBody(present_request(row, reveal_pii=caller.sees_pii))


@router.post("/{request_id}/refuse", response_model=ErasureRequestRead,
             responses=problems(ErasureRequestNotFound, ErasureRequestClosed))
async def refuse_erasure_request(request_id: uuid.UUID, payload: Refusal, session: WriteSession,
                                 caller: Eraser) -> Any:
    """Close the request without erasing, with the reason (art. 17(3)); the person's data stays."""
    row = await requests_service.refuse(session, request_id, actor=caller, note=payload.note)
    return JSONBody(present_request(row, reveal_pii=caller.sees_pii))
