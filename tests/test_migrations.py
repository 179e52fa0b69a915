"""Migrations: upgrade to head, models agree (alembic check), newest revision downgrades and upgrades."""

from __future__ import annotations

import asyncio
import os
import warnings

from alembic import command
from app.migrations import alembic_config
from tests.conftest import _drop, _recreate, _with_database


def test_upgrade_check_downgrade_upgrade(server_url: str, worker_id: str) -> None:
    name = f"carnet_migrations_{worker_id}_{os.getpid()}"
    asyncio.run(_recreate(server_url, name))
    config = alembic_config(_with_database(server_url, name))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. an index expression alembic cannot compare
            command.upgrade(config, "head")
            command.check(config)
            command.downgrade(config, "-1")
            command.upgrade(config, "head")
            command.check(config)
    finally:
        asyncio.run(_drop(server_url, name))
