"""`GET /v1/exports/contacts`: the contact file as CSV or JSON Lines, streamed."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from starlette.types import Send

from app.access import describe
from app.db import ReplicaSession, bare_connection
from app.errors import InvalidInput, problems
from app.logging import get_logger
from app.models.base import utc_now
from app.routers.deps import AUTH_PROBLEMS
from app.security import Principal, Scope
from app.security.costly import COSTLY_PROBLEMS, costly
from app.security.principal import check_member_filters
from app.services import exports as exports_service
from app.services.exports import Delimiter, ExportFormat, ExportOptions, ExportQuery, ListStatus
from app.services.lists import ListNotFound
from app.services.segments import SegmentNotFound

__all__ = ["router"]

log = get_logger("carnet.exports")

router = APIRouter(prefix="/v1/exports", tags=["exports"], responses=AUTH_PROBLEMS)

MEDIA_TYPES = {ExportFormat.CSV: "text/csv; charset=utf-8", ExportFormat.JSONL: "application/x-ndjson"}
_STREAM = {"schema": {"type": "string"}}


@router.get(
    "/contacts",
    response_class=StreamingResponse,
    responses={
        200: {"description": "The contacts, streamed: CSV (header line first) or one JSON contact per line",
              "content": {"text/csv": _STREAM, "application/x-ndjson": _STREAM}},
        **problems(SegmentNotFound, ListNotFound, InvalidInput, *COSTLY_PROBLEMS),
    },
)
async def export_contacts(
    request: Request,
    session: ReplicaSession,
    # a costly read, its slot held until the last byte is sent
    caller: Annotated[Principal, costly(Scope.EXPORTS_READ, streaming=True)],
    format: ExportFormat = ExportFormat.CSV,
    segment: Annotated[uuid.UUID | None, Query(
        description="Only contacts matching this segment. Needs segments:read")] = None,
    list_id: Annotated[uuid.UUID | None, Query(
        alias="list", description="Only members of this list. Needs lists:read")] = None,
    list_status: Annotated[ListStatus | None, Query(
        description="With `list`: its members with this status (default subscribed: who may be mailed). Without "
                    "`list`: contacts on at least one list with this status (`any`: on any list; absent: everyone)",
    )] = None,
    delimiter: Annotated[Delimiter, Query(description="CSV only: `;` for a French Excel")] = Delimiter.COMMA,
    bom: Annotated[bool, Query(description="CSV only: start with a UTF-8 BOM, so Excel reads the accents")] = False,
) -> Any:
    """Masked for tokens without pii:read. Everything is checked before the first byte is sent."""
    check_member_filters(caller, segment_id=segment, list_id=list_id)
    options = ExportOptions(format=format, segment_id=segment, list_id=list_id, list_status=list_status,
                            delimiter=delimiter, bom=bom)
    query = await exports_service.prepare(session, options, masked=not caller.sees_pii)
    if not query.masked:  # a masked export is not an access to personal data (docs/gdpr.md)
        describe("exports.contacts", kind="export", format=format.value, segment_id=segment, list_id=list_id,
                 list_status=options.effective_list_status)
    filename = f"contacts-{utc_now():%Y%m%d-%H%M%S}.{format.value}"
    log.info("export.started", format=format.value, masked=query.masked, subject=caller.subject,
             segment_id=str(segment) if segment else None, list_id=str(list_id) if list_id else None)
    return ClosingStream(_body(request, query, seconds=request.app.state.timeouts.export),
                             media_type=MEDIA_TYPES[format],
                             headers={"Content-Disposition": f'attachment; filename="{filename}"',
                                      "Cache-Control": "no-store"})


class ClosingStream(StreamingResponse):
    """Closes its body however the stream ends. When a client goes away, Starlette cancels the stream and leaves
    the generator suspended: its pooled connection and its COPY were held until the garbage collector found it."""

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):  # the stream may be cancelled: closing must still run
                await self.body_iterator.aclose()  # type: ignore[attr-defined]


async def _body(request: Request, query: ExportQuery, *, seconds: float) -> AsyncIterator[bytes]:
    """The rows, on a pooled connection held for the export only (the request's session is closed by now)."""
    async with bare_connection(request, replica=True) as connection:
        async for chunk in exports_service.stream(connection, query, statement_timeout=seconds):
            yield chunk
