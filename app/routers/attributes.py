"""`/v1/attributes` and `/v1/tags`: the definitions contacts are checked against."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Response

from app.db import ReadSession, WriteSession
from app.errors import (
    AttributeInUse,
    AttributeNotFound,
    DuplicateAttribute,
    IdempotencyKeyReused,
    PreconditionFailed,
    TagNotFound,
    problems,
)
from app.routers.deps import Idempotency, IfMatch, JSONBody, etag, version_receipt
from app.schemas.attributes import (
    AttributeCreate,
    AttributePatch,
    AttributeRead,
    AttributeReceipt,
    TagCreate,
    TagRead,
)
from app.schemas.types import AttributeName, TagName
from app.security import Principal, Scope, require
from app.services import attributes as attributes_service
from app.services import tags as tags_service
from app.timeouts import BulkWriteSession

__all__ = ["attributes_router", "tags_router"]

attributes_router = APIRouter(prefix="/attributes", tags=["attributes"])
tags_router = APIRouter(prefix="/tags", tags=["tags"])

Reader = Annotated[Principal, require(Scope.CONTACTS_READ)]


def _etag(row: dict[str, Any]) -> dict[str, str]:
    return {"ETag": etag(attributes_service.definition_version(row))}


@attributes_router.get("", response_model=list[AttributeRead])
async def list_attributes(session: ReadSession, _: Reader) -> Any:
    """Every definition, by name: a bare array, not a cursor page (a small catalogue; docs/decisions.md)."""
    return JSONBody(await attributes_service.list_all(session))


@attributes_router.post("", status_code=201, response_model=AttributeRead,
                        responses=problems(DuplicateAttribute, IdempotencyKeyReused))
async def create_attribute(
    payload: AttributeCreate,
    session: WriteSession,
    _: Annotated[Principal, require(Scope.ATTRIBUTES_WRITE)],
    idem: Idempotency,
) -> Any:
    if idem.replay:
        return idem.replay
    row = await attributes_service.create(session, payload)
    return await idem.respond(201, row, _etag(row))


@attributes_router.get("/{name}", response_model=AttributeRead, responses=problems(AttributeNotFound))
async def get_attribute(name: AttributeName, session: ReadSession, _: Reader) -> Any:
    """The definition with its `ETag` (opaque: it moves with every change), for `If-Match` on PATCH and DELETE."""
    row = await attributes_service.get(session, name)
    return JSONBody(row, headers=_etag(row))


@attributes_router.patch("/{name}", response_model=AttributeRead | AttributeReceipt,
                         responses={200: {"description": "The definition as GET shows it; for a token without "
                                                         "contacts:read, an AttributeReceipt (name, version)"},
                                    **problems(AttributeNotFound, PreconditionFailed)})
async def update_attribute(
    name: AttributeName,
    patch: AttributePatch,
    session: WriteSession,
    caller: Annotated[Principal, require(Scope.ATTRIBUTES_WRITE)],
    expected_version: IfMatch,
) -> Any:
    row = await attributes_service.update_definition(session, name, patch, expected_version=expected_version,
                                                     actor=caller)
    if caller.reads(Scope.CONTACTS_READ):
        return JSONBody(row, headers=_etag(row))
    # a PATCH {} must not read the definition to a token without contacts:read (security.md, 11)
    return version_receipt("name", row["name"], attributes_service.definition_version(row))


@attributes_router.delete("/{name}", status_code=204,
                          responses=problems(AttributeNotFound, AttributeInUse, PreconditionFailed))
async def delete_attribute(
    name: AttributeName, session: WriteSession, caller: Annotated[Principal, require(Scope.ATTRIBUTES_WRITE)],
    expected_version: IfMatch,
) -> Response:
    """Refused (409) while any contact holds a value for it: deleting never drops data silently."""
    await attributes_service.delete_definition(session, name, expected_version=expected_version, actor=caller)
    return Response(status_code=204)


@tags_router.get("", response_model=list[TagRead])
async def list_tags(session: ReadSession, _: Reader) -> Any:
    """The whole catalogue, by name: a bare array, not a cursor page (a small catalogue; docs/decisions.md)."""
    return JSONBody(await tags_service.list_all(session))


@tags_router.post("", status_code=201, response_model=TagRead,
                  responses=problems(tags_service.DuplicateTag, IdempotencyKeyReused))
async def create_tag(
    payload: TagCreate, session: WriteSession, _: Annotated[Principal, require(Scope.TAGS_WRITE)], idem: Idempotency
) -> Any:
    if idem.replay:
        return idem.replay
    return await idem.respond(201, await tags_service.create(session, payload))


@tags_router.delete("/{name}", status_code=204, responses=problems(TagNotFound))
async def delete_tag(
    name: TagName, session: BulkWriteSession, caller: Annotated[Principal, require(Scope.TAGS_DELETE)]
) -> Response:
    """Deletes the tag and takes it off every contact (each recorded in that contact's history)."""
    await tags_service.delete_tag(session, name, actor=caller)
    return Response(status_code=204)
