"""Property: the compiled segment query selects exactly the contacts a plain Python reading of the filter does.

A dozen random contacts (city, kind, tags, stats, typed attributes, orders, events, consent events, list
memberships) are written once per seed with SQL in the test transaction; hypothesis then draws filters over
every supported field and op, and the ids from `compile_filter` are compared with `matches()` below.
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.models import AttributeDefinition, ConsentEvent, Contact, Event, ListMembership, MailingList, Order
from app.services import segments

NOW = datetime.now(UTC).replace(microsecond=0)
CITIES = ["Lyon", "lyon", "Paris", "Nantes", None]
KINDS = ["customer", "prospect", "vendor", "partner"]
TAGS = ["vip", "b2b", "promo"]
SKUS = ["S1", "S2", "S3"]
CATEGORIES = ["shoes", "bags"]
EVENT_TYPES = ["page_view", "cart_abandoned"]
COLORS = ["red", "blue", "green"]
HOBBIES = ["golf", "ski", "chess"]
DAYS = [0, 1, 3, 7, 30, 90, 400]
LIST_IDS = [uuid.UUID(int=i + 1) for i in range(2)]
ATTRIBUTES = {"p_score": "number", "p_vip": "boolean", "p_day": "date", "p_hobbies": "multi_enum",
              "p_color": "enum", "p_note": "text"}


def ago(days: float) -> datetime:
    return NOW - timedelta(days=days)


# ---- the data set --------------------------------------------------------------------------------------------


def make_world(seed: int) -> dict[str, Any]:
    rnd = random.Random(seed)  # noqa: S311 (test data, reproducible by seed)
    contacts = []
    for i in range(12):
        attributes: dict[str, Any] = {}
        if rnd.random() < 0.7:
            attributes["p_score"] = rnd.choice([0, 1.5, 3, 7, 10])
        if rnd.random() < 0.6:
            attributes["p_vip"] = rnd.random() < 0.5
        if rnd.random() < 0.6:
            attributes["p_day"] = (NOW.date() - timedelta(days=rnd.choice(DAYS))).isoformat()
        if rnd.random() < 0.6:
            attributes["p_hobbies"] = rnd.sample(HOBBIES, rnd.randint(0, 2))
        if rnd.random() < 0.6:
            attributes["p_color"] = rnd.choice(COLORS)
        if rnd.random() < 0.6:
            attributes["p_note"] = rnd.choice(["Hello World", "hello", "50% off_now"])
        orders = [{"sku": rnd.choice(SKUS), "category": rnd.choice(CATEGORIES),
                   "status": rnd.choice(["paid", "paid", "delivered", "cancelled", "refunded"]),
                   "placed_at": ago(rnd.choice(DAYS) + 0.37)} for _ in range(rnd.randint(0, 3))]
        valid = [o for o in orders if o["status"] not in ("cancelled", "refunded")]
        spent = Decimal(sum(rnd.choice([10, 25, 40]) for _ in valid))
        contacts.append({
            "id": uuid.UUID(int=(seed << 32) + i + 1000), "email": f"p{seed}-{i}@example.com",
            "email_status": "unverified", "city": rnd.choice(CITIES), "company": rnd.choice([None, "Acme", "acme sa"]),
            "kind": rnd.choice(KINDS), "lifecycle_stage": "prospect", "tags": rnd.sample(TAGS, rnd.randint(0, 2)),
            "attributes": attributes, "orders_count": len(valid), "total_spent": spent,
            "average_basket": (spent / len(valid)).quantize(Decimal("0.01")) if valid else None,
            "last_order_at": max((o["placed_at"] for o in valid), default=None),
            "created_at": ago(rnd.choice(DAYS) + 0.5), "updated_at": NOW, "version": 1,
            "_orders": orders,
            "_events": [{"type": rnd.choice(EVENT_TYPES), "occurred_at": ago(rnd.choice(DAYS) + 0.21)}
                        for _ in range(rnd.randint(0, 3))],
            "_consents": [{"action": rnd.choice(["granted", "withdrawn", "confirmed"]),
                           "occurred_at": ago(rnd.choice([1, 5, 5, 20]))} for _ in range(rnd.randint(0, 3))],
            "_lists": {lid: rnd.choice(["subscribed", "unsubscribed", "pending"])
                       for lid in LIST_IDS if rnd.random() < 0.5},
        })
    return {"seed": seed, "contacts": contacts}


async def store(session: AsyncSession, world: dict[str, Any]) -> None:
    tables = {m: m.__table__ for m in (AttributeDefinition, Contact, Order, Event, ConsentEvent, MailingList,  # type: ignore[attr-defined]
                                       ListMembership)}
    for name, kind in ATTRIBUTES.items():
        options = HOBBIES if name == "p_hobbies" else COLORS if name == "p_color" else None
        exists = await session.scalar(select(tables[AttributeDefinition].c.name).where(
            tables[AttributeDefinition].c.name == name))
        if exists is None:
            await session.execute(insert(tables[AttributeDefinition]).values(
                name=name, type=kind, options=options, created_at=NOW, updated_at=NOW))
    for lid in LIST_IDS:
        if await session.scalar(select(tables[MailingList].c.id).where(tables[MailingList].c.id == lid)) is None:
            await session.execute(insert(tables[MailingList]).values(
                id=lid, name=f"prop-{lid}", double_opt_in=False, version=1, created_at=NOW, updated_at=NOW))
    for c in world["contacts"]:
        await session.execute(insert(tables[Contact]).values({k: v for k, v in c.items() if not k.startswith("_")}))
        for o in c["_orders"]:
            await session.execute(insert(tables[Order]).values(
                id=uuid.uuid4(), external_id=uuid.uuid4().hex, contact_id=c["id"], placed_at=o["placed_at"],
                status=o["status"], currency="EUR", total_amount=Decimal(10), created_at=NOW, updated_at=NOW,
                items=[{"sku": o["sku"], "category": o["category"], "quantity": 1}]))
        for e in c["_events"]:
            await session.execute(insert(tables[Event]).values(
                contact_id=c["id"], type=e["type"], occurred_at=e["occurred_at"], properties={}, created_at=NOW))
        for ev in c["_consents"]:  # inserted in list order: ids grow, ties on occurred_at are broken by id
            await session.execute(insert(tables[ConsentEvent]).values(
                contact_id=c["id"], purpose="email_marketing", action=ev["action"], occurred_at=ev["occurred_at"],
                recorded_at=NOW, recorded_by="test"))
        for lid, status in c["_lists"].items():
            await session.execute(insert(tables[ListMembership]).values(
                list_id=lid, contact_id=c["id"], status=status, updated_at=NOW))


# ---- the reference: a plain reading of the filter ------------------------------------------------------------


def _ts(value: str) -> datetime:
    return datetime.combine(date.fromisoformat(value), datetime.min.time(), UTC) if len(value) == 10 \
        else datetime.fromisoformat(value)


def _compare(actual: Any, op: str, value: Any, parse: Any = lambda v: v) -> bool:
    if op == "neq":
        return actual is None or actual != parse(value)
    if op == "nin":
        return actual is None or actual not in [parse(v) for v in value]
    if actual is None:
        return False
    match op:
        case "eq":
            return bool(actual == parse(value))
        case "in":
            return actual in [parse(v) for v in value]
        case "gt":
            return bool(actual > parse(value))
        case "gte":
            return bool(actual >= parse(value))
        case "lt":
            return bool(actual < parse(value))
        case "lte":
            return bool(actual <= parse(value))
        case "between":
            return bool(parse(value[0]) <= actual <= parse(value[1]))
    raise AssertionError(op)


def _count_ok(n: int, spec: dict[str, Any] | None) -> bool:
    return n > 0 if spec is None else _compare(n, spec["op"], spec["value"])


def matches(c: dict[str, Any], node: dict[str, Any]) -> bool:
    if "all" in node:
        return all(matches(c, n) for n in node["all"])
    if "any" in node:
        return any(matches(c, n) for n in node["any"])
    if "not" in node:
        return not matches(c, node["not"])
    name, op, value = node["field"], node["op"], node.get("value", True)
    cutoff = NOW - timedelta(days=node.get("within_days", 0)) if "within_days" in node else None
    if name == "address.city":
        city = c["city"].lower() if c["city"] else None
        if op == "exists":
            return (city is not None) == value
        if op == "contains":
            return city is not None and value.lower() in city
        return _compare(city, op, value, str.lower)
    if name == "kind":
        return _compare(c["kind"], op, value)
    if name == "company":
        if op == "contains":
            return c["company"] is not None and value.lower() in c["company"].lower()
        if op == "exists":
            return (c["company"] is not None) == value
        return _compare(c["company"], op, value)
    if name == "tags":
        match op:
            case "eq" | "contains":
                return value in c["tags"]
            case "neq":
                return value not in c["tags"]
            case "in":
                return bool(set(value) & set(c["tags"]))
            case "nin":
                return not set(value) & set(c["tags"])
            case "exists":
                return bool(c["tags"]) == value
    if name == "lists":
        subscribed = {lid for lid, s in c["_lists"].items() if s == "subscribed"}
        ids = {uuid.UUID(v) for v in (value if isinstance(value, list) else [value])}
        hit = bool(ids & subscribed)
        return not hit if op in ("neq", "nin") else hit
    if name == "stats.orders_count":
        return _compare(c["orders_count"], op, value)
    if name in ("stats.total_spent", "stats.average_basket"):
        actual = c[name.removeprefix("stats.")]
        if op == "exists":
            return (actual is not None) == value
        return _compare(actual, op, value, lambda v: Decimal(str(v)))
    if name in ("stats.last_order_at", "created_at"):
        actual = c[name.removeprefix("stats.")]
        return _time(actual, op, value, lambda v: _ts(v), now=NOW)
    if name.startswith("attributes."):
        attr = name.removeprefix("attributes.")
        actual = c["attributes"].get(attr)
        if op == "exists":
            return (attr in c["attributes"]) == value
        match ATTRIBUTES[attr]:
            case "number":
                return _compare(None if actual is None else Decimal(str(actual)), op, value,
                                lambda v: Decimal(str(v)))
            case "boolean":
                return _compare(actual, op, value)
            case "date":
                return _time(None if actual is None else date.fromisoformat(actual), op, value, date.fromisoformat,
                             now=NOW.date())
            case "multi_enum":
                held = set(actual or [])
                match op:
                    case "contains":
                        return value in held
                    case "neq":
                        return value not in held
                    case "in":
                        return bool(held & set(value))
                    case "nin":
                        return not held & set(value)
            case _:
                if op == "contains":
                    return actual is not None and value.lower() in actual.lower()
                return _compare(actual, op, value)
    if name in ("orders.sku", "orders.category"):
        key = name.removeprefix("orders.")
        wanted = [value] if op == "eq" else value
        n = sum(1 for o in c["_orders"] if o["status"] not in ("cancelled", "refunded") and o[key] in wanted
                and (cutoff is None or o["placed_at"] >= cutoff))
        return _count_ok(n, node.get("count"))
    if name == "orders.count":
        n = sum(1 for o in c["_orders"] if o["status"] not in ("cancelled", "refunded")
                and (cutoff is None or o["placed_at"] >= cutoff))
        return _compare(n, op, value)
    if name == "events.type":
        wanted = [value] if op == "eq" else value
        n = sum(1 for e in c["_events"] if e["type"] in wanted and (cutoff is None or e["occurred_at"] >= cutoff))
        return _count_ok(n, node.get("count"))
    if name == "consents.email_marketing":
        ordered = sorted(enumerate(c["_consents"]), key=lambda p: (p[1]["occurred_at"], p[0]))
        granted = bool(ordered) and ordered[-1][1]["action"] in ("granted", "confirmed")
        return granted == value
    raise AssertionError(name)


def _time(actual: Any, op: str, value: Any, parse: Any, *, now: Any) -> bool:
    if op == "exists":
        return (actual is not None) == value
    if actual is None:
        return op == "neq"
    if op == "within_days":
        return bool(actual >= now - timedelta(days=value))
    if op == "older_than_days":
        return bool(actual < now - timedelta(days=value))
    return _compare(actual, op, value, parse)


# ---- the filters ---------------------------------------------------------------------------------------------


def cond(field: str, ops: list[str], one: st.SearchStrategy[Any], **extra: st.SearchStrategy[Any]) -> Any:
    many = st.lists(one, min_size=1, max_size=3)

    @st.composite
    def build(draw: Any) -> dict[str, Any]:
        op = draw(st.sampled_from(ops))
        if op == "exists":
            value = draw(st.booleans())
        elif op in ("in", "nin"):
            value = draw(many)
        elif op == "between":
            value = sorted(draw(st.lists(one, min_size=2, max_size=2)), key=lambda v: (str(type(v)), v))
        elif op in ("within_days", "older_than_days"):
            value = draw(st.sampled_from(DAYS))
        else:
            value = draw(one)
        node = {"field": field, "op": op, "value": value}
        for key, strategy in extra.items():
            drawn = draw(st.none() | strategy)
            if drawn is not None:
                node[key] = drawn
        return node

    return build()


ORDERED = ["eq", "neq", "in", "nin", "gt", "gte", "lt", "lte", "between"]
TIME_OPS = ["gt", "gte", "lt", "lte", "between", "within_days", "older_than_days", "exists"]
counts = st.fixed_dictionaries({"op": st.sampled_from(["eq", "neq", "gt", "gte", "lt", "lte"]),
                                "value": st.integers(0, 3)})
day_strings = st.sampled_from([(NOW.date() - timedelta(days=d)).isoformat() for d in DAYS])
moments = day_strings | st.sampled_from([ago(d + 0.1).isoformat() for d in DAYS])
leaves = st.one_of(
    cond("address.city", ["eq", "neq", "in", "nin", "contains", "exists"],
         st.sampled_from(["Lyon", "PARIS", "nan", "x"])),
    cond("kind", ["eq", "neq", "in", "nin"], st.sampled_from(KINDS)),
    cond("company", ["eq", "neq", "contains", "exists"], st.sampled_from(["Acme", "acme", "sa"])),
    cond("tags", ["eq", "contains", "neq", "in", "nin", "exists"], st.sampled_from(TAGS)),
    cond("lists", ["eq", "neq", "in", "nin"], st.sampled_from([str(i) for i in LIST_IDS])),
    cond("stats.orders_count", ORDERED, st.integers(0, 3)),
    cond("stats.total_spent", ORDERED, st.sampled_from([0, 10, "25", 40.0, 65])),
    cond("stats.average_basket", [*ORDERED, "exists"], st.sampled_from([10, "25.00", 30])),
    cond("stats.last_order_at", TIME_OPS, moments),
    cond("created_at", TIME_OPS, moments),
    cond("attributes.p_score", [*ORDERED, "exists"], st.sampled_from([0, 1.5, 3, "7", 10])),
    cond("attributes.p_vip", ["eq", "neq", "exists"], st.booleans()),
    cond("attributes.p_day", ["eq", "neq", *TIME_OPS], day_strings),
    cond("attributes.p_hobbies", ["contains", "neq", "in", "nin", "exists"], st.sampled_from(HOBBIES)),
    cond("attributes.p_color", ["eq", "neq", "in", "nin", "exists"], st.sampled_from(COLORS)),
    cond("attributes.p_note", ["eq", "neq", "contains", "exists"], st.sampled_from(["hello", "% off_", "World"])),
    cond("orders.sku", ["eq", "in"], st.sampled_from(SKUS), within_days=st.sampled_from(DAYS), count=counts),
    cond("orders.category", ["eq", "in"], st.sampled_from(CATEGORIES), within_days=st.sampled_from(DAYS),
         count=counts),
    cond("orders.count", ["eq", "neq", "gt", "gte", "lt", "lte", "between"], st.integers(0, 3),
         within_days=st.sampled_from(DAYS)),
    cond("events.type", ["eq", "in"], st.sampled_from(EVENT_TYPES), within_days=st.sampled_from(DAYS),
         count=counts),
    cond("consents.email_marketing", ["eq"], st.booleans()),
)
filters = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.builds(lambda xs: {"all": xs}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda xs: {"any": xs}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda x: {"not": x}, inner),
    ),
    max_leaves=6,
)


# ---- the property ---------------------------------------------------------------------------------------------

@pytest.fixture
def stored() -> dict[str, Any]:
    """Per test (hypothesis reuses it across the examples of one test, like the `sessions` transaction)."""
    return {}


@pytest.mark.parametrize("seed", [1, 2])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(filter_=st.fixed_dictionaries({"all": st.lists(filters, min_size=1, max_size=2)}))
async def test_compiled_query_matches_the_reference(
    sessions: async_sessionmaker[AsyncSession], stored: dict[str, Any], seed: int, filter_: dict[str, Any]
) -> None:
    if not stored:  # once per test: the fixtures, and the test transaction, live across examples
        stored.update(make_world(seed))
        async with sessions.begin() as session:
            await store(session, stored)
    world = stored
    ours = [c["id"] for c in world["contacts"]]
    async with sessions() as session:
        condition = await segments.compile_filter(session, filter_, now=NOW)
        contact = Contact.__table__  # type: ignore[attr-defined]
        got = set((await session.scalars(select(contact.c.id).where(condition, contact.c.id.in_(ours)))).all())
    expected = {c["id"] for c in world["contacts"] if matches(c, filter_)}
    assert got == expected, (world["seed"], filter_)
