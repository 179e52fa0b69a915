"""Import a file from the local disk (`carnet import`): the same job and runner as the API and the worker."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from app.db import BACKGROUND_POOL_TIMEOUT, make_engine, make_sessionmaker
from app.schemas.imports import ImportOptions
from app.schemas.types import configure_phone_region
from app.security import Principal
from app.services.imports import report, store
from app.services.imports.runner import Progress, digest_key, new_owner, run_job
from app.settings import Settings

__all__ = ["import_file", "write_report"]


async def import_file(
    settings: Settings, url: str, path: Path, options: ImportOptions, *, actor: Principal,
    progress: Progress | None = None,
) -> Mapping[str, Any]:
    """Store the file as a job claimed by this process, run it here, and answer the finished job row."""
    configure_phone_region(settings.default_phone_region)
    digest_key(settings)  # the suppression key, as the API derives it
    # A connection for each batch being written and one to read the file with (the runner's _Writer, _records).
    engine = make_engine(url, pool_size=settings.import_writers + 1, pool_timeout=BACKGROUND_POOL_TIMEOUT,
                         statement_timeout=settings.statement_timeout_worker_seconds)
    try:
        sessions = make_sessionmaker(engine)
        owner = new_owner()
        async with sessions.begin() as session:
            job = await store.create(session, _read(path), filename=path.name, options=options, actor=actor,
                                     max_bytes=settings.import_max_bytes,
                                     lease=(owner, settings.import_lease_seconds))
        return await run_job(sessions, settings, job["id"], owner=owner, progress=progress)
    finally:
        await engine.dispose()


async def write_report(url: str, import_id: Any, path: Path) -> None:
    """The job's reject report (unmasked: the CLI runs with the database's own rights) as a CSV file, readable by
    its owner only (it holds the refused cells, personal data); an older report of that name is replaced."""
    engine = make_engine(url, pool_size=1)
    try:
        sessions = make_sessionmaker(engine)
        async with sessions() as session:
            job = await store.get(session, import_id)
        out = await asyncio.to_thread(_open_private, path)
        try:
            pending = bytearray()
            async for line in report.lines(sessions, job, shown=report.unmasked):
                pending += line
                if len(pending) >= store.CHUNK_BYTES:
                    await asyncio.to_thread(out.write, bytes(pending))
                    pending.clear()
            await asyncio.to_thread(out.write, bytes(pending))
        finally:
            await asyncio.to_thread(out.close)
    finally:
        await engine.dispose()


def _open_private(path: Path) -> BinaryIO:
    """Never through a symbolic link (a planted one would have us overwrite its target), and owner-only even when
    an older report was readable by others."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    os.fchmod(descriptor, 0o600)
    return open(descriptor, "wb")


async def _read(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as file:
        while chunk := await asyncio.to_thread(file.read, store.CHUNK_BYTES):
            yield chunk
