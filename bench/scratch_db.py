"""A database of its own for one bench run: created and migrated at the start, dropped at the end."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from app.migrations import upgrade

__all__ = ["SERVER", "drop", "recreate", "seed_prospects"]

SERVER = "postgresql://postgres@127.0.0.1:5432"


async def recreate(name: str) -> str:
    """A fresh, migrated database `name`; its URL."""
    await drop(name)
    admin = await asyncpg.connect(f"{SERVER}/postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = f"{SERVER}/{name}"
    await asyncio.to_thread(upgrade, url)
    return url


async def drop(name: str) -> None:
    admin = await asyncpg.connect(f"{SERVER}/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def seed_prospects(conn: asyncpg.Connection, n: int, domain: str) -> uuid.UUID:
    """A list `newsletter` and N prospects `p<i>@<domain>` (set-based, no API); the list's id."""
    list_id = uuid.uuid4()
    await conn.execute("INSERT INTO list (id, name, double_opt_in, version, created_at, updated_at) "
                       "VALUES ($1, 'newsletter', false, 1, now(), now())", list_id)
    await conn.execute("""
        INSERT INTO contact (id, email, email_status, kind, lifecycle_stage, attributes, tags, orders_count,
                             total_spent, version, created_at, updated_at, source)
        SELECT gen_random_uuid(), 'p' || g || '@' || $2, 'unverified', 'prospect', 'prospect', '{}',
               '{}', 0, 0, 1, now(), now(), 'import'
        FROM generate_series(1, $1) g""", n, domain)
    return list_id
