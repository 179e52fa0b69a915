"""An import's reject report as CSV (row, column, field, reason, value), in file order: what
GET /v1/imports/{id}/rejects streams and what `carnet import` writes beside the file."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.services.exports import inert
from app.services.imports import store

__all__ = ["lines", "unmasked"]

_PAGE = 5000

Shown = Callable[[str | None, str | None], str | None]  # (field, value) -> the value as this reader may see it


async def lines(
    makers: async_sessionmaker[AsyncSession], job: Mapping[str, Any], *, shown: Shown,
    on_page: Callable[[int], None] | None = None,
) -> AsyncIterator[bytes]:
    """The report's CSV lines, header first; one short session a page, so a slow reader holds no connection.

    `on_page(rows)` is told each page's size (the access journal's row count)."""
    fields = {job["header"][int(i)]: field for i, field in job["mapping"].items()}
    yield _csv_line(["row", "column", "field", "reason", "value"])
    after = 0
    while True:
        async with makers() as reader:
            page = await store.rejects(reader, job["id"], after_id=after, limit=_PAGE)
        if on_page is not None:
            on_page(len(page))
        for r in page:
            field = fields.get(r["column"]) if r["column"] else None
            yield _csv_line([r["row_number"], inert(r["column"] or ""), field or "", r["reason"],
                             inert(shown(field, r["value"]) or "")])
        if len(page) < _PAGE:
            return
        after = page[-1]["id"]


def unmasked(field: str | None, value: str | None) -> str | None:
    """Values as stored: for readers with `pii:read`, and the CLI."""
    return value


def _csv_line(cells: list[Any]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerow(cells)
    return out.getvalue().encode()
