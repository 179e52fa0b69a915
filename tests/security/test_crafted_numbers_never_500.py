"""Class 5: crafted numbers, and filters that cannot run (issue 15, finding 5).

The attack: a segment value `"1e1000000"` answered 500 on preview (`abs()` of it overflows Python's decimal
context); `"1e-1000000"` was saved, and from then on the segment's count, contacts and `?segment=` answered 500
(PostgreSQL's numeric cannot take it) and its export was empty; an `If-Match` of 5,000 digits answered 500
(int() refuses more than 4,300 digits). The defence (docs/security.md, "Class 5"): every number is checked
against the bounds of what stores or compares it, without arithmetic that can overflow, and declared; a filter
is tried by PostgreSQL when it is saved; every header Carnet parses is bounded first.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.models import Segment
from app.security import Role
from tests.auth import bearer
from tests.factories import ADMIN, make_attribute, make_contact
from tests.security.openapi_bounds import unbounded_inputs

VIEWER = bearer(Role.VIEWER, subject="intern@shop.example")
MANAGER = bearer(Role.MANAGER, subject="agency@shop.example")

# As strings (the grammar compares strings as numbers) and as JSON numbers past what anything stores.
CRAFTED: list[Any] = ["1e1000000", "-1e1000000", "1e-1000000", "-1E-999999999", "1E+999999999", "NaN", "-Infinity",
                      "sNaN", "1" * 40, "9" * 41, 1e308, -1e308, 10**4000, 1e-300, "0x10", "1_0"]


def _names_the_value(response: httpx.Response, field: str) -> None:
    assert response.status_code == 422, response.text[:300]
    assert response.json()["errors"][0]["field"] == field, response.text[:300]


@pytest.mark.parametrize("value", CRAFTED)
async def test_crafted_filter_values_are_422_naming_the_field(client: httpx.AsyncClient, value: Any) -> None:
    await make_attribute(client, f"score_{uuid.uuid4().hex[:8]}", "number")
    names = [d["name"] for d in (await client.get("/v1/attributes", headers=ADMIN)).json() if d["type"] == "number"]
    for field in ("stats.total_spent", "stats.average_basket", f"attributes.{names[-1]}"):
        for op, sent, where in (("gt", value, "filter.all[0].value"), ("in", [1, value], "filter.all[0].value[1]"),
                                ("between", [value, 5], "filter.all[0].value[0]")):
            filter_ = {"all": [{"field": field, "op": op, "value": sent}]}
            _names_the_value(await client.post("/v1/segments/preview", json={"filter": filter_}, headers=VIEWER),
                             where)
            _names_the_value(await client.post("/v1/segments", json={"name": f"n {uuid.uuid4()}", "filter": filter_},
                                               headers=MANAGER), where)
    assert all(s["name"].startswith("n ") is False for s in
               (await client.get("/v1/segments", headers=ADMIN)).json()["data"])


async def test_ordinary_numbers_still_work(client: httpx.AsyncClient) -> None:
    for value in (0, 49.9, "49.90", "1e3", 999999999999.99, "-12.5", "1.500", "0e-1000000"):  # the last is 0
        answer = await client.post("/v1/segments/preview", headers=VIEWER, json={
            "filter": {"field": "stats.total_spent", "op": "gte", "value": value}})
        assert answer.status_code == 200, (value, answer.text)
    too_fine = await client.post("/v1/segments/preview", headers=VIEWER, json={
        "filter": {"field": "stats.total_spent", "op": "gte", "value": "10.001"}})  # numeric(14, 2)
    _names_the_value(too_fine, "filter.value")


async def test_a_stored_filter_that_cannot_run_answers_422_not_500(
        client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]) -> None:
    """One saved before this defence (or written behind the API): its reads name the value, never a 500."""
    segment_id = uuid.uuid4()
    async with sessions() as session, session.begin():
        await session.execute(insert(Segment.__table__).values(  # type: ignore[attr-defined]
            id=segment_id, name=f"legacy {segment_id}", filter={"field": "stats.total_spent", "op": "gt",
                                                               "value": "1e-1000000"}, version=1))
    for url, params in ((f"/v1/segments/{segment_id}/count", {}), (f"/v1/segments/{segment_id}/contacts", {}),
                        ("/v1/contacts", {"segment": str(segment_id)})):
        answer = await client.get(url, params=params, headers=VIEWER)
        _names_the_value(answer, "filter.value")


@pytest.mark.parametrize("value", [1e308, -1e308, 10**30, 10**4000, 1e-300])
async def test_number_attributes_are_bounded(client: httpx.AsyncClient, value: Any) -> None:
    name = f"weight_{uuid.uuid4().hex[:8]}"
    await make_attribute(client, name, "number")
    answer = await client.post("/v1/contacts", headers=ADMIN, json={
        "email": f"{uuid.uuid4().hex[:10]}@shop.example", "attributes": {name: value}})
    _names_the_value(answer, f"attributes.{name}")
    assert (await client.post("/v1/contacts", headers=ADMIN, json={
        "email": f"{uuid.uuid4().hex[:10]}@shop.example", "attributes": {name: 72.5}})).status_code == 201


@pytest.mark.parametrize(("field", "value"), [
    ("total_amount", "1e1000000"), ("total_amount", "1e-1000000"), ("total_amount", 1e308), ("total_amount", "NaN"),
    ("total_amount", 10**4000), ("total_amount", "0.001"), ("total_amount", "1" * 5000),
    ("items", [{"sku": "a", "quantity": 10**30, "unit_price": "1"}]),
    ("items", [{"sku": "a", "quantity": 1, "unit_price": "1e-1000000"}]),
])
async def test_crafted_order_amounts_are_422(client: httpx.AsyncClient, field: str, value: Any) -> None:
    person = await make_contact(client)
    order = {"contact": {"id": person["id"]}, "placed_at": "2026-01-01T00:00:00Z", "status": "paid",
             "currency": "EUR", "total_amount": "10.00", field: value}
    answer = await client.put(f"/v1/orders/o-{uuid.uuid4().hex[:8]}", headers=ADMIN, json=order)
    assert answer.status_code == 422, answer.text[:300]
    assert answer.json()["errors"][0]["field"].startswith(field)


async def test_crafted_headers_never_500(client: httpx.AsyncClient) -> None:
    person = await make_contact(client)
    url = f"/v1/contacts/{person['id']}"
    for if_match in ('"v' + "9" * 5000 + '"', "9" * 5000, '"v' + "9" * 20 + '"', '"v²"'.encode("latin-1"),
                     '"v١"'.encode(), 'W/"v-1"', '"v' + "9" * 19 + '"', '"v0x1"'):
        answer = await client.patch(url, json={"company": "x"}, headers={**ADMIN, "If-Match": if_match})
        assert answer.status_code in (412, 422), (if_match[:30], answer.status_code, answer.text[:200])  # type: ignore[index]
    for segment_or_list in ("/v1/lists", "/v1/segments"):  # the other routes taking If-Match share the parser
        answer = await client.delete(f"{segment_or_list}/{uuid.uuid4()}",
                                     headers={**ADMIN, "If-Match": '"v' + "9" * 5000 + '"'})
        assert 400 <= answer.status_code < 500, answer.text[:200]
    assert (await client.patch(url, json={"company": "y"}, headers={**ADMIN, "If-Match": '"v1"'})).status_code == 200
    answer = await client.post("/v1/contacts", json={"email": "k@shop.example"},
                               headers={**ADMIN, "Idempotency-Key": "k" * 5000})
    assert answer.status_code == 422 and answer.json()["errors"][0]["field"] == "Idempotency-Key"
    for length in ("9" * 5000, "²".encode("latin-1"), "-1"):
        answer = await client.post("/v1/contacts", content=b'{"email": "l@shop.example"}',
                                   headers={**ADMIN, "Content-Type": "application/json", "Content-Length": length})
        assert 400 <= answer.status_code < 500, (length[:10], answer.text[:200])
    answer = await client.get(url, headers={**ADMIN, "X-Request-Id": "r" * 5000})
    assert answer.status_code == 200 and len(answer.headers["x-request-id"]) <= 64


async def test_crafted_query_numbers_are_422(client: httpx.AsyncClient) -> None:
    for params in ({"limit": "9" * 5000}, {"limit": "1e1000000"}, {"limit": "-1"}, {"limit": "²"}):
        answer = await client.get("/v1/contacts", params=params, headers=ADMIN)
        assert answer.status_code == 422 and answer.json()["errors"][0]["field"] == "limit", answer.text[:200]


async def test_every_number_declares_its_bounds(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    assert not [line for line in unbounded_inputs(document) if "integer" in line or "number" in line]
    order_line = document["components"]["schemas"]["OrderItem"]["properties"]
    money = order_line["unit_price"]["anyOf"]
    assert {"maximum": 999999999999.99, "minimum": 0} .items() <= money[0].items() and money[1]["maxLength"] == 40
