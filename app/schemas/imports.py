"""CSV imports on the wire: the options sent with the file, the job's progress and counts."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, Field, StringConstraints

from app.schemas.base import InputSchema
from app.schemas.lists import SubscribeConsent
from app.schemas.strict import FromJSON
from app.schemas.types import TagName, Uuid
from app.schemas.workers import WorkersSeen

__all__ = ["MAX_COLUMN_NAME_CHARS", "MAX_FORM_FIELD_CHARS", "ImportAccepted", "ImportMode", "ImportOptions",
           "ImportRead", "ImportStatus", "present_import"]


MAX_MAPPED_COLUMNS = 500  # a mapping names at most this many columns
# A column's name, in `mapping` and, for a column the import reads, in the file's header: each report line stores
# it (the report's masking finds a cell's field by it), so it is refused at upload rather than cut.
MAX_COLUMN_NAME_CHARS = 255
MAX_FORM_FIELD_CHARS = 64 * 1024  # a form field other than the file (the JSON of mapping, consent; tags)


class ImportMode(StrEnum):
    UPSERT = "upsert"
    CREATE_ONLY = "create_only"
    UPDATE_ONLY = "update_only"


class ImportStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class ImportOptions(InputSchema):
    """The form fields sent with the file (JSON values for `mapping` and `consent`)."""

    mapping: dict[Annotated[str, StringConstraints(max_length=MAX_COLUMN_NAME_CHARS)],
                  Annotated[str, StringConstraints(max_length=100)] | None] | None = Field(
        default=None, max_length=MAX_MAPPED_COLUMNS,
        description="{column name: field} (null ignores a column); when absent, guessed from headers")
    mode: Annotated[ImportMode, FromJSON] = ImportMode.UPSERT
    list_id: Uuid | None = Field(default=None, description="Subscribe every imported row to this list")
    tags: list[TagName] = Field(default_factory=list, max_length=100, description="Added to every imported row")
    consent: SubscribeConsent | None = Field(
        default=None,
        description="The email_marketing consent covering the file's subscription (required with list_id)")
    blank_erases: bool = Field(default=False, description="An empty cell clears the stored value (default: kept)")
    dry_run: bool = Field(default=False, description="Validate and report; write no contact")


class ImportAccepted(BaseModel):
    id: uuid.UUID
    status: ImportStatus
    workers: WorkersSeen = Field(description="The worker processes that run imports, as last heard from")
    warning: str | None = Field(default=None, description="Set when no worker has been heard from lately: the "
                                "import stays queued until one runs (`carnet worker`)")


class ImportRead(BaseModel):
    id: uuid.UUID
    status: ImportStatus
    filename: str | None
    size_bytes: int
    encoding: str = Field(description="utf-8, utf-8-sig (with BOM) or cp1252 (Windows-1252), as detected")
    delimiter: str
    columns: dict[str, str | None] = Field(description="Each column of the file and the field it fills (null: ignored)")
    mode: ImportMode
    list_id: uuid.UUID | None
    tags: list[str]
    blank_erases: bool
    dry_run: bool
    total_rows: int | None = Field(description="Data rows in the file; known once the file was read to the end")
    processed_rows: int
    created: int
    updated: int
    unchanged: int = Field(description="Matched rows that changed nothing")
    skipped: int = Field(description="Suppressed (erased) people, and rows the mode excludes")
    rejected: int = Field(description="Invalid rows and duplicates inside the file (see /rejects)")
    subscribed: int = Field(description="Rows newly subscribed (or pending on a double opt-in list) to list_id")
    rows_per_second: float | None
    attempts: int
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


def present_import(row: Mapping[str, Any], *, now: datetime) -> dict[str, Any]:
    mapping = row["mapping"] or {}
    columns = {name: mapping.get(str(i)) for i, name in enumerate(row["header"] or [])}
    rate = None
    if row["started_at"] is not None and row["processed_rows"]:
        elapsed = ((row["finished_at"] or now) - row["started_at"]).total_seconds()
        rate = round(row["processed_rows"] / elapsed, 1) if elapsed > 0 else None
    return {
        "id": row["id"], "status": row["status"], "filename": row["filename"], "size_bytes": row["size_bytes"],
        "encoding": row["encoding"], "delimiter": row["delimiter"], "columns": columns, "mode": row["mode"],
        "list_id": row["list_id"], "tags": list(row["tags"]), "blank_erases": row["blank_erases"],
        "dry_run": row["dry_run"], "total_rows": row["total_rows"], "processed_rows": row["processed_rows"],
        "created": row["created"], "updated": row["updated"], "unchanged": row["unchanged"],
        "skipped": row["skipped"], "rejected": row["rejected"], "subscribed": row["subscribed"],
        "rows_per_second": rate, "attempts": row["attempts"], "error": row["error"],
        "created_at": row["created_at"], "started_at": row["started_at"], "finished_at": row["finished_at"],
    }
