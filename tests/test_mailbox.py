"""app.mailbox.mailbox_key is the SQL `carnet_email_key` (migration 0007): the suppression list and the duplicate
finder must agree on which addresses are one mailbox."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.mailbox import PLUS_TAG_PROVIDERS, mailbox_key

_MIGRATION = Path(__file__).resolve().parents[1] / "alembic" / "versions" / "2026-11-23_0007_merge.py"


def _migration_providers() -> frozenset[str]:
    spec = importlib.util.spec_from_file_location("migration_0007", _MIGRATION)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return frozenset(module.PLUS_TAG_PROVIDERS)


def test_the_providers_are_the_migrations() -> None:
    assert _migration_providers() == PLUS_TAG_PROVIDERS


async def test_the_key_is_the_sql_functions(sessions: async_sessionmaker[AsyncSession]) -> None:
    locals_ = ["ada", "a.da", "ada+shop", "a.d.a+x+y", "+tag", ".", "..+x", "Ada.Lovelace", "ada-love_l"]
    domains = ["gmail.com", "googlemail.com", "GMail.com", "example.org", "gmail.co", "", *sorted(PLUS_TAG_PROVIDERS)]
    samples = [f"{local}@{domain}" for local in locals_ for domain in domains] + ["nodomain", "a@b@gmail.com"]
    async with sessions() as session:
        keys = (await session.scalars(text("SELECT carnet_email_key(e) FROM unnest(CAST(:s AS text[])) "
                                           "WITH ORDINALITY AS u(e, n) ORDER BY n"), {"s": samples})).all()
    assert [mailbox_key(s) for s in samples] == list(keys)
