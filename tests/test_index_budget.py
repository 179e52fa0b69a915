"""The index budget of `contact` (docs/performance.md "Index budget"): every index is named there with the query it
serves, and that query, as the API builds it, uses it.

- The table in the docs and the indexes of a migrated `contact` are the same set: a new index must be budgeted.
- Each query below is captured from the service that runs it (the SQL and parameters sent to PostgreSQL), then
  EXPLAINed on a populated, analyzed table twice: with its parameters (a custom plan) and as a prepared
  statement under `plan_cache_mode = force_generic_plan` (what asyncpg's statement cache runs after a few calls):
  a partial index serves a generic plan only when the query itself implies the index's predicate.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db import make_engine
from app.models import Contact
from app.schemas.contacts import ContactSort
from app.services import contacts, duplicates, segments
from app.services.pagination import CursorCodec
from tests.conftest import migrated_database

DOCS = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
ROWS = 30_000
CODEC = CursorCodec("index-budget-" + "x" * 32)

# A shop's file in miniature: most contacts are prospects without tags; names, cities and postal codes repeat.
_POPULATE = f"""
INSERT INTO contact (id, external_id, email, phone, first_name, last_name, company, postal_code, city, country,
                     kind, lifecycle_stage, tags, last_order_at, created_at, updated_at, email_status, version)
SELECT gen_random_uuid(),
       CASE WHEN i % 9 <> 6 THEN 'ext-' || i END,  -- some contacts have no external id (signups, imports)
       CASE WHEN i % 40 = 0 THEN 'first' || i || '+news@gmail.com' ELSE 'user' || i || '@example.com' END,
       CASE WHEN i % 5 <> 0 THEN '+336' || lpad((i % 20000)::text, 8, '0') END,
       'First' || (i % 700),
       'Name' || (i % 2500),
       CASE WHEN i % 3 = 0 THEN 'Company' || (i % 900) END,
       lpad((i % 2000)::text, 5, '0'),
       'City' || (i % 300),
       CASE WHEN i % 100 = 0 THEN 'BE' ELSE 'FR' END,
       CASE WHEN i % 50 = 0 THEN 'customer' ELSE 'prospect' END,
       CASE WHEN i % 50 = 0 THEN 'loyal_customer' ELSE 'prospect' END,
       CASE WHEN i % 60 = 0 THEN ARRAY['vip'] ELSE '{{}}' END,
       CASE WHEN i % 10 = 0 THEN now() - i * interval '1 minute' END,
       now() - i * interval '1 minute',
       now() - i * interval '1 minute',
       'unverified', 1
FROM generate_series(1, {ROWS}) AS i;
-- a few duplicates for every rule: the same person again, written differently
UPDATE contact SET first_name = 'Zoë', last_name = 'Dupont-Léger', postal_code = '75 011'
WHERE external_id IN ('ext-10', 'ext-20');
UPDATE contact SET email = 'zoe.dupont+' || external_id || '@gmail.com' WHERE external_id IN ('ext-30', 'ext-40')
"""  # noqa: S608 (ROWS is a constant)

Captured = tuple[str, tuple[Any, ...]]
Query = Callable[[AsyncSession], Awaitable[Any]]


def budget_in_docs() -> dict[str, str]:
    """index name → the query it serves, from the "Index budget" table of docs/performance.md."""
    section = DOCS.read_text().split("## Index budget", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| (.+?) \|", section, flags=re.MULTILINE)
    return dict(rows)


@pytest.fixture(scope="module")
def populated(server_url: str, worker_id: str) -> Iterator[str]:
    with migrated_database(server_url, f"carnet_budget_{worker_id}_{os.getpid()}") as url:
        async def fill() -> None:
            engine = make_engine(url, pool_size=1)
            async with engine.begin() as connection:
                for statement in _POPULATE.split(";\n"):
                    await connection.exec_driver_sql(statement)
                await connection.exec_driver_sql("ANALYZE contact")
            await engine.dispose()
        asyncio.run(fill())
        yield url


def capture(url: str, run: Query) -> tuple[list[Captured], dict[str, Any]]:
    """Run a service call; return the statements it sent, and the plans of the one that reads `contact` (the last,
    or the one marked on `run`), custom and generic."""
    async def go() -> tuple[list[Captured], dict[str, Any]]:
        engine = make_engine(url, pool_size=1)
        sent: list[Captured] = []

        @event.listens_for(engine.sync_engine, "before_cursor_execute")
        def _keep(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
            sent.append((statement, tuple(parameters or ())))

        try:
            async with async_sessionmaker(engine, expire_on_commit=False)() as session:
                await run(session)
            marker = getattr(run, "marker", "FROM contact")
            statement, parameters = next(s for s in reversed(sent) if marker in s[0])
            async with engine.connect() as connection:
                raw = (await connection.get_raw_connection()).driver_connection
                custom = await raw.fetchval(f"EXPLAIN (FORMAT JSON) {statement}", *parameters)
                await raw.execute(f"PREPARE budget_query AS {statement}")
                await raw.execute("SET plan_cache_mode = force_generic_plan")
                arguments = [await _literal(raw, p) for p in parameters]
                listed = f"({', '.join(arguments)})" if arguments else ""
                generic = await raw.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE budget_query{listed}")
                await raw.execute("DEALLOCATE budget_query; RESET plan_cache_mode")
            return sent, {"custom": _json(custom), "generic": _json(generic)}
        finally:
            await engine.dispose()
    return asyncio.run(go())


def _json(plan: Any) -> Any:
    return json.loads(plan) if isinstance(plan, str) else plan  # the app's connections decode json themselves


async def _literal(raw: Any, value: Any) -> str:
    """A parameter as an SQL literal of unknown type (EXECUTE casts it to the prepared parameter's type)."""
    if isinstance(value, list):
        return str(await raw.fetchval("SELECT quote_nullable($1::text[]::text)", [str(v) for v in value]))
    text = value.isoformat() if isinstance(value, datetime) else None if value is None else str(value)
    return str(await raw.fetchval("SELECT quote_nullable($1::text)", text))


def indexes_used(plan: Any) -> set[str]:
    found: set[str] = set()
    stack = [plan]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "Index Name" in node:
                found.add(node["Index Name"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def listing(sort: str = "-created_at", **filters: Any) -> Query:
    return lambda s: contacts.list_page(s, contacts.ContactFilters(**filters), sort=ContactSort(sort), limit=50,
                                        cursor=None, codec=CODEC)


def segment_count(filter_: dict[str, Any]) -> Query:
    async def run(session: AsyncSession) -> int:
        return await segments.count(session, await segments.compile_filter(session, filter_))
    return run


def duplicate_page(reason: duplicates.Reason) -> Query:
    async def run(session: AsyncSession) -> Any:
        return await duplicates.candidates_page(session, reasons=[reason], limit=50, cursor=None, codec=CODEC)
    run.marker = duplicates.KEYS_MARKER  # type: ignore[attr-defined]  # the keys, not the contacts read after them
    return run


async def _read(session: AsyncSession) -> None:
    row = (await session.execute(select(Contact.__table__.c.id).limit(1))).first()  # type: ignore[attr-defined]
    assert row is not None
    await contacts.get(session, row[0])


def _condition(field: str, value: Any, op: str = "eq") -> dict[str, Any]:
    return {"field": field, "op": op, "value": value}


# index → (the documented query, as the service runs it); the docs table names the same indexes.
QUERIES: dict[str, list[Query]] = {
    "pk_contact": [_read],
    "uq_contact_email": [listing(email="user123@example.com"), listing(q="user1234")],
    "uq_contact_external_id": [listing(external_id="ext-77")],
    "ix_contact_created_at_id": [listing("-created_at"), listing("created_at")],
    "ix_contact_updated_at_id": [listing("updated_at")],
    "ix_contact_sort_last_name": [listing("last_name"), listing("-last_name")],
    "ix_contact_sort_last_order_at": [listing("-last_order_at")],
    "ix_contact_q_last_name": [listing(q="name1234")],
    "ix_contact_q_first_name": [listing(q="first123")],
    "ix_contact_q_company": [listing(q="company12")],
    "ix_contact_phone": [listing(q="06 00 00 12 34"), duplicate_page(duplicates.Reason.PHONE)],
    "ix_contact_city": [listing(city="city17"), segment_count(_condition("address.city", "City17"))],
    "ix_contact_postal_code": [listing(postal_code="00042"), segment_count(_condition("address.postal_code", "00042"))],
    "ix_contact_country": [segment_count(_condition("address.country", "BE"))],
    "ix_contact_kind": [listing(kind="customer"), segment_count(_condition("kind", "customer")),
                        segment_count(_condition("kind", ["customer", "vendor"], "in"))],
    "ix_contact_lifecycle_stage": [listing(lifecycle_stage="loyal_customer"),
                                   segment_count(_condition("lifecycle_stage", "loyal_customer"))],
    "ix_contact_tags": [listing(tags=["vip"]), segment_count(_condition("tags", "vip", "contains")),
                        segment_count(_condition("tags", ["vip", "press"], "in"))],
    "ix_contact_name_key": [duplicate_page(duplicates.Reason.NAME_POSTAL_CODE)],
    "ix_contact_email_key": [duplicate_page(duplicates.Reason.EMAIL)],
}


def test_every_index_of_contact_is_budgeted(populated: str) -> None:
    async def names() -> set[str]:
        engine = make_engine(populated, pool_size=1)
        async with engine.connect() as connection:
            rows = await connection.exec_driver_sql("SELECT indexname FROM pg_indexes WHERE tablename = 'contact'")
            found = {r[0] for r in rows}
        await engine.dispose()
        return found
    budget = budget_in_docs()
    assert set(budget) == asyncio.run(names()), "docs/performance.md 'Index budget' must name every index of contact"
    assert set(QUERIES) == set(budget), "each budgeted index needs its query in QUERIES"


@pytest.mark.parametrize("index", sorted(QUERIES))
def test_the_documented_query_uses_the_index(populated: str, index: str) -> None:
    for run in QUERIES[index]:
        sent, plans = capture(populated, run)
        if " LIKE " in sent[-1][0]:
            # `q`: a LIKE pattern given as a parameter has no index range until it is known, so no generic plan can
            # use these indexes; PostgreSQL keeps custom plans for such a statement (its generic plan costs more).
            del plans["generic"]
        for mode, plan in plans.items():
            used = indexes_used(plan)
            assert index in used, f"{index}: not in the {mode} plan of {sent[-1][0][:300]}… (uses {sorted(used)})"


def test_prospects_and_untagged_contacts_stay_out_of_the_partial_indexes(populated: str) -> None:
    """The partial indexes hold only what an indexed query can find (their size tells)."""
    async def sizes() -> dict[str, int]:
        engine = make_engine(populated, pool_size=1)
        async with engine.connect() as connection:
            rows = await connection.exec_driver_sql(
                "SELECT indexrelid::regclass::text, reltuples::bigint FROM pg_index JOIN pg_class c "
                "ON c.oid = indexrelid WHERE indrelid = 'contact'::regclass")
            found = {r[0]: r[1] for r in rows}
        await engine.dispose()
        return found
    tuples = asyncio.run(sizes())
    assert tuples["ix_contact_kind"] == tuples["ix_contact_lifecycle_stage"] == ROWS // 50
    assert tuples["ix_contact_tags"] == ROWS // 60
    assert tuples["ix_contact_phone"] == ROWS - ROWS // 5
    assert tuples["ix_contact_q_company"] == ROWS // 3
    assert tuples["uq_contact_external_id"] == sum(i % 9 != 6 for i in range(1, ROWS + 1))


def test_the_name_key_is_unchanged_by_its_ascii_shortcut(populated: str) -> None:
    """Migration 0025 skips NFKD for ASCII names: the keys are what the full normalization gives."""
    names = ["Jean-Pierre", "JEAN PIERRE", "Zoë", "Œuvre", "Straße", "O'Brien", "Ｆｕｌｌ", "ﬁne", "Æsa", "l’Été", ""]
    async def differing() -> list[Any]:
        engine = make_engine(populated, pool_size=1)
        async with engine.connect() as connection:
            rows = await connection.exec_driver_sql(
                "SELECT f, l FROM unnest($1::text[]) f, unnest($1::text[]) l WHERE carnet_name_key(f, l, '75 011') "
                "IS DISTINCT FROM (SELECT nullif(regexp_replace(replace(replace(replace(lower(normalize(f, NFKD)), "
                "'œ', 'oe'), 'æ', 'ae'), 'ß', 'ss'), '[\\u0300-\\u036f[:space:]''’.,_-]+', '', 'g'), '') || ' ' || "
                "nullif(regexp_replace(replace(replace(replace(lower(normalize(l, NFKD)), 'œ', 'oe'), 'æ', 'ae'), "
                "'ß', 'ss'), '[\\u0300-\\u036f[:space:]''’.,_-]+', '', 'g'), '') || '|75011')",
                (names,))
            found = list(rows)
        await engine.dispose()
        return found
    assert asyncio.run(differing()) == []

