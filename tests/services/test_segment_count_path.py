"""GET /v1/segments/{id}/count: the compiled SQL cached per segment, executed in one guarded round trip.

The cache must never change an answer: the same counts as a fresh compile for random filters (first call
compiles, the second one runs the cached statement), a new answer as soon as the filter or an attribute
definition it names changes, and `within_days` windows that move with the clock.
"""

from __future__ import annotations

import math
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, insert, text, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.models import AttributeDefinition, Contact, Order, Segment
from app.models.base import utc_now
from app.services import segments
from tests.factories import ADMIN
from tests.services.test_segments_property import ATTRIBUTES, NOW, filters, make_world, matches, store

_segments = Segment.__table__  # type: ignore[attr-defined]
_defs = AttributeDefinition.__table__  # type: ignore[attr-defined]


async def _raw(sessions: async_sessionmaker[AsyncSession]) -> asyncpg.Connection:
    """The test transaction's own asyncpg connection (what app.db.bare_connection yields in the tests)."""
    return (await sessions.kw["bind"].get_raw_connection()).driver_connection


async def _segment(sessions: async_sessionmaker[AsyncSession], filter_: dict[str, Any]) -> uuid.UUID:
    segment_id = uuid.uuid4()
    async with sessions.begin() as session:
        await session.execute(insert(_segments).values(
            id=segment_id, name=f"count-path-{segment_id}", filter=filter_, version=1, created_at=NOW,
            updated_at=NOW))
    return segment_id


@pytest.fixture
def stored() -> dict[str, Any]:
    return {}


async def seed_world(sessions: async_sessionmaker[AsyncSession], stored: dict[str, Any], seed: int) -> None:
    """The world of test_segments_property, stored once per test: hypothesis runs every example of a test in its
    one transaction, with the one `stored` (the only contacts there)."""
    if not stored:
        stored.update(make_world(seed))
        async with sessions.begin() as session:
            await store(session, stored)


# A lone orders/carts/events condition is counted by a sort or by a hash, as the planner's estimate of its rows
# says (segments._hashes_better): on these few rows always by a sort, unless a sorted row is made to weigh more
# than any work_mem holds (the second seed). A count among other conditions is counted per contact or grouped from
# the rows, as the planner's costs say (segments._groups_better): never grouped with the second seed, always with
# the third.
@pytest.mark.parametrize(("seed", "row_bytes", "grouped_past"), [
    (3, segments.SORTED_ROW_BYTES, segments.GROUPED_PAST), (4, 2**60, math.inf), (5, segments.SORTED_ROW_BYTES, 0.0)])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(filter_=st.fixed_dictionaries({"all": st.lists(filters, min_size=1, max_size=2)}))
async def test_cached_count_matches_the_reference(
    sessions: async_sessionmaker[AsyncSession], stored: dict[str, Any], seed: int, row_bytes: int,
    grouped_past: float, filter_: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(segments, "SORTED_ROW_BYTES", row_bytes)
    monkeypatch.setattr(segments, "GROUPED_PAST", grouped_past)
    await seed_world(sessions, stored, seed)
    expected = sum(1 for c in stored["contacts"] if matches(c, filter_))
    segment_id = await _segment(sessions, filter_)
    connection = await _raw(sessions)
    first = await segments.count_stored(connection, segment_id, now=NOW)     # read, compile, cache
    cached = segments._cached_counts[segment_id]
    second = await segments.count_stored(connection, segment_id, now=NOW)    # the cached statement
    assert segments._cached_counts[segment_id] is cached
    assert first == second == expected, (stored["seed"], filter_)
    if segments._compile(filter_, ATTRIBUTES, NOW).count_among_others is not None:
        if grouped_past != segments.GROUPED_PAST:
            assert cached.other_chosen is (grouped_past == 0.0), filter_
        async with sessions() as session:  # the preview counts it the same way
            assert (await segments.preview(session, filter_, now=NOW))[1] == expected, filter_


# A lone count needing one row or more is counted from the rows grouped by contact (_Compiled.lone_count), by a
# stored segment's count and by the preview: every such count, on a world where contacts hold 0 to several rows.
_LONE_COUNTS = [
    {"field": "orders.count", "op": op, "value": n, **window}
    for op, n in [("gte", 2), ("gt", 1), ("eq", 1), ("eq", 2), ("gte", 3)] for window in ({}, {"within_days": 90})
] + [
    {"field": field, "op": "eq", "value": value, "count": {"op": op, "value": n}, **window}
    for field, value in [("orders.sku", "S1"), ("events.type", "page_view")]
    for op, n in [("gte", 2), ("eq", 1), ("gt", 2)] for window in ({}, {"within_days": 30})
]


async def test_lone_counts_grouped_from_the_rows_match_the_reference(
    sessions: async_sessionmaker[AsyncSession]
) -> None:
    world = make_world(5)
    async with sessions.begin() as session:
        await store(session, world)
    connection = await _raw(sessions)
    answers = set()
    for condition in _LONE_COUNTS:
        for filter_ in (condition, {"all": [condition]}):
            assert segments._compile(filter_, {}, NOW).lone_count is not None
            expected = sum(1 for c in world["contacts"] if matches(c, filter_))
            assert await segments.count_stored(connection, await _segment(sessions, filter_), now=NOW) == expected, \
                filter_
            async with sessions() as session:  # POST /v1/segments/preview counts it the same way
                assert (await segments.preview(session, filter_, now=NOW))[1] == expected, filter_
            answers.add(expected)
    assert len(answers) > 3  # the world tells these counts apart


# A count needing a row or more among other conditions (`_Compiled.count_among_others`), counted per contact and
# grouped from the rows (GROUPED_PAST huge: never grouped; 0: always), by the stored count and by the preview.
_AMONG_OTHERS = st.one_of(
    st.tuples(st.sampled_from(_LONE_COUNTS), filters).map(lambda pair: {"all": list(pair)}),
    st.tuples(filters, st.sampled_from(_LONE_COUNTS)).map(lambda pair: {"all": [{"all": list(pair)}]}),
)


@pytest.mark.parametrize("grouped_past", [math.inf, 0.0])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(filter_=_AMONG_OTHERS)
async def test_counts_among_other_conditions_match_the_reference(
    sessions: async_sessionmaker[AsyncSession], stored: dict[str, Any], grouped_past: float,
    filter_: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(segments, "GROUPED_PAST", grouped_past)
    await seed_world(sessions, stored, 6)
    expected = sum(1 for c in stored["contacts"] if matches(c, filter_))
    segment_id = await _segment(sessions, filter_)
    connection = await _raw(sessions)
    assert await segments.count_stored(connection, segment_id, now=NOW) == expected, filter_
    assert await segments.count_stored(connection, segment_id, now=NOW) == expected, filter_  # cached
    eligible = segments._compile(filter_, ATTRIBUTES, NOW).count_among_others is not None
    assert segments._cached_counts[segment_id].other_chosen is (eligible and grouped_past == 0.0), filter_
    async with sessions() as session:
        assert (await segments.preview(session, filter_, now=NOW))[1] == expected, filter_


async def _contact_with_order(sessions: async_sessionmaker[AsyncSession], placed_at: Any) -> uuid.UUID:
    contact_id = uuid.uuid4()
    async with sessions.begin() as session:
        await session.execute(insert(Contact.__table__).values(  # type: ignore[attr-defined]
            id=contact_id, email=f"{contact_id.hex}@shop.example", email_status="unverified", kind="customer",
            lifecycle_stage="new_customer", attributes={}, tags=[], orders_count=1, total_spent=Decimal(10),
            version=1, created_at=NOW, updated_at=NOW, source="api", city="Lyon"))
        await session.execute(insert(Order.__table__).values(  # type: ignore[attr-defined]
            id=uuid.uuid4(), external_id=uuid.uuid4().hex, contact_id=contact_id, placed_at=placed_at,
            status="paid", currency="EUR", total_amount=Decimal(10), items=[], created_at=NOW, updated_at=NOW))
    return contact_id


async def test_a_within_days_window_moves_with_the_clock(sessions: async_sessionmaker[AsyncSession]) -> None:
    now = utc_now()
    await _contact_with_order(sessions, now - timedelta(hours=23))
    segment_id = await _segment(sessions, {"all": [
        {"field": "orders.count", "op": "gte", "value": 1, "within_days": 1},
        {"field": "address.city", "op": "eq", "value": "lyon"},
    ]})
    connection = await _raw(sessions)
    assert await segments.count_stored(connection, segment_id, now=now) == 1
    cached = segments._cached_counts[segment_id]
    assert await segments.count_stored(connection, segment_id, now=now + timedelta(minutes=30)) == 1
    # 2 hours later the order is 25 hours old: out of the window, with the statement compiled 2 hours ago
    assert await segments.count_stored(connection, segment_id, now=now + timedelta(hours=2)) == 0
    assert segments._cached_counts[segment_id] is cached
    # and a window on a date attribute (the other time-relative parameter)
    async with sessions.begin() as session:
        await session.execute(insert(_defs).values(name="cp_seen", type="date", created_at=now, updated_at=now))
        await session.execute(update(Contact.__table__).values(  # type: ignore[attr-defined]
            attributes={"cp_seen": (now - timedelta(days=2)).date().isoformat()}))
    dated = await _segment(sessions, {"all": [{"field": "attributes.cp_seen", "op": "within_days", "value": 3}]})
    assert await segments.count_stored(connection, dated, now=now) == 1
    assert await segments.count_stored(connection, dated, now=now + timedelta(days=2)) == 0


async def test_a_changed_filter_is_counted_at_once(client: httpx.AsyncClient) -> None:
    for city in ("Lyon", "Lyon", "Paris"):
        created = await client.post("/v1/contacts", json={"email": f"{uuid.uuid4().hex}@shop.example",
                                                          "address": {"city": city}}, headers=ADMIN)
        assert created.status_code == 201, created.text
    made = await client.post("/v1/segments", json={
        "name": f"city-{uuid.uuid4().hex}", "filter": {"all": [{"field": "address.city", "op": "eq", "value": "Lyon"}]},
    }, headers=ADMIN)
    segment_id = made.json()["id"]
    url = f"/v1/segments/{segment_id}/count"
    assert (await client.get(url, headers=ADMIN)).json() == {"count": 2}
    assert (await client.get(url, headers=ADMIN)).json() == {"count": 2}  # cached
    patched = await client.patch(f"/v1/segments/{segment_id}", json={
        "filter": {"all": [{"field": "address.city", "op": "eq", "value": "Paris"}]}}, headers=ADMIN)
    assert patched.status_code == 200, patched.text
    assert (await client.get(url, headers=ADMIN)).json() == {"count": 1}
    assert (await client.delete(f"/v1/segments/{segment_id}", headers=ADMIN)).status_code == 204
    gone = await client.get(url, headers=ADMIN)
    assert gone.status_code == 404 and gone.headers["content-type"] == "application/problem+json"
    assert (await client.get(f"/v1/segments/{uuid.uuid4()}/count", headers=ADMIN)).status_code == 404


async def test_a_changed_attribute_definition_is_seen_at_once(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]
) -> None:
    made = await client.post("/v1/attributes", json={"name": "cp_level", "type": "number"}, headers=ADMIN)
    assert made.status_code == 201, made.text
    segment = await client.post("/v1/segments", json={
        "name": f"level-{uuid.uuid4().hex}", "filter": {"all": [{"field": "attributes.cp_level", "op": "gte",
                                                                   "value": 3}]}}, headers=ADMIN)
    url = f"/v1/segments/{segment.json()['id']}/count"
    assert (await client.get(url, headers=ADMIN)).json() == {"count": 0}
    assert (await client.get(url, headers=ADMIN)).json() == {"count": 0}  # cached
    # the definition changes under the cached statement (as another API process could do it): a text
    # attribute has no `gte`, so the stored filter is now invalid, and it says so instead of a stale count
    async with sessions.begin() as session:
        await session.execute(update(_defs).where(_defs.c.name == "cp_level").values(type="text"))
    invalid = await client.get(url, headers=ADMIN)
    assert invalid.status_code == 422, invalid.text
    assert invalid.json()["errors"][0]["field"] == "filter.all[0].op"
    async with sessions.begin() as session:
        await session.execute(delete(_defs).where(_defs.c.name == "cp_level"))
    assert (await client.get(url, headers=ADMIN)).json()["errors"][0]["code"] == "unknown_attribute"
    assert (await client.post("/v1/attributes", json={"name": "cp_level", "type": "number"},
                              headers=ADMIN)).status_code == 201
    assert (await client.get(url, headers=ADMIN)).json() == {"count": 0}


async def test_the_cache_is_bounded(sessions: async_sessionmaker[AsyncSession], monkeypatch: Any) -> None:
    monkeypatch.setattr(segments, "MAX_CACHED_SEGMENTS", 2)
    monkeypatch.setattr(segments, "_cached_counts", {})
    connection = await _raw(sessions)
    ids = [await _segment(sessions, {"all": [{"field": "kind", "op": "eq", "value": "customer"}]}) for _ in range(3)]
    for segment_id in ids:
        await segments.count_stored(connection, segment_id)
    assert list(segments._cached_counts) == ids[1:]
    assert await connection.fetchval("SELECT 1") == 1  # the transaction is still usable


async def test_a_count_among_other_conditions_is_grouped_when_they_leave_many_contacts(
    sessions: async_sessionmaker[AsyncSession]
) -> None:
    """"2 orders or more within a year" with a city: counted contact by contact for a city of few contacts, grouped
    from the orders for the city of most of them (the planner's costs after ANALYZE), the same numbers either way,
    by the stored segment's count and by the preview."""
    orders_of = [i % 4 for i in range(1_500)]  # 0 to 3 orders each, the last 5 contacts in Lyon
    contacts = [{
        "id": uuid.uuid4(), "email": f"g{i}-{uuid.uuid4().hex[:8]}@shop.example", "email_status": "unverified",
        "kind": "customer", "lifecycle_stage": "new_customer", "attributes": {}, "tags": [], "orders_count": n,
        "total_spent": Decimal(10 * n), "version": 1, "created_at": NOW, "updated_at": NOW, "source": "api",
        "city": "Lyon" if i >= 1_495 else "Paris"} for i, n in enumerate(orders_of)]
    orders = [{"id": uuid.uuid4(), "external_id": uuid.uuid4().hex, "contact_id": c["id"],
               "placed_at": NOW - timedelta(days=30 * k), "status": "paid", "currency": "EUR",
               "total_amount": Decimal(10), "items": [], "created_at": NOW, "updated_at": NOW}
              for c, n in zip(contacts, orders_of, strict=True) for k in range(n)]
    async with sessions.begin() as session:
        await session.execute(insert(Contact.__table__), contacts)  # type: ignore[attr-defined]
        await session.execute(insert(Order.__table__), orders)  # type: ignore[attr-defined]
        await session.execute(text('ANALYZE contact, "order"'))
    connection = await _raw(sessions)
    for city, grouped in (("paris", True), ("lyon", False)):
        filter_ = {"all": [{"field": "orders.count", "op": "gte", "value": 2, "within_days": 365},
                           {"field": "address.city", "op": "eq", "value": city}]}
        expected = sum(1 for c, n in zip(contacts, orders_of, strict=True) if n >= 2 and c["city"].lower() == city)
        segment_id = await _segment(sessions, filter_)
        assert await segments.count_stored(connection, segment_id, now=NOW) == expected
        cached = segments._cached_counts[segment_id]
        assert cached.other_chosen is grouped, city
        assert ("GROUP BY" in cached.other.sql) and ("GROUP BY" not in cached.usual.sql)  # type: ignore[union-attr]
        assert await segments.count_stored(connection, segment_id, now=NOW) == expected  # the cached statement
        async with sessions() as session:
            assert (await segments.preview(session, filter_, now=NOW))[1] == expected
    assert expected == 3  # Lyon's contacts with 2 or 3 orders: the numbers above are not all zero
