"""Alembic environment: async engine on the URL Carnet resolved (embedded or DATABASE_URL)."""

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

import app.models  # noqa: F401  (registers every table)
from app.db import async_url, metadata

config = context.config


# Any number of processes may boot at once (`carnet serve` migrates on start): one migrates, the others wait
# on this lock and then find nothing left to do.
MIGRATION_LOCK = 0x6361726E6574  # "carnet"


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, compare_type=True,
                      compare_server_default=False)
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
