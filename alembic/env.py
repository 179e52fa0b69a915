"""Alembic environment: async engine on the URL Carnet resolved (embedded or DATABASE_URL)."""

import asyncio
from collections.abc import Mapping

from alembic.runtime.migration import MigrationInfo
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

import app.models  # noqa: F401  (registers every table)
from alembic import context
from app.db import async_url, metadata
from app.migrations import Applied
from app.services.event_partitions import PARTITION_NAME

config = context.config


# Any number of processes may boot at once (`carnet serve` migrates on start): one migrates, the others wait
# on this lock and then find nothing left to do.
MIGRATION_LOCK = 0x6361726E6574  # "carnet"


def _record(ctx: object, step: MigrationInfo, heads: object, run_args: object) -> None:
    """Tell app.migrations.upgrade what ran, so `carnet migrate` and `carnet serve` can say it."""
    revision = step.up_revision
    if step.is_upgrade and revision is not None and "on_applied" in config.attributes:
        config.attributes["on_applied"](Applied(revision.revision, _headline(revision.doc or "")))


def _headline(doc: str) -> str:
    """A migration's first sentence, on one line, at most 100 characters."""
    first = " ".join(doc.split()).split(". ")[0].rstrip(".")
    return first if len(first) <= 100 else first[:99] + "…"


# Columns and indexes of `contact` that exist only in the database (migration 0028): the duplicate finder's keys.
_DATABASE_ONLY = {("column", "name_key"), ("column", "email_key"),
                  ("index", "ix_contact_name_key"), ("index", "ix_contact_email_key")}


def _compared(name: str | None, type_: str, parent_names: Mapping[str, str | None]) -> bool:
    """What `alembic check` compares with the models: not the monthly partitions of `event` (made by the worker,
    app.services.event_partitions), nor the database-only keys of `contact` (on no other table)."""
    if type_ == "table" and name is not None and PARTITION_NAME.fullmatch(name):
        return False
    return not (parent_names.get("table_name") == "contact" and (type_, name) in _DATABASE_ONLY)


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, compare_type=True,
                      compare_server_default=False, on_version_apply=_record, include_name=_compared)
    with context.begin_transaction():
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        context.run_migrations()


async def _online() -> None:
    engine = create_async_engine(async_url(config.attributes["database_url"]))
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=config.attributes["database_url"], target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_online())
