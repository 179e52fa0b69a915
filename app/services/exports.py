"""Contact exports (CSV or JSON Lines), streamed with constant memory.

`prepare()` checks everything that can fail (segment, list, options) and builds ONE SELECT whose columns are
already text (CSV) or one JSON document per row (JSON Lines), so nothing is decided row by row in Python:

- a caller who may see personal data gets PostgreSQL's own `COPY (SELECT ...) TO STDOUT` bytes, forwarded
  chunk by chunk through a small bounded queue (backpressure: a slow client slows the COPY, memory stays
  flat);
- a caller without `pii:read` gets the same SELECT through a server-side cursor (asyncpg, in chunks), each
  row masked by `app.security.masking` and written by the `csv`/`json` modules into ~64 KB chunks.

Column order is stable (docs/api.md "Exports"): identity, address, stats, tags, then one `attr.<name>`
column per attribute definition, by name. CSV cells that a spreadsheet would run as a formula (`=`, `+`,
`-`, `@`, tab, CR first) get a leading `'`, except numbers and ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import asyncpg
from sqlalchemy import (
    ColumnElement,
    Select,
    Text,
    and_,
    any_,
    case,
    cast,
    exists,
    false,
    func,
    literal_column,
    select,
)
from sqlalchemy.dialects.postgresql import TIMESTAMP
from sqlalchemy.dialects.postgresql import asyncpg as pg_asyncpg
from sqlalchemy.ext.asyncio import AsyncSession

from app.access import count_rows, count_streamed
from app.db import milliseconds
from app.models import AttributeDefinition, Contact, ListMembership, MailingList
from app.security.masking import PII_FIELDS, mask_email, mask_name, mask_phone, mask_text
from app.services import lists as lists_service
from app.services import segments as segments_service
from app.timeouts import ONE_CORE, set_local

__all__ = ["Delimiter", "ExportFormat", "ExportOptions", "ExportQuery", "ListStatus", "inert", "prepare", "stream"]

_t = Contact.__table__  # type: ignore[attr-defined]
_members = ListMembership.__table__  # type: ignore[attr-defined]
_lists = MailingList.__table__  # type: ignore[attr-defined]
_defs = AttributeDefinition.__table__  # type: ignore[attr-defined]
_DIALECT = pg_asyncpg.dialect()

CHUNK_BYTES = 64 * 1024     # masked path: bytes gathered before a chunk is sent
CURSOR_PREFETCH = 1000      # masked path: rows fetched per round trip
QUEUE_CHUNKS = 8            # COPY path: chunks in flight between PostgreSQL and the client
BOM = "\ufeff".encode()
FORMULA_START = "=+-@\t\r"  # first characters that make a spreadsheet run a cell as a formula
_FORMULA_CODES = literal_column("ARRAY[" + ", ".join(str(ord(c)) for c in FORMULA_START) + "]")


def inert(cell: str) -> str:
    """Free text as a spreadsheet must show it: a leading `'` when its first character would run it as a formula
    (the contact export, the import reject report)."""
    return "'" + cell if cell[:1] and cell[0] in FORMULA_START else cell
_QUOTE = literal_column("''''", Text)  # the SQL literal '
TIMESTAMP_S = TIMESTAMP(precision=0)
TAG_SEPARATOR = "|"         # tags and multi_enum values inside one CSV cell


class ExportFormat(StrEnum):
    CSV = "csv"
    JSONL = "jsonl"


class ListStatus(StrEnum):
    SUBSCRIBED = "subscribed"
    PENDING = "pending"
    UNSUBSCRIBED = "unsubscribed"
    ANY = "any"


class Delimiter(StrEnum):
    COMMA = ","
    SEMICOLON = ";"


@dataclass(frozen=True, slots=True)
class ExportOptions:
    format: ExportFormat = ExportFormat.CSV
    segment_id: uuid.UUID | None = None
    list_id: uuid.UUID | None = None
    # With list_id: its members in this status (None: subscribed, who may be mailed). Without: contacts that are on
    # at least one list in this status (None: no membership filter).
    list_status: ListStatus | None = None
    delimiter: Delimiter = Delimiter.COMMA
    bom: bool = False

    @property
    def effective_list_status(self) -> str | None:
        """The membership status the export filters on, as the journal records it (None: no membership filter)."""
        if self.list_id is not None:
            return (self.list_status or ListStatus.SUBSCRIBED).value
        return self.list_status.value if self.list_status else None


@dataclass(frozen=True, slots=True)
class ExportQuery:
    """A checked export, ready to stream: its SQL (asyncpg `$n` style), arguments and CSV header."""

    options: ExportOptions
    columns: list[str]            # CSV header (wire names); JSON Lines: the single column "contact"
    kinds: list[str]              # per column: free text cells are formula-neutralized
    sql: str
    args: list[Any]
    count_sql: str                # how many rows it will have (the CLI's progress bar)
    count_args: list[Any]
    masked: bool


# ---- columns --------------------------------------------------------------------------------------------

UUID, FREE, ENUM, DATE, TIMESTAMP, NUMBER = "uuid", "free", "enum", "date", "timestamp", "number"

_IDENTITY = (
    ("id", UUID), ("external_id", FREE), ("email", FREE), ("email_status", ENUM), ("phone", ENUM),
    ("first_name", FREE), ("last_name", FREE), ("company", FREE), ("job_title", FREE), ("sector", FREE),
    ("gender", FREE), ("birth_date", DATE), ("language", FREE), ("source", ENUM), ("first_contact_at", TIMESTAMP),
    ("first_contact_channel", FREE), ("kind", ENUM), ("lifecycle_stage", ENUM), ("created_at", TIMESTAMP),
    ("updated_at", TIMESTAMP), ("last_activity_at", TIMESTAMP),
)
_ADDRESS = (
    ("line1", "address_line1", FREE), ("line2", "address_line2", FREE), ("postal_code", "postal_code", FREE),
    ("city", "city", FREE), ("region", "region", FREE), ("country", "country", ENUM),
)
_STATS = (
    ("orders_count", NUMBER), ("total_spent", NUMBER), ("average_basket", NUMBER), ("first_order_at", TIMESTAMP),
    ("last_order_at", TIMESTAMP), ("last_order_amount", NUMBER), ("currency", ENUM),
)
# How each personal-data column is masked (the functions of app.security.masking; birth date: empty).
_MASKERS: dict[str, Callable[[Any], Any]] = {
    "email": mask_email, "phone": mask_phone, "first_name": mask_name, "last_name": mask_name,
    "birth_date": lambda _value: None, "address.line1": mask_text, "address.line2": mask_text,
}
assert set(_MASKERS) == PII_FIELDS, "every personal-data field must have its masker here"


def _csv_cell(expr: Any, kind: str, *, neutralize: bool) -> ColumnElement[Any]:
    """A column as its CSV cell, with the cheapest SQL that does it (this runs a million times per export)."""
    if kind == TIMESTAMP:  # UTC to the second: "2026-11-23 19:10:00", the form spreadsheets read as a date
        return cast(func.timezone("UTC", expr), TIMESTAMP_S)
    if kind == FREE and neutralize:
        return case((func.ascii(expr) == any_(_FORMULA_CODES), _QUOTE.concat(expr)), else_=expr)
    return expr  # type: ignore[no-any-return]  # ids, numbers, dates: PostgreSQL's own text form


def _attribute_cell(name: str, kind: str, cell_kind: str, *, neutralize: bool) -> ColumnElement[Any]:
    value = _t.c.attributes[name]
    if kind == "multi_enum":
        # ["red", "blue"] → red|blue, from jsonb's text form (a set-returning subquery per row costs 3 times more):
        # drop the outer [" and "], join on ", " and unescape \" and \\.
        as_text = cast(value, Text)
        inner = func.substr(as_text, 3, func.greatest(func.length(as_text) - 4, 0))
        cell: Any = func.regexp_replace(func.replace(inner, '", "', TAG_SEPARATOR), r"\\(.)", r"\1", "g")
    else:
        cell = value.astext
    if cell_kind == FREE and neutralize:  # one reference to the value: it is computed once
        return func.regexp_replace(cell, "^([-=+@\t\r])", r"'\1")  # type: ignore[no-any-return]
    return cell  # type: ignore[no-any-return]


def _csv_columns(definitions: list[tuple[str, str]], *, neutralize: bool) -> list[tuple[str, str, Any]]:
    """(header, kind, text expression) of every CSV column, in the documented order."""
    columns: list[tuple[str, str, Any]] = [(name, kind, _t.c[name]) for name, kind in _IDENTITY]
    columns += [(f"address.{wire}", kind, _t.c[column]) for wire, column, kind in _ADDRESS]
    columns += [(f"stats.{name}", kind, _t.c[name]) for name, kind in _STATS]
    columns.append(("tags", FREE, func.array_to_string(_t.c.tags, TAG_SEPARATOR)))
    out = [(name, kind, _csv_cell(expr, kind, neutralize=neutralize)) for name, kind, expr in columns]
    for name, kind in definitions:
        cell_kind = FREE if kind in ("text", "enum", "multi_enum") else ENUM
        out.append((f"attr.{name}", cell_kind, _attribute_cell(name, kind, cell_kind, neutralize=neutralize)))
    return out


def _json_document() -> ColumnElement[Any]:
    """One contact as ContactRead's JSON (money as decimal strings, timestamps RFC 3339 in UTC)."""
    def money(column: Any) -> Any:
        return cast(column, Text)

    return cast(func.json_build_object(
        *[part for name, _kind in _IDENTITY[:18] for part in (name, _t.c[name])],
        "address", func.json_build_object(*[p for wire, column, _k in _ADDRESS for p in (wire, _t.c[column])]),
        "attributes", _t.c.attributes,
        "tags", _t.c.tags,
        "stats", func.json_build_object(
            "orders_count", _t.c.orders_count, "total_spent", money(_t.c.total_spent),
            "average_basket", money(_t.c.average_basket), "first_order_at", _t.c.first_order_at,
            "last_order_at", _t.c.last_order_at, "last_order_amount", money(_t.c.last_order_amount),
            "currency", _t.c.currency),
        "created_at", _t.c.created_at, "updated_at", _t.c.updated_at, "last_activity_at", _t.c.last_activity_at,
        "version", _t.c.version, "pii_masked", false(),
    ), Text)


# ---- preparing ------------------------------------------------------------------------------------------


async def _membership(session: AsyncSession, options: ExportOptions) -> ColumnElement[bool]:
    """Members of the list (unknown list → 404), or of any list when none is named, in the status asked for."""
    membership = _members.c.contact_id == _t.c.id
    if options.list_id is not None:
        await lists_service.ensure_exists(session, options.list_id)
        membership = and_(membership, _members.c.list_id == options.list_id)
    status = options.effective_list_status
    if status is not None and status != ListStatus.ANY:
        membership = and_(membership, _members.c.status == status)
    return exists().where(membership)


async def prepare(session: AsyncSession, options: ExportOptions, *, masked: bool) -> ExportQuery:
    """Check the options against the database (unknown segment or list → 404) and build the query."""
    where: list[ColumnElement[bool]] = []
    if options.segment_id is not None:
        where.append(await segments_service.segment_condition(session, options.segment_id))
    if options.list_id is not None or options.list_status is not None:
        where.append(await _membership(session, options))
    if options.format is ExportFormat.JSONL:
        header, kinds = ["contact"], [ENUM]
        statement: Select[Any] = select(_json_document().label("contact"))
    else:
        definitions = [(r.name, r.type) for r in await session.execute(
            select(_defs.c.name, _defs.c.type).order_by(_defs.c.name))]
        columns = _csv_columns(definitions, neutralize=not masked)  # masked: neutralized after masking
        header, kinds = [name for name, _k, _e in columns], [kind for _n, kind, _e in columns]
        statement = select(*[expr.label(f"c{i}") for i, (_n, _k, expr) in enumerate(columns)])
    statement = statement.select_from(_t).where(*where)
    sql, args = _compile(statement)
    count_sql, count_args = _compile(select(func.count()).select_from(_t).where(*where))
    return ExportQuery(options=options, columns=header, kinds=kinds, sql=sql, args=args, count_sql=count_sql,
                       count_args=count_args, masked=masked)


def _compile(statement: Any) -> tuple[str, list[Any]]:
    """SQLAlchemy Core → asyncpg SQL (`$n`) and its arguments, through the dialect's own bind processing."""
    compiled = statement.compile(dialect=_DIALECT, compile_kwargs={"render_postcompile": True})
    params = compiled.construct_params()
    processors = compiled._bind_processors  # what SQLAlchemy itself applies before handing values to asyncpg
    names = compiled.positiontup or []
    return compiled.string, [processors[n](params[n]) if n in processors else params[n] for n in names]


# ---- streaming ------------------------------------------------------------------------------------------


async def stream(
    connection: asyncpg.Connection, query: ExportQuery, *, statement_timeout: float | None = None
) -> AsyncIterator[bytes]:
    """The export's bytes, chunk by chunk, from one snapshot of the database (read-only transaction).

    `statement_timeout` (seconds) bounds the COPY, i.e. the whole download, and each fetch of the masked path's
    cursor; a client that stops reading for that long on that path is cut too (idle in transaction).
    """
    if connection.is_in_transaction():  # a caller's transaction (the CLI, the tests)
        async for chunk in _stream(connection, query, statement_timeout):
            yield chunk
        return
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        async for chunk in _stream(connection, query, statement_timeout):
            yield chunk


async def _stream(connection: asyncpg.Connection, query: ExportQuery, seconds: float | None) -> AsyncIterator[bytes]:
    # PostgreSQL's own text forms whatever the server's defaults: ISO dates, JSON timestamps in UTC.
    settings = "SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO, YMD'"
    if seconds is not None:  # in the same round trip (numbers: nothing to quote); one core, as every costly read
        settings += (f"; {set_local(seconds)}; {ONE_CORE}"
                     f"; SET LOCAL idle_in_transaction_session_timeout = {milliseconds(seconds)}")
    await connection.execute(settings)
    options = query.options
    if options.format is ExportFormat.CSV:
        yield (BOM if options.bom else b"") + _csv_line(query.columns, options.delimiter).encode()
    if not query.masked:
        copy_options: dict[str, Any] = {"format": "csv", "delimiter": options.delimiter.value}
        if options.format is ExportFormat.JSONL:  # one JSON text per line, never quoted (see docs/performance.md)
            copy_options = {"format": "csv", "delimiter": "\x02", "quote": "\x01"}
        async for chunk in _copy(connection, query, copy_options):
            yield chunk
        return
    render = _masked_csv_row(query) if options.format is ExportFormat.CSV else _masked_json_row
    buffer: list[str] = []
    size = 0
    async for record in connection.cursor(query.sql, *query.args, prefetch=CURSOR_PREFETCH):
        line = render(record)
        buffer.append(line)
        size += len(line)
        if size >= CHUNK_BYTES:
            yield "".join(buffer).encode()
            buffer, size = [], 0
    if buffer:
        yield "".join(buffer).encode()


async def _copy(connection: asyncpg.Connection, query: ExportQuery, options: Mapping[str, Any]) -> AsyncIterator[bytes]:
    """COPY's chunks through a bounded queue: PostgreSQL waits when the client does (constant memory)."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=QUEUE_CHUNKS)

    async def forward(data: bytes | bytearray | memoryview) -> None:
        await queue.put(bytes(data))  # asyncpg hands a bytearray; the response wants bytes

    async def produce() -> None:
        try:
            status = await connection.copy_from_query(query.sql, *query.args, output=forward, **options)
            count_rows(int(status.rsplit(" ", 1)[-1]))  # "COPY 1234": the journal's row count
        finally:
            await queue.put(None)

    producer = asyncio.create_task(produce())
    try:
        while (chunk := await queue.get()) is not None:
            count_streamed(chunk.count(b"\n"))  # the journal's count if the stream is cut short (a client gone)
            yield chunk
        await producer  # re-raises a failure of the COPY
    finally:
        if not producer.done():  # the client went away: stop the COPY
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer


def _csv_line(values: list[Any], delimiter: Delimiter) -> str:
    out = io.StringIO()
    csv.writer(out, delimiter=delimiter.value, lineterminator="\n").writerow(values)
    return out.getvalue()


def _masked_csv_row(query: ExportQuery) -> Callable[[Mapping[str, Any]], str]:
    maskers = [_MASKERS.get(name) for name in query.columns]
    free = [kind == FREE for kind in query.kinds]
    out = io.StringIO()
    writer = csv.writer(out, delimiter=query.options.delimiter.value, lineterminator="\n")

    def render(record: Mapping[str, Any]) -> str:
        values = list(record.values())
        for i, mask in enumerate(maskers):
            if mask is not None and values[i] is not None:
                values[i] = mask(values[i])
            if free[i] and values[i]:
                values[i] = inert(values[i])
        out.seek(0)
        out.truncate()
        writer.writerow(values)
        return out.getvalue()

    return render


def _masked_json_row(record: Mapping[str, Any]) -> str:
    contact = json.loads(record["contact"])
    for field, mask in _MASKERS.items():
        holder, _, key = field.rpartition(".")
        target = contact[holder] if holder else contact
        if target.get(key) is not None:
            target[key] = mask(target[key])
    contact["pii_masked"] = True
    return json.dumps(contact, ensure_ascii=False, separators=(",", ":")) + "\n"
