"""`GET /v1/contacts/{contact_id}/timeline`."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from app.access import reveal
from app.db import ReadSession
from app.errors import ContactNotFound, problems
from app.routers.deps import JSONBody
from app.schemas.history import present_history
from app.schemas.types import Limit
from app.security import Principal, Scope, require
from app.security.masking import mask_json
from app.services import timeline as timeline_service

__all__ = ["router"]

router = APIRouter(prefix="/contacts", tags=["contacts"])


class TimelineEntry(BaseModel):
    kind: str = Field(description="order, cart, event, consent, list_subscribed, list_unsubscribed or change")
    at: datetime
    ref: str
    data: dict[str, Any]


class TimelinePage(BaseModel):
    data: list[TimelineEntry]
    next_cursor: str | None


@router.get("/{contact_id}/timeline", response_model=TimelinePage, responses=problems(ContactNotFound))
async def get_contact_timeline(
    contact_id: uuid.UUID,
    request: Request,
    session: ReadSession,
    caller: Annotated[Principal, require(Scope.CONTACTS_READ, Scope.ORDERS_READ, Scope.EVENTS_READ,
                                         Scope.CONSENTS_READ)],
    limit: Limit = 50,
    cursor: Annotated[str | None, Query(max_length=1000)] = None,
) -> Any:
    """Orders, carts (at their opening, with their current status), events, consent events,
    list subscriptions and field changes, newest first."""
    rows, next_cursor = await timeline_service.page(session, contact_id, limit=limit, cursor=cursor,
                                                    codec=request.app.state.cursor_codec)
    for row in rows:
        if row["kind"] == "change":  # field changes are masked like the history they come from
            masked = present_history({**row["data"], "id": 0, "at": row["at"], "contact_id": contact_id},
                                     reveal_pii=caller.sees_pii)
            row["data"] = {k: masked[k] for k in row["data"]}
        elif row["kind"] == "event" and not caller.sees_pii:  # free-form: masked like GET .../events
            row["data"] = {**row["data"], "properties": mask_json(row["data"]["properties"])}
    if rows and (caller.sees_pii or any(row["kind"] in ("order", "cart") for row in rows)):  # never masked
        reveal(contact_id)
    return JSONBody({"data": rows, "next_cursor": next_cursor})
