"""`/v1/imports`: upload a CSV file (202, run by the worker), follow its progress, read its reject report.

Every route needs `imports:write`: the progress and the report show the file's own values, so they belong
to whoever may import; values in the report are masked for tokens without `pii:read`.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import IO, Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from app.access import count_rows, describe
from app.db import ReadSession, WriteSession, get_read_sessionmaker
from app.errors import BadRequest, IdempotencyKeyReused, InvalidInput, PayloadTooLarge, problems
from app.models.base import utc_now
from app.problems import validation_problem
from app.routers.deps import IdempotencyKey, JSONBody
from app.schemas.imports import MAX_FORM_FIELD_CHARS, ImportAccepted, ImportOptions, ImportRead, present_import
from app.schemas.types import TAG_CHARS_PATTERN
from app.security import Principal, Scope, require
from app.security.masking import PII_FIELDS, mask_email, mask_name, mask_phone, mask_text
from app.services import idempotency as idempotency_service
from app.services import workers as workers_service
from app.services.imports import report as imports_report
from app.services.imports import store as imports_service
from app.services.imports.store import ImportNotFound

__all__ = ["router"]

router = APIRouter(prefix="/imports", tags=["imports"])

Importer = Annotated[Principal, require(Scope.IMPORTS_WRITE)]
_FIELDS = ("mapping", "mode", "list_id", "tags", "consent", "blank_erases", "dry_run")
_JSON_FIELDS = ("mapping", "consent")
_BOOLEAN_FIELDS = ("blank_erases", "dry_run")
_FORM_BOOLEANS = {"true": True, "false": False}
_PAGE = 5000

_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "dependentRequired": {"list_id": ["consent"]},
                    "additionalProperties": False,
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description":
                                 "CSV as Excel writes it: UTF-8 (BOM or not) or Windows-1252; , ; or tab. "
                                 "A column the import reads has a name of at most 255 characters (else 422)"},
                        "mapping": {"type": "string", "maxLength": MAX_FORM_FIELD_CHARS,
                                    "contentMediaType": "application/json",
                                    "description": 'JSON {"column name": "field" or null}, at most 500 columns, '
                                                   "each name at most 255 characters"},
                        "mode": {"type": "string", "enum": ["upsert", "create_only", "update_only"]},
                        "list_id": {"type": "string", "format": "uuid"},
                        "tags": {"type": "array", "maxItems": 100,
                                 "items": {"type": "string", "maxLength": MAX_FORM_FIELD_CHARS,
                                           "pattern": TAG_CHARS_PATTERN},
                                 "description": "Repeat the field, or separate names with commas (each name: 1 to "
                                                "64 characters, no control character, no `/`)"},
                        "consent": {"type": "string", "maxLength": MAX_FORM_FIELD_CHARS,
                                    "contentMediaType": "application/json", "description":
                                    'JSON {"occurred_at"?, "source"?, "proof": {...}}; required with list_id'},
                        "blank_erases": {"type": "boolean"},
                        "dry_run": {"type": "boolean"},
                    },
                },
            },
        },
    },
}
_CSV_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"description": "One line per problem: row, column, field, reason, value",
          "content": {"text/csv": {"schema": {"type": "string"}}}},
}


@router.post("", status_code=202, response_model=ImportAccepted, openapi_extra=_UPLOAD_BODY,
             responses=problems(BadRequest, InvalidInput, PayloadTooLarge, IdempotencyKeyReused))
async def create_import(
    request: Request,
    session: WriteSession,
    caller: Importer,
    idempotency_key: Annotated[
        IdempotencyKey, Header(description="Replays the first response for 24 h, to the same token only; reused "
                                   "with another file or fields, or by another token → 422")
    ] = None,
) -> Any:
    """Store the file and queue the import; the worker runs it (`GET /v1/imports/{id}` follows it).

    With an `Idempotency-Key`, a repeat with the same file bytes and fields queues nothing and replays the first
    202 (the multipart boundary and the order of distinct fields do not matter).
    """
    settings = request.app.state.settings
    form = await request.form(max_files=1, max_fields=len(_FIELDS) + 100)
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidInput.one("file", "a CSV file is required in the multipart field `file`", "missing")
        options = _options(form.multi_items())
        if idempotency_key is not None:
            fingerprint = await _upload_fingerprint(request, form.multi_items(), upload)
            stored = await idempotency_service.claim(
                session, subject=caller.subject, token_id=caller.token_id, key=idempotency_key,
                method=request.method, path=request.url.path, fingerprint=fingerprint,
            )
            if stored is not None:
                return JSONBody(stored.body, status_code=stored.status_code,
                                headers={**stored.headers, "Idempotent-Replayed": "true"})

        async def chunks() -> AsyncIterator[bytes]:
            while piece := await upload.read(imports_service.CHUNK_BYTES):
                yield piece

        row = await imports_service.create(
            session, chunks(), filename=upload.filename, options=options, actor=caller,
            max_bytes=settings.import_max_bytes,
        )
    finally:
        await form.close()
    body = {"id": str(row["id"]), "status": row["status"], **_workers_note(await workers_service.presence(session))}
    headers = {"Location": f"/v1/imports/{row['id']}"}
    if idempotency_key is not None:
        await idempotency_service.complete(session, subject=caller.subject, key=idempotency_key, status_code=202,
                                           body=body, headers=headers)
    return JSONBody(body, status_code=202, headers=headers)


@router.get("/{import_id}", response_model=ImportRead, responses=problems(ImportNotFound))
async def get_import(import_id: uuid.UUID, session: ReadSession, _: Importer) -> Any:
    """Status, counts and speed; `total_rows` is known once the whole file was read."""
    return JSONBody(present_import(await imports_service.get(session, import_id), now=utc_now()))


@router.get("/{import_id}/rejects", response_class=StreamingResponse, responses={**_CSV_RESPONSE,
            **problems(ImportNotFound)})
async def get_import_rejects(
    import_id: uuid.UUID,
    session: ReadSession,
    makers: Annotated[async_sessionmaker[AsyncSession], Depends(get_read_sessionmaker)],
    caller: Importer,
) -> StreamingResponse:
    """The reject report as CSV, in file order; values masked without `pii:read`."""
    job = await imports_service.get(session, import_id)
    if caller.sees_pii:  # refused cells in clear: the people in the file (docs/gdpr.md "Access journal")
        describe("imports.rejects", import_id=import_id)
    lines = imports_report.lines(makers, job, shown=imports_report.unmasked if caller.sees_pii else _mask,
                                 on_page=count_rows if caller.sees_pii else None)
    return StreamingResponse(lines, media_type="text/csv; charset=utf-8", headers={
        "Content-Disposition": f'attachment; filename="import-{import_id}-rejects.csv"'})


async def _upload_fingerprint(request: Request, items: list[tuple[str, Any]], upload: UploadFile) -> str:
    """The request's Idempotency-Key fingerprint from what it means, not its bytes on the wire (the multipart
    boundary changes on every send): the file's name, size and SHA-256, and the other fields. Fields keep their
    order among equal names (`tags` repeated), not across names."""
    digest, size = await run_in_threadpool(_hash_file, upload.file)
    fields = sorted(([k, v] for k, v in items if k != "file" and isinstance(v, str)), key=lambda kv: kv[0])
    meaning = {"file": {"filename": upload.filename, "size": size, "sha256": digest}, "fields": fields}
    return idempotency_service.request_fingerprint(request.method, request.url.path, json.dumps(meaning).encode())


def _hash_file(file: IO[bytes]) -> tuple[str, int]:
    """SHA-256 and size of the spooled upload, read in chunks; the file is rewound for the import."""
    digest, size = hashlib.sha256(), 0
    file.seek(0)
    while piece := file.read(imports_service.CHUNK_BYTES):
        digest.update(piece)
        size += len(piece)
    file.seek(0)
    return digest.hexdigest(), size


def _workers_note(seen: dict[str, Any]) -> dict[str, Any]:
    """The 202 says who will run the import: with no worker alive it would stay queued, silently."""
    note: dict[str, Any] = {"workers": {"live": seen["live"], "last_seen_at": _iso(seen["last_seen_at"])}}
    if not seen["live"]:
        since = f"since {_iso(seen['last_seen_at'])}" if seen["last_seen_at"] else "at all"
        note["warning"] = (f"no worker has been heard from {since}: this import stays queued until one runs "
                           "(start `carnet worker` beside the API)")
    return note


def _iso(moment: Any) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment else None


def _options(items: list[tuple[str, Any]]) -> ImportOptions:
    data: dict[str, Any] = {}
    tags: list[str] = []
    for key, value in items:
        if key == "file":
            continue
        if key not in _FIELDS:
            raise InvalidInput.one(key, "unknown field", "unknown_field")
        if not isinstance(value, str):
            raise InvalidInput.one(key, "a plain form field is expected here, not a file", "type")
        if len(value) > MAX_FORM_FIELD_CHARS:  # before json.loads or split: the parser takes up to 1 MB a field
            raise InvalidInput.one(key, f"at most {MAX_FORM_FIELD_CHARS:,} characters", "string_too_long")
        if key == "tags":
            tags += [t.strip() for t in value.split(",") if t.strip()]
            continue
        if key in data:
            raise InvalidInput.one(key, "given twice", "duplicate_field")
        if key in _JSON_FIELDS:
            try:
                data[key] = json.loads(value)
            except (ValueError, RecursionError):  # RecursionError: nested past the parser's limit (64 kB of `[`)
                raise InvalidInput.one(key, "not valid JSON (or nested too deep)", "json_invalid") from None
        else:
            # A form field is text: `true`/`false` spell a boolean; anything else (`0`, `no`, ...) is refused by
            # the strict schema rather than read as false (docs/security.md, Class 6).
            data[key] = _FORM_BOOLEANS.get(value.strip().lower(), value) if key in _BOOLEAN_FIELDS else value
    if tags:
        data["tags"] = tags
    try:
        return ImportOptions.model_validate(data)
    except ValidationError as exc:
        raise validation_problem(exc.errors()) from None


def _mask(field: str | None, value: str | None) -> str | None:
    """A reported cell as a reader without `pii:read` may see it (the fields masking.py calls personal)."""
    if value is None or field not in PII_FIELDS:
        return value
    if field == "email":
        return mask_email(value)
    if field == "phone":
        return mask_phone(value)
    if field in ("first_name", "last_name"):
        return mask_name(value)
    return mask_text(value)
