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


def test_schema_state_tells_behind_from_ahead() -> None:
    from app.migrations import head_revision, schema_state

    assert schema_state(head_revision()) == "current"
    assert schema_state("0001") == "behind"  # an older release's schema: run `carnet migrate`
    assert schema_state(None) == "behind"
    assert schema_state("f00dfeed") == "ahead"  # a newer release migrated first (rolling upgrade): keep serving


def test_concurrent_migrations_wait_for_each_other(database_url: str) -> None:
    """Two processes booting at once: one migrates, the other waits on the lock and finds nothing to do."""
    import subprocess
    import sys

    from alembic import command
    from app.migrations import alembic_config

    command.downgrade(alembic_config(database_url), "0006")  # so both really have migrations to run
    code = "import sys; from app.migrations import upgrade; upgrade(sys.argv[1])"
    boots = [subprocess.Popen([sys.executable, "-c", code, database_url]) for _ in range(2)]  # noqa: S603
    assert [b.wait(timeout=120) for b in boots] == [0, 0]
