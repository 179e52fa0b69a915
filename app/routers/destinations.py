"""`/v1/destinations` and `/v1/deliveries`: where changes go, and what each destination is owed."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Request, Response

from app.db import ReadSession, WriteSession
from app.errors import IdempotencyKeyReused, PreconditionFailed, problems
from app.routers.deps import CursorParam, Idempotency, IfMatch, JSONBody, etag, version_receipt
from app.schemas.destinations import (
    DeliveryPage,
    DeliveryRead,
    DeliveryStatus,
    DeliveryWritten,
    DestinationCreate,
    DestinationCreated,
    DestinationPage,
    DestinationPatch,
    DestinationRead,
    DestinationWritten,
    ResyncResult,
)
from app.schemas.types import Limit
from app.security import Principal, Role, Scope, require
from app.services import destinations as service
from app.services.destinations import (
    DeliveryNotFound,
    DestinationNotFound,
    DestinationOwesErasures,
    DuplicateDestination,
)
from app.timeouts import BulkWriteSession

__all__ = ["deliveries_router", "router"]

router = APIRouter(prefix="/destinations", tags=["sync"])
deliveries_router = APIRouter(prefix="/deliveries", tags=["sync"])

Reader = Annotated[Principal, require(Scope.DESTINATIONS_READ)]
Writer = Annotated[Principal, require(Scope.DESTINATIONS_WRITE)]


async def _present(session: Any, request: Request, row: Any) -> dict[str, Any]:
    state = request.app.state
    return await service.describe(session, row, box=state.secret_box, public_base_url=state.settings.public_base_url)


@router.get("", response_model=DestinationPage)
async def list_destinations(
    session: ReadSession, request: Request, _: Reader, limit: Limit = 50, cursor: CursorParam = None
) -> Any:
    """By name. Secrets are never shown; `secrets_set` names the ones stored."""
    rows, next_cursor = await service.list_page(session, limit=limit, cursor=cursor,
                                                codec=request.app.state.cursor_codec)
    return JSONBody({"data": [await _present(session, request, r) for r in rows], "next_cursor": next_cursor})


@router.post("", status_code=201, response_model=DestinationCreated,
             responses=problems(DuplicateDestination, IdempotencyKeyReused))
async def create_destination(
    payload: DestinationCreate, session: WriteSession, request: Request, caller: Writer, idem: Idempotency
) -> Any:
    """`generated_secrets` holds what Carnet made (`inbound_secret`, the webhook `secret`): shown this once only,
    and to an admin only (API.md: a manager never sees secrets; one who needs to know them gives them in
    `config`). An idempotent replay answers without them.
    """
    if idem.replay:
        return idem.replay
    row, generated = await service.create(session, payload, box=request.app.state.secret_box, actor=caller)
    body = await _present(session, request, row)
    headers = {"ETag": etag(row["version"]), "Location": f"/v1/destinations/{row['id']}"}
    await idem.respond(201, {**body, "generated_secrets": {}}, headers)  # stored for replays: no secret kept
    shown = generated if caller.role is Role.ADMIN else {}
    return JSONBody({**body, "generated_secrets": shown}, status_code=201, headers=headers)


@router.get("/{destination_id}", response_model=DestinationRead, responses=problems(DestinationNotFound))
async def get_destination(destination_id: uuid.UUID, session: ReadSession, request: Request, _: Reader) -> Any:
    row = await service.get(session, destination_id)
    return JSONBody(await _present(session, request, row), headers={"ETag": etag(row["version"])})


@router.patch("/{destination_id}", response_model=DestinationWritten,
              responses={200: {"description": "The destination as GET shows it (no secrets); for a token without "
                                              "destinations:read, a VersionReceipt (id, version)"},
                         **problems(DestinationNotFound, DuplicateDestination, PreconditionFailed)})
async def update_destination(
    destination_id: uuid.UUID, patch: Annotated[DestinationPatch, Body()], session: WriteSession,
    request: Request, caller: Writer, expected_version: IfMatch,
) -> Any:
    """Merge patch. Re-enabling a destination clears its failure count and `disabled_reason`."""
    row = await service.update(session, destination_id, patch, box=request.app.state.secret_box,
                               expected_version=expected_version, actor=caller)
    if not caller.reads(Scope.DESTINATIONS_READ):  # a PATCH {} must not read it (docs/security.md, class 11)
        return version_receipt("id", row["id"], row["version"])
    return JSONBody(await _present(session, request, row), headers={"ETag": etag(row["version"])})


@router.delete("/{destination_id}", status_code=204,
               responses=problems(DestinationNotFound, DestinationOwesErasures, PreconditionFailed))
async def delete_destination(
    destination_id: uuid.UUID, session: BulkWriteSession, caller: Writer, expected_version: IfMatch
) -> Response:
    """Stops every delivery to it; what the vendor already holds stays there."""
    await service.delete_destination(session, destination_id, expected_version=expected_version, actor=caller)
    return Response(status_code=204)


@router.get("/{destination_id}/deliveries", response_model=DeliveryPage, responses=problems(DestinationNotFound))
async def list_deliveries(
    destination_id: uuid.UUID, session: ReadSession, request: Request, _: Reader,
    status: DeliveryStatus | None = None, limit: Limit = 50, cursor: CursorParam = None,
) -> Any:
    """Newest first. Delivered ones are listed for `OUTBOX_KEEP_DELIVERED_HOURS` (72 by default) after delivery,
    then purged; pending, in-flight and dead ones until they are delivered."""
    rows, next_cursor = await service.deliveries_page(
        session, destination_id, status=status.value if status else None, limit=limit, cursor=cursor,
        codec=request.app.state.cursor_codec)
    return JSONBody({"data": [_delivery(r) for r in rows], "next_cursor": next_cursor})


@router.post("/{destination_id}/resync", status_code=202, response_model=ResyncResult,
             responses=problems(DestinationNotFound))
async def resync_destination(destination_id: uuid.UUID, session: BulkWriteSession, caller: Writer) -> Any:
    """Queue a full push of every contact of the mapped lists (vendors only)."""
    return JSONBody({"queued": await service.resync(session, destination_id, actor=caller)}, status_code=202)


@deliveries_router.post("/{delivery_id}/retry", response_model=DeliveryWritten,
                        responses={200: {"description": "The delivery as GET .../deliveries lists it; for a token "
                                                        "without destinations:read, a DeliveryReceipt (id, status)"},
                                   **problems(DeliveryNotFound)})
async def retry_delivery(
    delivery_id: Annotated[int, Path(ge=1, le=2**63 - 1)], session: WriteSession, caller: Writer
) -> Any:
    """A dead delivery goes back in the queue now with a fresh count of attempts (delivered ones stay)."""
    row = await service.retry_delivery(session, delivery_id)
    # ids are sequential: the sync log's records are destinations:read's to read (docs/security.md, class 11)
    return JSONBody(_delivery(row) if caller.reads(Scope.DESTINATIONS_READ) else
                    {"id": row["id"], "status": row["status"]})


def _delivery(row: Any) -> dict[str, Any]:
    return {k: row[k] for k in DeliveryRead.model_fields}
