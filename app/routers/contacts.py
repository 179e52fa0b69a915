"""`/v1/contacts`: translate HTTP to contact use cases and back."""

from __future__ import annotations

import contextlib
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request
from pydantic import ValidationError

from app.access import note
from app.db import BareConnection, ReadSession, WriteSession, bare_connection
from app.errors import (
    ContactNotFound,
    DuplicateContact,
    IdempotencyKeyReused,
    MissingScope,
    PreconditionFailed,
    problems,
)
from app.routers.deps import CursorParam, Idempotency, IfMatch, JSONBody, etag, run_each
from app.schemas.contacts import (
    MASKED_SORTS,
    WRITTEN,
    BatchResult,
    ContactBatch,
    ContactCreate,
    ContactKind,
    ContactPage,
    ContactPatch,
    ContactRead,
    ContactSort,
    ContactUpsert,
    ContactWritten,
    LifecycleStage,
    present_contact,
    present_receipt,
)
from app.schemas.history import HistoryPage, present_history
from app.schemas.types import CountryCode, Email, Limit, QueryTimestamp, SearchText, TagName
from app.security import Principal, Scope, require
from app.security.costly import COSTLY_PROBLEMS, costly_read
from app.security.principal import check_member_filters
from app.services import contacts as contacts_service
from app.services import history as history_service
from app.services import journal as journal_service
from app.services import lists as lists_service
from app.services import segments as segments_service
from app.services.suppressions import SuppressedContact

__all__ = ["contact_response", "router", "upsert_in_autocommit", "written"]

router = APIRouter(prefix="/contacts", tags=["contacts"])

Reader = Annotated[Principal, require(Scope.CONTACTS_READ)]
Writer = Annotated[Principal, require(Scope.CONTACTS_WRITE)]


def _upsert_or_raw(item: Any) -> Any:
    """A batch item validated once, as an upsert; an invalid one as it came (run_each reports why, in its result)."""
    try:
        return ContactUpsert.model_validate(item)
    except ValidationError:
        return item


def written(row: Any, caller: Principal, *, created: bool = False) -> dict[str, Any]:
    """What a contacts write answers: the contact as the caller may read it (masked without pii:read), or, to a
    token without contacts:read, a receipt: a write must not read what the token's scopes deny (security.md, 11)."""
    if caller.reads(Scope.CONTACTS_READ):
        return present_contact(row, reveal_pii=caller.sees_pii)
    return present_receipt(row, created=created)


def contact_response(row: Any, caller: Principal, *, status_code: int = 200, created: bool = False) -> JSONBody:
    """One contact as the caller may see it, with its ETag (app.fastpath answers GET with this too)."""
    return JSONBody(written(row, caller, created=created), status_code=status_code,
                    headers={"ETag": etag(row["version"])})


_WRITTEN = {200: {"description": WRITTEN}}


@router.post("", status_code=201, response_model=ContactWritten,
             responses={201: {"description": WRITTEN},
                        **problems(DuplicateContact, SuppressedContact, IdempotencyKeyReused)})
async def create_contact(payload: ContactCreate, session: WriteSession, caller: Writer, idem: Idempotency) -> Any:
    if idem.replay:
        return idem.replay
    row = await contacts_service.create(session, payload, actor=caller)
    return await idem.respond(201, written(row, caller, created=True),
                              {"ETag": etag(row["version"]), "Location": f"/v1/contacts/{row['id']}"})


@router.post("/upsert", response_model=ContactWritten,
             responses={200: {"description": f"Updated. {WRITTEN}"},
                        201: {"description": f"Created. {WRITTEN}", "model": ContactWritten},
                        **problems(DuplicateContact, SuppressedContact)})
async def upsert_contact(
    payload: ContactUpsert, request: Request, session: WriteSession, caller: Writer, idem: Idempotency
) -> Any:
    if idem.replay:
        return idem.replay
    if idem.key is None:  # a keyed request keeps its key row in the same transaction: full path
        done = await upsert_in_autocommit(request, payload, caller)
        if done is not None:
            return done
    result = await contacts_service.upsert(session, payload, actor=caller)
    return await idem.respond(201 if result.created else 200, written(result.row, caller, created=result.created),
                              {"ETag": etag(result.row["version"])})


async def upsert_in_autocommit(request: Request, payload: ContactUpsert, caller: Principal) -> JSONBody | None:
    """The upsert in one autocommit statement (`contacts.fast_upsert`); None: the transactional path.

    app.fastpath answers POST /v1/contacts/upsert with this too.
    """
    async with bare_connection(request) as connection:  # released before the session takes one
        done = await contacts_service.fast_upsert(connection, payload, actor=caller)
    if done is None:
        return None
    return contact_response(done.row, caller, status_code=201 if done.created else 200, created=done.created)


@router.post("/batch", response_model=BatchResult, responses=problems(IdempotencyKeyReused))
async def batch_upsert_contacts(payload: ContactBatch, session: WriteSession, caller: Writer, idem: Idempotency) -> Any:
    """Up to 1,000 upserts; each item succeeds or fails alone (a savepoint each)."""
    if idem.replay:
        return idem.replay
    async def upsert(item: ContactUpsert) -> tuple[str, Any]:
        done = await contacts_service.upsert(session, item, actor=caller)
        return ("created" if done.created else "updated"), done.row["id"]

    items = [_upsert_or_raw(item) for item in payload.items]
    await contacts_service.lock_batch(session, [item for item in items if isinstance(item, ContactUpsert)])
    results = await run_each(session, items, ContactUpsert, upsert)
    counts = {s: sum(r["status"] == s for r in results) for s in ("created", "updated", "error")}
    body = {"results": results, "created": counts["created"], "updated": counts["updated"], "errors": counts["error"]}
    return await idem.respond(200, body)


@router.get("", response_model=ContactPage,
            responses=problems(segments_service.SegmentNotFound, lists_service.ListNotFound, *COSTLY_PROBLEMS))
async def list_contacts(
    session: ReadSession,
    request: Request,
    caller: Reader,
    q: Annotated[SearchText | None, Query(
        description="Words matching the start of a name, company or email; or a phone number. Needs pii:read")] = None,
    email: Annotated[Email | None, Query(description="Exact (normalized) email. Needs pii:read")] = None,
    external_id: SearchText | None = None,
    tag: Annotated[list[TagName], Query(max_length=20, description="Repeatable: contacts holding every tag, at most "
                                                                    "20")] = [],  # noqa: B006
    list_id: Annotated[uuid.UUID | None, Query(alias="list", description="Subscribed members of this list. Needs "
                                                                        "lists:read")] = None,
    kind: ContactKind | None = None,
    lifecycle_stage: LifecycleStage | None = None,
    city: SearchText | None = None,
    postal_code: SearchText | None = None,
    country: CountryCode | None = None,
    created_after: QueryTimestamp | None = None,
    updated_after: QueryTimestamp | None = None,
    segment_id: Annotated[uuid.UUID | None, Query(alias="segment", description="Contacts matching this segment. "
                                                                              "Needs segments:read")] = None,
    sort: Annotated[ContactSort, Query(description="`last_name`, `-last_name`: need pii:read")] = (
        ContactSort.CREATED_AT_DESC),
    limit: Limit = 50,
    cursor: CursorParam = None,
) -> Any:
    # A search on, or an order of, masked values would let a masked reader recover them by probing.
    if (q or email or sort in MASKED_SORTS) and not caller.sees_pii:
        raise MissingScope("searching by q or email, or sorting by last_name, reveals personal data: pii:read is "
                           "needed", missing_scopes=[Scope.PII_READ.value])
    check_member_filters(caller, segment_id=segment_id, list_id=list_id)
    # `segment` may have to scan every contact: a costly read then (429/503 past the caps, its own timeout)
    costly = (costly_read(request, caller, session, kind="a page of a segment's contacts") if segment_id
              else contextlib.nullcontext())
    async with costly:
        if list_id is not None:
            await lists_service.ensure_exists(session, list_id)
        filters = contacts_service.ContactFilters(
            q=q, email=email, external_id=external_id, tags=tag, list_id=list_id, kind=kind,
            lifecycle_stage=lifecycle_stage, city=city, postal_code=postal_code, country=country,
            created_after=created_after, updated_after=updated_after,
            segment_condition=await segments_service.segment_condition(session, segment_id) if segment_id else None,
        )
        rows, next_cursor = await contacts_service.list_page(
            session, filters, sort=sort, limit=limit, cursor=cursor, codec=request.app.state.cursor_codec
        )
    # The searched values that name a person become keyed digests: the entry outlives an erasure of that person.
    note(filter=journal_service.search_detail(request.query_params, hidden=("q", "email", "external_id"),
                                              drop=("cursor",)))
    return JSONBody({"data": [present_contact(r, reveal_pii=caller.sees_pii) for r in rows],
                     "next_cursor": next_cursor})


@router.get("/{contact_id}", response_model=ContactRead, responses=problems(ContactNotFound))
async def get_contact(contact_id: uuid.UUID, connection: BareConnection, caller: Reader) -> Any:
    return contact_response(await contacts_service.get_fast(connection, contact_id), caller)


@router.patch(
    "/{contact_id}",
    response_model=ContactWritten,
    responses={**_WRITTEN, **problems(ContactNotFound, DuplicateContact, PreconditionFailed)},
    openapi_extra={"requestBody": {"content": {"application/merge-patch+json": {
        "schema": {"$ref": "#/components/schemas/ContactPatch"}}}}},
)
async def update_contact(
    contact_id: uuid.UUID,
    patch: Annotated[ContactPatch, Body()],
    session: WriteSession,
    caller: Writer,
    expected_version: IfMatch,
) -> Any:
    """JSON merge patch (RFC 7396): absent fields are untouched, null clears a field."""
    row = await contacts_service.update(session, contact_id, patch, actor=caller, expected_version=expected_version)
    return contact_response(row, caller)


@router.get("/{contact_id}/history", response_model=HistoryPage, responses=problems(ContactNotFound))
async def get_contact_history(
    contact_id: uuid.UUID,
    session: ReadSession,
    caller: Reader,
    limit: Limit = 50,
    cursor: Annotated[str | None, Query(max_length=40, pattern=r"^[0-9]+$")] = None,
) -> Any:
    await contacts_service.get(session, contact_id)
    rows = await history_service.page(session, contact_id, limit=limit, before_id=history_service.id_cursor(cursor))
    next_cursor = str(rows[limit - 1]["id"]) if len(rows) > limit else None
    return JSONBody({"data": [present_history(r, reveal_pii=caller.sees_pii) for r in rows[:limit]],
                     "next_cursor": next_cursor})


@router.put("/{contact_id}/tags/{name}", response_model=ContactWritten,
            responses={**_WRITTEN, **problems(ContactNotFound, PreconditionFailed)})
async def add_contact_tag(
    contact_id: uuid.UUID, name: TagName, session: WriteSession, caller: Writer, expected_version: IfMatch
) -> Any:
    """Idempotent; the tag is added to the catalogue on first use."""
    row = await contacts_service.add_tag(session, contact_id, name, actor=caller, expected_version=expected_version)
    return contact_response(row, caller)


@router.delete("/{contact_id}/tags/{name}", response_model=ContactWritten,
               responses={**_WRITTEN, **problems(ContactNotFound, PreconditionFailed)})
async def remove_contact_tag(
    contact_id: uuid.UUID, name: TagName, session: WriteSession, caller: Writer, expected_version: IfMatch
) -> Any:
    row = await contacts_service.remove_tag(session, contact_id, name, actor=caller, expected_version=expected_version)
    return contact_response(row, caller)
