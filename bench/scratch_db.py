"""A database of its own for one bench run: created and migrated at the start, dropped at the end."""

from __future__ import annotations

import asyncio

import asyncpg

from app.migrations import upgrade

__all__ = ["SERVER", "drop", "recreate"]

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
