"""`/v1/segments`: saved dynamic filters, their count and members, and a preview of an unsaved filter."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request, Response

from app.access import note
from app.db import ReadSession, ReplicaSession, WriteSession
from app.errors import IdempotencyKeyReused, InvalidInput, MissingScope, PreconditionFailed, problems
from app.routers.deps import CursorParam, Idempotency, IfMatch, JSONBody, etag, version_receipt
from app.schemas.contacts import ContactPage, present_contact
from app.schemas.segments import (
    SegmentCreate,
    SegmentMemberCount,
    SegmentPage,
    SegmentPatch,
    SegmentPreview,
    SegmentPreviewRequest,
    SegmentRead,
    SegmentWritten,
    present_segment,
)
from app.schemas.types import Limit
from app.security import Principal, Scope, require
from app.security.costly import COSTLY_PROBLEMS, costly
from app.services import journal as journal_service
from app.services import segments as segments_service
from app.services.segments import DuplicateSegment, SegmentInUse, SegmentNotFound
from app.timeouts import costly_connection, session_within

__all__ = ["router"]

router = APIRouter(prefix="/segments", tags=["segments"])

Reader = Annotated[Principal, require(Scope.SEGMENTS_READ)]
Writer = Annotated[Principal, require(Scope.SEGMENTS_WRITE)]
# Counts, previews and member pages may scan every contact: a costly-read slot each (app.security.costly).
CostlyReader = Annotated[Principal, costly(Scope.SEGMENTS_READ)]
# Members are contacts: reading them needs contacts:read as well (masked without pii:read).
MemberReader = Annotated[Principal, costly(Scope.SEGMENTS_READ, Scope.CONTACTS_READ)]
PREVIEW_SIZE = 20
KIND = "a count, preview or member page"


@router.get("", response_model=SegmentPage)
async def list_segments(
    session: ReadSession, request: Request, _: Reader, limit: Limit = 50, cursor: CursorParam = None
) -> Any:
    """By name."""
    rows, next_cursor = await segments_service.list_page(session, limit=limit, cursor=cursor,
                                                         codec=request.app.state.cursor_codec)
    return JSONBody({"data": [present_segment(r) for r in rows], "next_cursor": next_cursor})


@router.post("", status_code=201, response_model=SegmentRead,
             responses=problems(DuplicateSegment, IdempotencyKeyReused))
async def create_segment(payload: SegmentCreate, session: WriteSession, caller: Writer, idem: Idempotency) -> Any:
    """An invalid filter is a 422 whose `errors[].field` is the JSON path of the faulty part. A filter on
    `attributes.*` needs contacts:read as well (403 otherwise)."""
    if idem.replay:
        return idem.replay
    _check_attributes_readable(caller, payload.filter)
    row = await segments_service.create(session, name=payload.name, filter_=payload.filter,
                                        description=payload.description)
    return await idem.respond(201, present_segment(row),
                              {"ETag": etag(row["version"]), "Location": f"/v1/segments/{row['id']}"})


@router.post("/preview", response_model=SegmentPreview, responses=problems(*COSTLY_PROBLEMS))
async def preview_segment(
    payload: SegmentPreviewRequest, session: ReplicaSession, request: Request, caller: MemberReader
) -> Any:
    """Count and first page (at most 20 contacts, id order) of a filter, without saving it."""
    async with session_within(session, request.app.state.timeouts.costly, kind=KIND):
        condition, total = await segments_service.preview(session, payload.filter)
        rows, _next = await segments_service.contacts_page(session, condition, limit=PREVIEW_SIZE, cursor=None,
                                                           codec=request.app.state.cursor_codec)
    note(count=total, filter_sha256=journal_service.fingerprint(payload.filter))  # the filter may hold an address
    return JSONBody({"count": total, "data": [present_contact(r, reveal_pii=caller.sees_pii) for r in rows]})


def _check_attributes_readable(caller: Principal, filter_: Any) -> None:
    """A filter naming `attributes.<name>` is saved or refused (422 `unknown_attribute`, ops by the attribute's
    type) as the definitions say: name by name, an oracle of a catalogue read with contacts:read. Refused to a
    token without it before any definition is read, the same for a defined name and an unknown one (security.md,
    classes 8 and 11). The preview and member pages need contacts:read already."""
    if not caller.reads(Scope.CONTACTS_READ) and segments_service.mentions_attributes(filter_):
        raise MissingScope("a filter on attributes.* tells which attributes are defined and their types: "
                           "contacts:read is needed", missing_scopes=[Scope.CONTACTS_READ.value])


def _one(row: Any) -> JSONBody:
    return JSONBody(present_segment(row), headers={"ETag": etag(row["version"])})


@router.get("/{segment_id}", response_model=SegmentRead, responses=problems(SegmentNotFound))
async def get_segment(segment_id: uuid.UUID, session: ReadSession, _: Reader) -> Any:
    return _one(await segments_service.get(session, segment_id))


@router.patch("/{segment_id}", response_model=SegmentWritten,
              responses={200: {"description": "The segment as GET shows it; for a token without segments:read, a "
                                              "VersionReceipt (id, version)"},
                         **problems(SegmentNotFound, DuplicateSegment, PreconditionFailed)})
async def update_segment(
    segment_id: uuid.UUID, patch: Annotated[SegmentPatch, Body()], session: WriteSession, caller: Writer,
    expected_version: IfMatch,
) -> Any:
    """Merge patch of name, description and filter (on `attributes.*`: needs contacts:read as well)."""
    changes = patch.model_dump(exclude_unset=True)
    _check_attributes_readable(caller, changes.get("filter"))
    row = await segments_service.update(session, segment_id, changes, expected_version=expected_version)
    # a PATCH {} must not read the definition to a token without segments:read (security.md, 11)
    return _one(row) if caller.reads(Scope.SEGMENTS_READ) else version_receipt("id", row["id"], row["version"])


@router.delete("/{segment_id}", status_code=204,
               responses=problems(SegmentNotFound, SegmentInUse, PreconditionFailed))
async def delete_segment(
    segment_id: uuid.UUID, session: WriteSession, caller: Writer, expected_version: IfMatch
) -> Response:
    await segments_service.delete_segment(session, segment_id, expected_version=expected_version, actor=caller)
    return Response(status_code=204)


@router.get("/{segment_id}/count", response_model=SegmentMemberCount,
            responses=problems(SegmentNotFound, InvalidInput, *COSTLY_PROBLEMS))
async def count_segment(segment_id: uuid.UUID, request: Request, _: CostlyReader) -> Any:
    # one statement, one round trip, on a costly-read connection (the replica's when there is one)
    async with costly_connection(request, kind=KIND) as connection:
        total = await segments_service.count_stored(connection, segment_id)
    return JSONBody({"count": total})


@router.get("/{segment_id}/contacts", response_model=ContactPage,
            responses=problems(SegmentNotFound, InvalidInput, *COSTLY_PROBLEMS))
async def segment_contacts(
    segment_id: uuid.UUID,
    session: ReplicaSession,
    request: Request,
    caller: MemberReader,
    limit: Limit = 50,
    cursor: CursorParam = None,
) -> Any:
    """The matching contacts now, in id order (masked without pii:read)."""
    async with session_within(session, request.app.state.timeouts.costly, kind=KIND):
        condition = await segments_service.segment_condition(session, segment_id)
        rows, next_cursor = await segments_service.contacts_page(session, condition, limit=limit, cursor=cursor,
                                                                 codec=request.app.state.cursor_codec)
    note(segment_id=segment_id)
    return JSONBody({"data": [present_contact(r, reveal_pii=caller.sees_pii) for r in rows],
                     "next_cursor": next_cursor})
