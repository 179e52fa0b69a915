"""Restore drill (docs/operations.md "Restore drill"): a backup is only a backup once it has been restored.

A fresh database is migrated and filled through the API itself (contacts, history, attributes, tags, lists,
memberships, the consent ledger, an erasure and its suppression, orders, events, a segment, a token,
idempotency records, outbox messages). It is dumped with `pg_dump -Fc`, restored with `pg_restore` into a
NEW database, and the two are compared: the same tables, row counts and per-table checksums (md5 of every
row's text, in row-text order), the same sequences, indexes, constraints, triggers and functions; the copy
is at Alembic head, serves the same answers through the app, and its consent ledger is still append-only.

pg_dump/pg_restore come from /usr/lib/postgresql/*/bin, PATH, or the pgserver wheel (embedded mode), the
newest that is not older than the server; without any, the module is skipped with a loud reason.
"""

from __future__ import annotations

import asyncio
import glob
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
from sqlalchemy.engine import make_url

from app.db import plain_dsn
from app.main import create_app
from app.migrations import head_revision, upgrade
from app.settings import Settings
from tests.auth import TEST_SECRET, bearer

ADMIN = bearer()
CONTACTS = 40          # one by one, through POST /v1/contacts
BATCH = 300            # through POST /v1/contacts/batch
PROOF = {"ip": "203.0.113.7", "user_agent": "Mozilla/5.0 (drill)", "form_url": "https://shop.example/newsletter",
         "wording": "Yes, send me the newsletter", "policy_version": "2026-01"}
# Tables the load must fill, or the comparison would prove little about them.
MUST_HAVE_ROWS = ("access_token", "attribute_definition", "consent_event", "contact", "contact_history", "event",
                  "idempotency_record", "list", "list_membership", "order", "outbox_message", "segment",
                  "suppression", "tag", "alembic_version")


class _Undo(Exception):
    """Leaves a transaction by rolling it back."""


@dataclass(frozen=True)
class PgTools:
    pg_dump: Path
    pg_restore: Path
    major: int


@dataclass(frozen=True)
class Drill:
    source: str        # libpq URLs
    restored: str
    dump: Path


def _major(binary: Path) -> int:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True).stdout  # noqa: S603
    match = re.search(r"(\d+)(?:\.\d+)?", out)
    assert match, out
    return int(match[1])


def _find_tools(server_major: int) -> PgTools | None:
    """The newest pg_dump/pg_restore pair not older than the server (pg_dump refuses newer servers)."""
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parts[-2]), reverse=True)
    on_path = shutil.which("pg_dump")
    if on_path:
        dirs.append(str(Path(on_path).resolve().parent))
    try:
        from pgserver._commands import POSTGRES_BIN_PATH  # the embedded mode's own binaries

        dirs.append(str(POSTGRES_BIN_PATH))
    except ImportError:
        pass
    pairs = [(Path(d) / "pg_dump", Path(d) / "pg_restore") for d in dirs]
    usable = [(dump, restore, _major(dump)) for dump, restore in pairs if dump.exists() and restore.exists()]
    usable = [(dump, restore, major) for dump, restore, major in usable if major >= server_major]
    if not usable:
        return None
    dump, restore, major = max(usable, key=lambda item: item[2])
    return PgTools(dump, restore, major)


async def _admin(server_url: str) -> asyncpg.Connection:
    url = make_url(plain_dsn(server_url)).set(database="postgres")
    host = url.query.get("host")
    return await asyncpg.connect(url.set(query={}).render_as_string(hide_password=False), timeout=10,
                                 **({"host": host} if isinstance(host, str) else {}))


async def _connect(url: str) -> asyncpg.Connection:
    parsed = make_url(url)
    host = parsed.query.get("host")
    return await asyncpg.connect(parsed.set(query={}).render_as_string(hide_password=False), timeout=10,
                                 **({"host": host} if isinstance(host, str) else {}))


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300)  # noqa: S603
    assert done.returncode == 0, f"{Path(str(args[0])).name} failed ({done.returncode}):\n{done.stderr[-3000:]}"
    return done


async def _load_through_the_api(url: str, data_dir: Path) -> None:
    """Fill the database the way users do: every row below passed the API's own rules."""
    settings = Settings(database_url=url, jwt_secret=TEST_SECRET, data_dir=data_dir,  # type: ignore[arg-type]
                        lifecycle_refresh_seconds=0, _env_file=None)  # type: ignore[call-arg]
    app = create_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://drill", headers=ADMIN
    ) as http:
        async def ok(method: str, path: str, body: Any = None, params: dict[str, str] | None = None,
                     **headers: str) -> Any:
            response = await http.request(method, path, json=body, params=params, headers=headers)
            assert response.status_code in (200, 201, 204), f"{method} {path}: {response.status_code} {response.text}"
            return response.json() if response.content else None

        await ok("POST", "/v1/attributes", {"name": "shoe_size", "type": "number"})
        await ok("POST", "/v1/attributes", {"name": "segment_hint", "type": "enum", "options": ["a", "b"]})
        contacts = []
        for i in range(CONTACTS):
            contacts.append(await ok("POST", "/v1/contacts", {
                "email": f"drill-{i}@example.com", "phone": f"+3361234{i:04d}", "first_name": f"Prénom {i}",
                "last_name": f"Nom-{i}", "address": {"city": "Lyon" if i % 2 else "Nantes", "country": "FR"},
                "attributes": {"shoe_size": 36 + i % 10, "segment_hint": "ab"[i % 2]}, "tags": [f"t{i % 3}", "drill"],
            }, **{"Idempotency-Key": f"drill-{i}"}))
        items = [{"external_id": f"shop-{i}", "email": f"batch-{i}@example.com", "kind": "customer"}
                 for i in range(BATCH)]
        assert (await ok("POST", "/v1/contacts/batch", {"items": items}))["errors"] == 0
        for contact in contacts[:10]:  # history rows, version bumps
            await ok("PATCH", f"/v1/contacts/{contact['id']}", {"job_title": "Buyer", "tags": ["patched"]},
                     **{"If-Match": f'"v{contact["version"]}"'})

        newsletter = await ok("POST", "/v1/lists", {"name": "Newsletter"})
        vip = await ok("POST", "/v1/lists", {"name": "VIP", "double_opt_in": True})  # → outbox messages
        for contact in contacts[:20]:
            consent = {"consent": {"source": "footer_form", "proof": PROOF}}
            await ok("PUT", f"/v1/lists/{newsletter['id']}/members/{contact['id']}", consent)
            await ok("PUT", f"/v1/lists/{vip['id']}/members/{contact['id']}", {})
        for contact in contacts[15:20]:
            await ok("POST", f"/v1/contacts/{contact['id']}/consents",
                     {"purpose": "email_marketing", "action": "withdrawn", "source": "preference_center"})

        for i in range(60):
            await ok("PUT", f"/v1/orders/ord-{i}", {
                "contact": {"email": f"drill-{i % CONTACTS}@example.com"},
                "placed_at": f"2026-0{1 + i % 9}-15T10:00:00Z",
                "status": ("paid", "delivered", "cancelled")[i % 3], "currency": "EUR", "total_amount": f"{10 + i}.50",
                "items": [{"sku": f"SKU-{i % 7}", "category": "shoes", "quantity": 1, "unit_price": f"{10 + i}.50"}],
            })
        for i in range(30):
            await ok("POST", "/v1/events", {"contact": {"email": f"drill-{i % CONTACTS}@example.com"},
                                            "type": "page_view", "occurred_at": "2026-11-01T09:00:00Z",
                                            "properties": {"url": f"/p/{i}", "n": i}, "event_id": f"ev-{i}"})
        await ok("POST", "/v1/segments", {"name": "Lyon shoes", "filter": {"all": [
            {"field": "address.city", "op": "eq", "value": "Lyon"},
            {"field": "orders.category", "op": "eq", "value": "shoes"}]}})
        await ok("POST", "/v1/tokens", {"subject": "drill@shop.example", "role": "viewer"})
        erased = (await ok("GET", "/v1/contacts", params={"external_id": "shop-0"}))["data"][0]
        await ok("DELETE", f"/v1/contacts/{erased['id']}")  # erasure: a suppression row


def _same_check(definition: str) -> str:
    """A constraint's text without casts and parentheses: PostgreSQL re-parses a restored CHECK and prints
    `x = ANY (ARRAY['a'::varchar, ...]::text[])` back as `x = ANY (ARRAY[('a'::varchar)::text, ...])`."""
    return re.sub(r"::[a-z ]+(\[\])?|[()\s]", "", definition)


async def _fingerprint(url: str) -> dict[str, Any]:
    """Everything a restore must bring back, as plain values to compare."""
    conn = await _connect(url)
    try:
        tables = [r["name"] for r in await conn.fetch(
            "SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) AS name FROM pg_tables "
            "WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1")]
        rows = {}
        for table in tables:
            row = await conn.fetchrow(
                f"SELECT count(*) AS n, coalesce(md5(string_agg(t::text, E'\\n' ORDER BY t::text)), '') AS md5 "  # noqa: S608
                f"FROM {table} AS t")  # names from the catalogue, quoted by quote_ident
            rows[table] = (row["n"], row["md5"])
        return {
            "rows": rows,
            "sequences": {r["name"]: r["last_value"] for r in await conn.fetch(
                "SELECT schemaname || '.' || sequencename AS name, last_value FROM pg_sequences")},
            "indexes": sorted(tuple(r) for r in await conn.fetch(
                "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'")),
            "constraints": sorted((r[0], r[1], r[2], _same_check(r[3])) for r in await conn.fetch(
                "SELECT conrelid::regclass::text, conname, contype::text, pg_get_constraintdef(oid) FROM pg_constraint "
                "WHERE connamespace = 'public'::regnamespace")),
            "triggers": sorted(tuple(r) for r in await conn.fetch(
                "SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid) FROM pg_trigger "
                "WHERE NOT tgisinternal")),
            "functions": sorted(tuple(r) for r in await conn.fetch(
                "SELECT proname, md5(prosrc) FROM pg_proc WHERE pronamespace = 'public'::regnamespace")),
        }
    finally:
        await conn.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def drill(server_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Drill]:
    admin = await _admin(server_url)
    try:
        server_major = int(await admin.fetchval("SHOW server_version_num")) // 10000
        tools = _find_tools(server_major)
        if tools is None:
            pytest.skip(f"RESTORE DRILL NOT RUN: no pg_dump/pg_restore of version >= {server_major} found in "
                        "/usr/lib/postgresql/*/bin, PATH or the pgserver wheel; install postgresql-client")
        suffix = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
        source_name, restored_name = f"carnet_drill_src_{suffix}", f"carnet_drill_dst_{suffix}"
        for name in (source_name, restored_name):
            await admin.execute(f'CREATE DATABASE "{name}"')
        base = make_url(plain_dsn(server_url))
        source = base.set(database=source_name).render_as_string(hide_password=False)
        restored = base.set(database=restored_name).render_as_string(hide_password=False)
        try:
            await asyncio.to_thread(upgrade, source)  # Alembic's env runs its own event loop
            workdir = tmp_path_factory.mktemp("drill")
            await _load_through_the_api(source, workdir)
            dump = workdir / "carnet.dump"
            _run(tools.pg_dump, "--format=custom", "--file", dump, "--dbname", source)
            assert "PGDMP" in dump.read_bytes()[:5].decode("ascii", "replace")  # the custom format's magic
            _run(tools.pg_restore, "--list", dump)
            _run(tools.pg_restore, "--exit-on-error", "--single-transaction", "--no-owner", "--dbname", restored, dump)
            yield Drill(source, restored, dump)
        finally:
            for name in (source_name, restored_name):
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


class TestRestoreDrill:
    async def test_same_tables_row_counts_and_checksums(self, drill: Drill) -> None:
        source, restored = await _fingerprint(drill.source), await _fingerprint(drill.restored)
        empty = [t for t in MUST_HAVE_ROWS if source["rows"].get(f"public.{t}", (0, ""))[0] == 0
                 and source["rows"].get(f'public."{t}"', (0, ""))[0] == 0]
        assert not empty, f"the load left these tables empty, so the drill proves nothing about them: {empty}"
        assert restored["rows"].keys() == source["rows"].keys()
        mismatched = {t: (source["rows"][t], restored["rows"][t]) for t in source["rows"]
                      if source["rows"][t] != restored["rows"][t]}
        assert not mismatched, f"tables differ after restore (count, md5): {mismatched}"
        assert source["rows"]['public."order"'][0] == 60
        assert restored["sequences"] == source["sequences"]  # new rows get fresh ids after a restore

    async def test_the_checksum_sees_a_one_field_change(self, drill: Drill) -> None:
        """Control: the comparison above is not vacuous (one changed value changes the table's md5)."""
        conn = await _connect(drill.restored)
        checksum = "SELECT md5(string_agg(t::text, E'\\n' ORDER BY t::text)) FROM contact AS t"
        try:
            before = await conn.fetchval(checksum)
            async with conn.transaction():
                await conn.execute("UPDATE contact SET job_title = 'x' "
                                   "WHERE id = (SELECT min(id::text)::uuid FROM contact)")
                assert await conn.fetchval(checksum) != before
                raise _Undo
        except _Undo:
            pass
        finally:
            await conn.close()

    async def test_same_indexes_constraints_triggers_and_functions(self, drill: Drill) -> None:
        source, restored = await _fingerprint(drill.source), await _fingerprint(drill.restored)
        for kind in ("indexes", "constraints", "triggers", "functions"):
            assert restored[kind] == source[kind], kind
        assert source["triggers"], "the consent ledger's append-only trigger should be among them"

    async def test_restored_copy_is_at_alembic_head_and_answers_like_the_source(
        self, drill: Drill, tmp_path: Path
    ) -> None:
        conn = await _connect(drill.restored)
        try:
            assert await conn.fetchval("SELECT version_num FROM alembic_version") == head_revision()
        finally:
            await conn.close()
        pages = []
        for url in (drill.source, drill.restored):
            settings = Settings(database_url=url, jwt_secret=TEST_SECRET, data_dir=tmp_path,  # type: ignore[arg-type]
                                lifecycle_refresh_seconds=0, _env_file=None)  # type: ignore[call-arg]
            app = create_app(settings)
            async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://drill", headers=ADMIN
            ) as http:
                ready = (await http.get("/readyz")).json()
                assert (ready["status"], ready["schema"]) == ("ready", head_revision())
                page = (await http.get("/v1/contacts", params={"sort": "last_name", "limit": 1000})).json()
                orders = (await http.get("/v1/orders/ord-7")).json()
                consents = (await http.get(f"/v1/contacts/{page['data'][0]['id']}/consents")).json()
                pages.append((page["data"], orders, consents))
        assert pages[0] == pages[1]
        assert len(pages[0][0]) == CONTACTS - 1 + BATCH  # one contact was erased

    async def test_restored_consent_ledger_is_still_append_only(self, drill: Drill) -> None:
        conn = await _connect(drill.restored)
        try:
            with pytest.raises(asyncpg.PostgresError):
                await conn.execute("UPDATE consent_event SET source = 'tampered'")
            with pytest.raises(asyncpg.PostgresError):
                await conn.execute("DELETE FROM consent_event")
        finally:
            await conn.close()
