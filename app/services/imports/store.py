"""Uploads: the file streamed into `import_chunk` rows (~1 MB each) and the job row that describes it.

The API and the worker may run on different machines, so the file lives in PostgreSQL, never on a local
disk, and never whole in memory. Encoding, delimiter, header and mapping are settled here, at upload,
so that a file nobody can import is a 422 at once rather than a failed job later.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import timedelta
from typing import Any

from sqlalchemy import insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import driver_connection
from app.errors import InvalidInput, NotFound, PayloadTooLarge
from app.models import AttributeDefinition, ImportJob, ImportReject
from app.models.base import new_id, utc_now
from app.schemas.imports import MAX_COLUMN_NAME_CHARS, ImportOptions
from app.security import Principal
from app.services import lists as lists_service
from app.services.consents import MAX_CLOCK_SKEW
from app.services.imports import headers, sniff
from app.services.sweeps import Sweep
from app.settings import Settings

__all__ = ["CHUNK_BYTES", "ImportNotFound", "ReportValueExpiry", "create", "get", "rechunk", "rejects"]

CHUNK_BYTES = 1024 * 1024
_SAMPLE_BYTES = 64 * 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_jobs = ImportJob.__table__  # type: ignore[attr-defined]
_rejects = ImportReject.__table__  # type: ignore[attr-defined]
_defs = AttributeDefinition.__table__  # type: ignore[attr-defined]

Row = Mapping[str, Any]


class ImportNotFound(NotFound):
    slug, title = "import-not-found", "No such import"


async def create(
    session: AsyncSession,
    chunks: AsyncIterator[bytes],
    *,
    filename: str | None,
    options: ImportOptions,
    actor: Principal,
    max_bytes: int,
    lease: tuple[str, float] | None = None,
) -> Row:
    """Store the file and a queued job (or one already claimed by `lease` = (owner, seconds): the CLI)."""
    consent = await _check_options(session, options)
    job_id = new_id()
    now = utc_now()
    await session.execute(insert(_jobs).values(
        id=job_id, status="queued", subject=actor.subject, filename=_CONTROL.sub("", filename or "")[:255] or None,
        size_bytes=0, chunks=0, encoding="", delimiter="", header=[], mapping={}, mode=options.mode.value,
        list_id=options.list_id, tags=list(dict.fromkeys(options.tags)), consent=consent,
        blank_erases=options.blank_erases, dry_run=options.dry_run, processed_rows=0, created=0, updated=0,
        unchanged=0, skipped=0, rejected=0, subscribed=0, attempts=0, created_at=now, updated_at=now,
    ))
    connection = await driver_connection(session)
    check = sniff.EncodingCheck()
    sample = b""
    size = seq = 0
    async for chunk in rechunk(chunks):
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"an import file may hold at most {max_bytes} bytes")
        check.feed(chunk)
        if len(sample) < _SAMPLE_BYTES:
            sample += chunk[: _SAMPLE_BYTES - len(sample)]
        await connection.execute("INSERT INTO import_chunk (import_id, seq, data) VALUES ($1, $2, $3)",
                                 job_id, seq, chunk)
        seq += 1
    if size == 0:
        raise InvalidInput.one("file", "the file is empty", "empty_file")
    encoding = check.result()
    text = sample.decode(encoding, errors="carnet-cp1252" if encoding == "cp1252" else "ignore")
    delimiter = sniff.detect_delimiter(text)
    header = sniff.read_header(text, delimiter)
    if not any(header):
        raise InvalidInput.one("file", "no header line: the first line must name the columns", "header_missing")
    if any(_CONTROL.search(name) for name in header):
        raise InvalidInput.one("file", "the header holds control characters: is this a CSV file?", "header_invalid")
    names = list(await session.scalars(select(_defs.c.name)))
    try:
        mapping = headers.resolve(header, options.mapping, names)
    except headers.MappingProblem as exc:
        raise InvalidInput.one(exc.field, str(exc), exc.code) from None
    for index, field in sorted(mapping.items()):
        if len(header[index]) > MAX_COLUMN_NAME_CHARS:
            raise InvalidInput.one(
                "file", f"the name of column {index + 1} (read as {field}) is {len(header[index])} characters long; "
                f"a column the import reads may have a name of at most {MAX_COLUMN_NAME_CHARS}", "column_name_too_long")
    values: dict[str, Any] = {
        "size_bytes": size, "chunks": seq, "encoding": encoding, "delimiter": delimiter, "header": header,
        "mapping": {str(i): field for i, field in mapping.items()},
    }
    if lease is not None:
        owner, seconds = lease
        values |= {"status": "running", "lease_owner": owner, "lease_until": utc_now() + timedelta(seconds=seconds),
                   "attempts": 1, "started_at": utc_now()}
    row = (await session.execute(
        update(_jobs).where(_jobs.c.id == job_id).values(**values).returning(*_jobs.c))).mappings().one()
    return row


async def get(session: AsyncSession, import_id: uuid.UUID) -> Row:
    row = (await session.execute(select(*_jobs.c).where(_jobs.c.id == import_id))).mappings().first()
    if row is None:
        raise ImportNotFound(f"no import with id {import_id}")
    return row


async def rejects(session: AsyncSession, import_id: uuid.UUID, *, after_id: int, limit: int) -> list[Row]:
    """A page of the reject report in file order."""
    rows = await session.execute(
        select(_rejects.c.id, _rejects.c.row_number, _rejects.c.column, _rejects.c.reason, _rejects.c.value)
        .where(_rejects.c.import_id == import_id, _rejects.c.id > after_id)
        .order_by(_rejects.c.id).limit(limit)
    )
    return list(rows.mappings())


async def rechunk(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Pieces of about CHUNK_BYTES, whatever sizes the source yields."""
    buffer = bytearray()
    async for piece in chunks:
        buffer += piece
        while len(buffer) >= CHUNK_BYTES:
            yield bytes(buffer[:CHUNK_BYTES])
            del buffer[:CHUNK_BYTES]
    if buffer:
        yield bytes(buffer)


async def _check_options(session: AsyncSession, options: ImportOptions) -> dict[str, Any] | None:
    if options.list_id is None:
        if options.consent is not None:
            raise InvalidInput.one("consent", "a consent only goes with list_id", "consent_without_list")
        return None
    if options.consent is None:
        raise InvalidInput.one("consent", "subscribing the file to a list needs the consent proof that covers it",
                               "consent_required")
    try:
        await lists_service.get(session, options.list_id)
    except lists_service.ListNotFound:
        raise InvalidInput.one("list_id", f"no list with id {options.list_id}", "list_not_found") from None
    now = utc_now()
    occurred_at = options.consent.occurred_at or now
    if occurred_at > now + MAX_CLOCK_SKEW:
        raise InvalidInput.one("consent.occurred_at", "a consent cannot be dated in the future", "in_future")
    return {
        "occurred_at": occurred_at.isoformat(),
        "source": options.consent.source,
        "proof": options.consent.proof.model_dump(mode="json", exclude_none=True),
    }


# ---- storage limitation ----------------------------------------------------------------------------------

_EXPIRE_VALUES_SQL = text("""
    UPDATE import_reject SET value = NULL
    WHERE id IN (
        SELECT r.id FROM import_job j JOIN import_reject r ON r.import_id = j.id
        WHERE j.finished_at < now() - make_interval(days => :days) AND r.value IS NOT NULL
        LIMIT :limit)
""")


class ReportValueExpiry(Sweep):
    """`IMPORT_REPORT_VALUES_DAYS` after an import ended, its reject report loses the refused values (cells of
    real people's rows: an address, a name) and keeps each line's row, column and reason."""

    statement = _EXPIRE_VALUES_SQL

    def params(self, settings: Settings) -> dict[str, Any]:
        return {"days": settings.import_report_values_days}

