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


def test_partitioning_events_keeps_every_row(server_url: str, worker_id: str) -> None:
    """0024 on a populated database: every event kept (id, key and values), keys unique across partitions,
    the identity continuing after the old ids; and back down to the single table, still every row."""
    name = f"carnet_events_migration_{worker_id}_{os.getpid()}"
    asyncio.run(_recreate(server_url, name))
    url = _with_database(server_url, name)
    config = alembic_config(url)
    try:
        command.upgrade(config, "0023")
        before = asyncio.run(_populate_events(url))
        command.upgrade(config, "0024")
        after = asyncio.run(_events_and_homes(url))
        assert {k: v[:-1] for k, v in after.items()} == before
        homes = {v[-1] for v in after.values()}
        assert "event_default" in homes and len(homes) >= 4  # months with rows got partitions; 1900 waits
        assert asyncio.run(_fetch(url, "SELECT count(*), count(DISTINCT event_id) FROM event_key")) == [(1000, 1000)]
        assert asyncio.run(_fetch(url, "SELECT count(*) FROM event_key k JOIN event e USING (id, occurred_at) "
                                       "WHERE k.event_id = e.event_id")) == [(1000,)]
        (new_id,) = asyncio.run(_fetch(url, """
            INSERT INTO event (event_id, contact_id, type, occurred_at, properties, created_at)
            SELECT NULL, contact_id, 'x', now(), '{}', now() FROM event LIMIT 1 RETURNING id"""))
        assert new_id[0] > max(before)
        command.downgrade(config, "0023")
        down = asyncio.run(_events_and_homes(url))
        assert {k: v[:-1] for k, v in down.items() if k in before} == before and len(down) == len(before) + 1
    finally:
        asyncio.run(_drop(server_url, name))


async def _fetch(url: str, sql: str, *, script: bool = False) -> list[tuple[object, ...]]:
    import asyncpg

    from app.db import plain_dsn

    conn = await asyncpg.connect(plain_dsn(url))
    try:
        if script:
            await conn.execute(sql)
            return []
        return [tuple(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()


async def _populate_events(url: str) -> dict[int, tuple[object, ...]]:
    """1,500 events over 40 months, a far past and a far future one among them; 1,000 carry an event_id."""
    await _fetch(url, """
        INSERT INTO contact (id, email, email_status, kind, lifecycle_stage, attributes, tags, orders_count,
                             total_spent, version, created_at, updated_at, source)
        SELECT ('00000000-0000-0000-0000-' || lpad(g::text, 12, '0'))::uuid, 'm' || g || '@shop.example',
               'unverified', 'prospect', 'prospect', '{}', '{}', 0, 0, 1, now(), now(), 'api'
        FROM generate_series(1, 10) g;
        INSERT INTO event (event_id, contact_id, type, occurred_at, properties, created_at)
        SELECT CASE WHEN g % 3 = 0 THEN NULL ELSE 'evt-' || g END,
               ('00000000-0000-0000-0000-' || lpad((g % 10 + 1)::text, 12, '0'))::uuid, 'page_view',
               CASE g WHEN 1 THEN timestamptz '1900-01-01 00:00+00' WHEN 2 THEN timestamptz '2999-06-01 00:00+00'
                      ELSE now() - make_interval(days => g % 1200) END,
               jsonb_build_object('n', g), now()
        FROM generate_series(1, 1500) g;
    """, script=True)
    rows = await _events_and_homes(url)
    return {k: v[:-1] for k, v in rows.items()}


async def _events_and_homes(url: str) -> dict[int, tuple[object, ...]]:
    rows = await _fetch(url, "SELECT id, event_id, contact_id, type, occurred_at, properties, created_at, "
                             "tableoid::regclass::text FROM event")
    return {int(r[0]): r[1:] for r in rows}  # type: ignore[call-overload]
