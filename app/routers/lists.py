"""`/v1/lists`: lists, their members, subscribe and unsubscribe."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request, Response

from app.db import ReadSession, WriteSession
from app.errors import AppError, ContactNotFound, IdempotencyKeyReused, PreconditionFailed, problems
from app.routers.deps import CursorParam, Idempotency, IfMatch, JSONBody, Links, etag, item_problem, version_receipt
from app.schemas.lists import (
    ListCreate,
    ListPage,
    ListPatch,
    ListRead,
    ListWritten,
    MemberBatch,
    MemberBatchResult,
    MemberPage,
    MemberStatus,
    MemberWritten,
    SubscribeRequest,
    present_list,
    present_member,
    present_member_receipt,
)
from app.schemas.types import Limit
from app.security import Principal, Scope, require
from app.services import lists as lists_service
from app.services.consents import ConsentRequired
from app.services.lists import DuplicateList, ListInUse, ListNotFound
from app.services.memberships import MembershipNotFound
from app.timeouts import BulkWriteSession

__all__ = ["router"]

router = APIRouter(prefix="/lists", tags=["lists"])

Reader = Annotated[Principal, require(Scope.LISTS_READ)]
Writer = Annotated[Principal, require(Scope.LISTS_WRITE)]
MemberWriter = Annotated[Principal, require(Scope.MEMBERSHIPS_WRITE)]


_MEMBER_WRITTEN = ("The membership as GET /v1/lists/{id}/members shows it; for a token without lists:read, a "
                   "MemberReceipt (list_id, contact_id, status, created)")


def _member(row: Any, caller: Principal, *, created: bool = False) -> JSONBody:
    """A membership write's answer: the stored membership (source, dates) only to a reader of lists."""
    body = present_member(row) if caller.reads(Scope.LISTS_READ) else present_member_receipt(row, created=created)
    return JSONBody(body, status_code=201 if created else 200)


def _one(row: Any, *, status_code: int = 200, headers: dict[str, str] | None = None) -> JSONBody:
    return JSONBody(present_list(row), status_code=status_code,
                    headers={"ETag": etag(row["version"]), **(headers or {})})


@router.get("", response_model=ListPage)
async def list_lists(
    session: ReadSession, request: Request, _: Reader, limit: Limit = 50, cursor: CursorParam = None
) -> Any:
    """By name."""
    rows, next_cursor = await lists_service.list_page(session, limit=limit, cursor=cursor,
                                                      codec=request.app.state.cursor_codec)
    return JSONBody({"data": [present_list(r) for r in rows], "next_cursor": next_cursor})


@router.post("", status_code=201, response_model=ListRead, responses=problems(DuplicateList, IdempotencyKeyReused))
async def create_list(payload: ListCreate, session: WriteSession, _: Writer, idem: Idempotency) -> Any:
    if idem.replay:
        return idem.replay
    row = await lists_service.create(session, payload)
    return await idem.respond(201, present_list(row),
                              {"ETag": etag(row["version"]), "Location": f"/v1/lists/{row['id']}"})


@router.get("/{list_id}", response_model=ListRead, responses=problems(ListNotFound))
async def get_list(list_id: uuid.UUID, session: ReadSession, _: Reader) -> Any:
    return _one(await lists_service.get(session, list_id))


@router.patch("/{list_id}", response_model=ListWritten,
              responses={200: {"description": "The list as GET shows it; for a token without lists:read, a "
                                              "VersionReceipt (id, version)"},
                         **problems(ListNotFound, DuplicateList, PreconditionFailed)})
async def update_list(
    list_id: uuid.UUID, patch: Annotated[ListPatch, Body()], session: WriteSession, caller: Writer,
    expected_version: IfMatch,
) -> Any:
    """Merge patch. Changing `double_opt_in` or `accepted_kinds` leaves existing memberships as they are."""
    row = await lists_service.update(session, list_id, patch, expected_version=expected_version)
    # a PATCH {} must not read the definition and its counts to a token without lists:read (security.md, 11)
    return _one(row) if caller.reads(Scope.LISTS_READ) else version_receipt("id", row["id"], row["version"])


@router.delete("/{list_id}", status_code=204, responses=problems(ListNotFound, ListInUse, PreconditionFailed))
async def delete_list(list_id: uuid.UUID, session: BulkWriteSession, _: Writer, expected_version: IfMatch) -> Response:
    """Deletes the list and its memberships; the consent ledger keeps every event. 409 `list-in-use` (with
    `segment_ids`) while a segment's filter names the list."""
    await lists_service.delete_list(session, list_id, expected_version=expected_version)
    return Response(status_code=204)


@router.get("/{list_id}/members", response_model=MemberPage, responses=problems(ListNotFound))
async def list_members(
    list_id: uuid.UUID,
    session: ReadSession,
    request: Request,
    _: Reader,
    status: MemberStatus | None = None,
    limit: Limit = 50,
    cursor: CursorParam = None,
) -> Any:
    """In contact_id order."""
    rows, next_cursor = await lists_service.members_page(
        session, list_id, status=status.value if status else None, limit=limit, cursor=cursor,
        codec=request.app.state.cursor_codec,
    )
    return JSONBody({"data": [present_member(r) for r in rows], "next_cursor": next_cursor})


@router.put(
    "/{list_id}/members/{contact_id}",
    response_model=MemberWritten,
    responses={200: {"description": _MEMBER_WRITTEN},
               201: {"description": f"Created. {_MEMBER_WRITTEN}", "model": MemberWritten},
               **problems(ListNotFound, ContactNotFound, ConsentRequired)},
)
async def subscribe_member(
    list_id: uuid.UUID,
    contact_id: uuid.UUID,
    session: WriteSession,
    caller: MemberWriter,
    links: Links,
    payload: Annotated[SubscribeRequest | None, Body()] = None,
) -> Any:
    """Subscribe: `subscribed`, or `pending` on a double opt-in list until the emailed link is followed.

    Needs a mailable email, a kind the list accepts, and a current email_marketing consent: on the ledger
    or given here in `consent` (recorded as a `granted` event). After an unsubscribe from this list or a
    withdrawal, only a consent dated after it will do (422 `consent_required` otherwise).
    """
    done = await lists_service.subscribe(session, list_id, contact_id, payload or SubscribeRequest(),
                                         actor=caller, links=links)
    return _member(done.row, caller, created=done.created)


@router.delete(
    "/{list_id}/members/{contact_id}",
    response_model=MemberWritten,
    responses={200: {"description": _MEMBER_WRITTEN}, **problems(ListNotFound, ContactNotFound, MembershipNotFound)},
)
async def unsubscribe_member(
    list_id: uuid.UUID, contact_id: uuid.UUID, session: WriteSession, caller: MemberWriter
) -> Any:
    """Unsubscribe from this list only: the membership stays, `unsubscribed`; other lists are untouched."""
    return _member(await lists_service.unsubscribe(session, list_id, contact_id), caller)


@router.post("/{list_id}/members/batch", response_model=MemberBatchResult,
             responses=problems(ListNotFound, IdempotencyKeyReused))
async def batch_members(
    list_id: uuid.UUID, payload: MemberBatch, session: WriteSession, caller: MemberWriter, links: Links,
    idem: Idempotency,
) -> Any:
    """Up to 1,000 adds and removes; each item succeeds or fails alone. Adds need a consent on the ledger."""
    if idem.replay:
        return idem.replay
    await lists_service.lock(session, list_id)
    await lists_service.lock_contacts(session, [*payload.add, *payload.remove])
    results: list[dict[str, Any]] = []
    request = SubscribeRequest(source=payload.source)
    for op, contact_id in [*(("add", c) for c in payload.add), *(("remove", c) for c in payload.remove)]:
        item: dict[str, Any] = {"index": len(results), "op": op, "contact_id": contact_id}
        try:
            async with session.begin_nested():
                if op == "add":
                    row = (await lists_service.subscribe(session, list_id, contact_id, request, actor=caller,
                                                         links=links)).row
                else:
                    row = await lists_service.unsubscribe(session, list_id, contact_id)
        except AppError as exc:
            results.append({**item, "status": "error", "error": item_problem(exc)})
        else:
            results.append({**item, "status": row["status"]})
    errors = sum(r["status"] == "error" for r in results)
    return await idem.respond(200, {"results": results, "succeeded": len(results) - errors, "errors": errors})

