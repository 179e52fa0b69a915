"""Segments through HTTP: CRUD, count, members, preview, filter errors, the contacts `?segment=` filter."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.security import Role, Scope
from tests.auth import bearer
from tests.factories import ADMIN, grant_marketing, make_attribute, make_contact, make_list
from tests.routers.test_contacts import assert_problem

INTEGRATION = bearer(Role.INTEGRATION, subject="backoffice")
LYON = {"all": [{"field": "address.city", "op": "eq", "value": "Lyon"}]}


async def make_segment(client: httpx.AsyncClient, filter_: dict[str, Any], **fields: Any) -> dict[str, Any]:
    body = {"name": f"seg-{uuid.uuid4().hex[:8]}", "filter": filter_, **fields}
    response = await client.post("/v1/segments", json=body, headers=ADMIN)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


async def place_order(client: httpx.AsyncClient, contact_id: str, *, sku: str, category: str, days_ago: float,
                      status: str = "paid") -> None:
    body = {
        "contact": {"id": contact_id}, "placed_at": (datetime.now(UTC) - timedelta(days=days_ago)).isoformat(),
        "status": status, "currency": "EUR", "total_amount": "40.00", "channel": "web",
        "items": [{"sku": sku, "name": sku, "category": category, "quantity": 1, "unit_price": "40.00"}],
    }
    response = await client.put(f"/v1/orders/{uuid.uuid4().hex}", json=body, headers=INTEGRATION)
    assert response.status_code == 201, response.text


async def preview(client: httpx.AsyncClient, filter_: Any, headers: dict[str, str] = ADMIN) -> httpx.Response:
    return await client.post("/v1/segments/preview", json={"filter": filter_}, headers=headers)


async def matching_ids(client: httpx.AsyncClient, filter_: Any) -> set[str]:
    response = await preview(client, filter_)
    assert response.status_code == 200, response.text
    return {c["id"] for c in response.json()["data"]}


class TestCrud:
    async def test_create_get_list_patch_delete(self, client: httpx.AsyncClient) -> None:
        created = await make_segment(client, LYON, description="Lyon people")
        assert created["filter"] == LYON and created["description"] == "Lyon people"
        got = await client.get(f"/v1/segments/{created['id']}", headers=ADMIN)
        assert got.status_code == 200 and got.json() == created
        names = [s["name"] for s in (await client.get("/v1/segments", headers=ADMIN)).json()["data"]]
        assert created["name"] in names
        new_filter = {"any": [{"field": "kind", "op": "eq", "value": "customer"}]}
        patched = await client.patch(f"/v1/segments/{created['id']}", json={"filter": new_filter, "description": None},
                                     headers=ADMIN)
        assert patched.status_code == 200, patched.text
        assert patched.json()["filter"] == new_filter and patched.json()["description"] is None
        assert patched.json()["name"] == created["name"]
        assert (await client.delete(f"/v1/segments/{created['id']}", headers=ADMIN)).status_code == 204
        assert_problem(await client.get(f"/v1/segments/{created['id']}", headers=ADMIN), 404)
        assert_problem(await client.delete(f"/v1/segments/{created['id']}", headers=ADMIN), 404)

    async def test_list_pages_by_name(self, client: httpx.AsyncClient) -> None:
        for _ in range(3):
            await make_segment(client, LYON)
        first = (await client.get("/v1/segments", params={"limit": 2}, headers=ADMIN)).json()
        assert len(first["data"]) == 2 and first["next_cursor"]
        rest = (await client.get("/v1/segments", params={"limit": 2, "cursor": first["next_cursor"]},
                                 headers=ADMIN)).json()
        names = [s["name"] for s in first["data"] + rest["data"]]
        assert names == sorted(names) and len(set(names)) == len(names) >= 3

    async def test_duplicate_name_is_409(self, client: httpx.AsyncClient) -> None:
        first = await make_segment(client, LYON)
        again = await client.post("/v1/segments", json={"name": first["name"], "filter": LYON}, headers=ADMIN)
        assert assert_problem(again, 409)["existing_id"] == first["id"]
        other = await make_segment(client, LYON)
        clash = await client.patch(f"/v1/segments/{other['id']}", json={"name": first["name"]}, headers=ADMIN)
        assert_problem(clash, 409)

    async def test_unknown_body_fields_and_null_filter_are_422(self, client: httpx.AsyncClient) -> None:
        body = {"name": "x", "filter": LYON, "colour": "red"}
        assert_problem(await client.post("/v1/segments", json=body, headers=ADMIN), 422, "colour")
        created = await make_segment(client, LYON)
        nulled = await client.patch(f"/v1/segments/{created['id']}", json={"filter": None, "name": None}, headers=ADMIN)
        assert_problem(nulled, 422, "filter", "name")

    async def test_idempotency_key_replays(self, client: httpx.AsyncClient) -> None:
        body = {"name": f"seg-{uuid.uuid4().hex[:8]}", "filter": LYON}
        headers = {**ADMIN, "Idempotency-Key": "seg-1"}
        first = await client.post("/v1/segments", json=body, headers=headers)
        again = await client.post("/v1/segments", json=body, headers=headers)
        assert (first.status_code, again.status_code) == (201, 201) and again.json() == first.json()

    async def test_etag_and_if_match(self, client: httpx.AsyncClient) -> None:
        created = await client.post("/v1/segments", json={"name": f"seg-{uuid.uuid4().hex[:8]}", "filter": LYON},
                                    headers=ADMIN)
        url = f"/v1/segments/{created.json()['id']}"
        assert created.headers["ETag"] == '"v1"'
        got = await client.get(url, headers=ADMIN)
        assert got.headers["ETag"] == '"v1"' and got.json()["version"] == 1
        patched = await client.patch(url, json={"description": "Lyonnais"}, headers={**ADMIN, "If-Match": '"v1"'})
        assert patched.status_code == 200 and patched.headers["ETag"] == '"v2"'
        stale = await client.patch(url, json={"description": "x"}, headers={**ADMIN, "If-Match": '"v1"'})
        assert_problem(stale, 412)
        assert (await client.delete(url, headers={**ADMIN, "If-Match": '"v1"'})).status_code == 412
        assert (await client.delete(url, headers={**ADMIN, "If-Match": '"v2"'})).status_code == 204


class TestMembers:
    async def test_count_contacts_and_contacts_filter(self, client: httpx.AsyncClient) -> None:
        city = f"City{uuid.uuid4().hex[:6]}"
        inside = [await make_contact(client, address={"city": city}, kind="customer") for _ in range(3)]
        await make_contact(client, address={"city": city}, kind="prospect")
        await make_contact(client, address={"city": "Elsewhere"}, kind="customer")
        segment = await make_segment(client, {"all": [{"field": "address.city", "op": "eq", "value": city.lower()},
                                                      {"field": "kind", "op": "eq", "value": "customer"}]})
        count = await client.get(f"/v1/segments/{segment['id']}/count", headers=ADMIN)
        assert count.status_code == 200 and count.json() == {"count": 3}
        expected = sorted(c["id"] for c in inside)
        page1 = (await client.get(f"/v1/segments/{segment['id']}/contacts", params={"limit": 2},
                                  headers=ADMIN)).json()
        page2 = (await client.get(f"/v1/segments/{segment['id']}/contacts",
                                  params={"limit": 2, "cursor": page1["next_cursor"]}, headers=ADMIN)).json()
        assert [c["id"] for c in page1["data"] + page2["data"]] == expected and page2["next_cursor"] is None
        listed = (await client.get("/v1/contacts", params={"segment": segment["id"]}, headers=ADMIN)).json()
        assert sorted(c["id"] for c in listed["data"]) == expected
        narrowed = (await client.get("/v1/contacts", params={"segment": segment["id"], "kind": "prospect"},
                                     headers=ADMIN)).json()
        assert narrowed["data"] == []

    async def test_the_served_document_declares_the_count_answer_as_sent(
        self, client: httpx.AsyncClient, app: FastAPI
    ) -> None:
        """`GET /v1/segments/{id}/count` answers `{"count": n}`; the served OpenAPI document (and the clients generated
        from it) must say so, not the filter grammar's `count` condition `{op, value}`."""
        segment = await make_segment(client, {"field": "kind", "op": "eq", "value": "customer"})
        answer = (await client.get(f"/v1/segments/{segment['id']}/count", headers=ADMIN)).json()
        document = app.openapi()
        declared = document["paths"]["/v1/segments/{segment_id}/count"]["get"]["responses"]["200"]["content"]
        schema = declared["application/json"]["schema"]
        if "$ref" in schema:
            schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
        assert set(schema["properties"]) == set(answer) == {"count"}
        assert set(schema.get("required", [])) <= set(answer)
        condition_count = document["components"]["schemas"]["SegmentCount"]  # the grammar's, as docs/api.md names it
        assert set(condition_count["required"]) == {"op", "value"}

    async def test_contacts_filter_with_unknown_segment_is_404(self, client: httpx.AsyncClient) -> None:
        missing = await client.get("/v1/contacts", params={"segment": str(uuid.uuid4())}, headers=ADMIN)
        assert_problem(missing, 404)
        assert_problem(await client.get(f"/v1/segments/{uuid.uuid4()}/count", headers=ADMIN), 404)
        assert_problem(await client.get(f"/v1/segments/{uuid.uuid4()}/contacts", headers=ADMIN), 404)

    async def test_members_are_masked_without_pii_read(self, client: httpx.AsyncClient) -> None:
        city = f"City{uuid.uuid4().hex[:6]}"
        contact = await make_contact(client, address={"city": city})
        segment = await make_segment(client, {"all": [{"field": "address.city", "op": "eq", "value": city}]})
        viewer = bearer(Role.VIEWER, subject="viewer")
        page = (await client.get(f"/v1/segments/{segment['id']}/contacts", headers=viewer)).json()
        assert [c["id"] for c in page["data"]] == [contact["id"]]
        assert page["data"][0]["email"] != contact["email"] and "*" in page["data"][0]["email"]

    async def test_preview_counts_and_returns_at_most_20(self, client: httpx.AsyncClient) -> None:
        tag = f"t{uuid.uuid4().hex[:6]}"
        for _ in range(22):
            await make_contact(client, tags=[tag])
        response = await preview(client, {"all": [{"field": "tags", "op": "contains", "value": tag}]})
        assert response.status_code == 200, response.text
        assert response.json()["count"] == 22 and len(response.json()["data"]) == 20


class TestGrammar:
    async def test_orders_events_lists_consents_attributes(self, client: httpx.AsyncClient) -> None:
        await make_attribute(client, "shoe_size", "number")
        await make_attribute(client, "hobbies", "multi_enum", options=["golf", "ski", "chess"])
        a = await make_contact(client, attributes={"shoe_size": 42, "hobbies": ["golf", "ski"]})
        b = await make_contact(client, attributes={"shoe_size": 38})
        c = await make_contact(client)
        for days in (5, 40):
            await place_order(client, a["id"], sku="SHOE-1", category="shoes", days_ago=days)
        await place_order(client, b["id"], sku="SHOE-2", category="shoes", days_ago=200)
        await place_order(client, c["id"], sku="SHOE-1", category="shoes", days_ago=1, status="cancelled")
        event = {"contact": {"id": b["id"]}, "type": "cart_abandoned",
                 "occurred_at": (datetime.now(UTC) - timedelta(days=2)).isoformat()}
        assert (await client.post("/v1/events", json=event, headers=INTEGRATION)).status_code in (200, 201)
        await grant_marketing(client, c["id"])
        newsletter = await make_list(client)
        put = await client.put(f"/v1/lists/{newsletter['id']}/members/{c['id']}", headers=ADMIN)
        assert put.status_code == 201, put.text
        ours = {"any": [{"field": "stats.orders_count", "op": "gte", "value": 0}]}
        everyone = await matching_ids(client, ours)
        assert {a["id"], b["id"], c["id"]} <= everyone

        def cond(**kw: Any) -> dict[str, Any]:
            return {"all": [kw]}

        cases: list[tuple[dict[str, Any], set[str]]] = [
            (cond(field="orders.sku", op="eq", value="SHOE-1"), {a["id"]}),              # cancelled never counts
            (cond(field="orders.category", op="eq", value="shoes", within_days=100), {a["id"]}),
            (cond(field="orders.category", op="eq", value="shoes", count={"op": "gte", "value": 2}), {a["id"]}),
            (cond(field="orders.sku", op="in", value=["SHOE-2", "NOPE"]), {b["id"]}),
            (cond(field="orders.count", op="eq", value=1, within_days=30), {a["id"]}),
            (cond(field="events.type", op="eq", value="cart_abandoned", within_days=7), {b["id"]}),
            (cond(field="consents.email_marketing", op="eq", value=True), {c["id"]}),
            (cond(field="lists", op="eq", value=newsletter["id"]), {c["id"]}),
            (cond(field="attributes.shoe_size", op="gt", value=40), {a["id"]}),
            (cond(field="attributes.shoe_size", op="between", value=[30, 40]), {b["id"]}),
            (cond(field="attributes.hobbies", op="contains", value="ski"), {a["id"]}),
            (cond(field="attributes.shoe_size", op="exists", value=True), {a["id"], b["id"]}),
            (cond(field="stats.last_order_at", op="within_days", value=10), {a["id"]}),
            (cond(field="stats.total_spent", op="gte", value="80"), {a["id"]}),
        ]
        mine = {a["id"], b["id"], c["id"]}
        for filter_, expected in cases:
            assert await matching_ids(client, filter_) & mine == expected, filter_
            negated = await matching_ids(client, {"all": [ours, {"not": filter_}]})
            assert negated & mine == mine - expected, filter_


class TestFilterErrors:
    @pytest.mark.parametrize(("filter_", "field"), [
        ({"all": [{"field": "kind", "op": "eq", "value": "customer"}, {"field": "kind", "op": "eq", "value": "vendor"},
                  {"field": "kind", "op": "gt", "value": "x"}]}, "filter.all[2].op"),
        ({"any": [{"field": "kind", "op": "eq", "value": "astronaut"}]}, "filter.any[0].value"),
        ({"not": {"field": "shoe colour", "op": "eq", "value": 1}}, "filter.not.field"),
        ({"all": [{"field": "stats.orders_count", "op": "gte"}]}, "filter.all[0].value"),
        ({"all": [{"field": "stats.orders_count", "op": "gte", "value": "3"}]}, "filter.all[0].value"),
        ({"all": [{"field": "created_at", "op": "lt", "value": "yesterday"}]}, "filter.all[0].value"),
        # Python's fromisoformat reads ISO week dates and the basic format too: not the documented forms
        ({"all": [{"field": "created_at", "op": "lt", "value": "2026-W01-1"}]}, "filter.all[0].value"),
        ({"all": [{"field": "created_at", "op": "lt", "value": "20260101T000000+0000"}]}, "filter.all[0].value"),
        ({"all": [{"field": "created_at", "op": "lt", "value": "2026-01-01 10:00+01:00"}]}, "filter.all[0].value"),
        ({"all": [{"field": "tags", "op": "in", "value": []}]}, "filter.all[0].value"),
        ({"all": [{"field": "lists", "op": "eq", "value": "not-a-uuid"}]}, "filter.all[0].value"),
        ({"all": [{"field": "orders.sku", "op": "eq", "value": "X", "count": {"op": "like", "value": 2}}]},
         "filter.all[0].count.op"),
        ({"all": [{"field": "kind", "op": "eq", "value": "customer", "within_days": 3}]}, "filter.all[0].within_days"),
        ({"all": [{"field": "kind", "op": "eq", "value": "customer", "extra": 1}]}, "filter.all[0].extra"),
        ({"all": []}, "filter.all"),
        ({"all": [], "any": []}, "filter"),
        ({"all": [{"field": "attributes.nope", "op": "eq", "value": 1}]}, "filter.all[0].field"),
        ([1, 2], "filter"),
    ])
    async def test_points_at_the_faulty_part(self, client: httpx.AsyncClient, filter_: Any, field: str) -> None:
        assert_problem(await preview(client, filter_), 422, field)
        create = await client.post("/v1/segments", json={"name": "bad", "filter": filter_}, headers=ADMIN)
        assert create.status_code == 422
        assert (await client.get("/v1/segments", headers=ADMIN)).json()["data"] == []

    @pytest.mark.parametrize("name", [
        "attributes.x'; DROP TABLE contact; --", "attributes.a->>'b'", "attributes.$.foo", "attributes.a.b",
        "address.city'--", "kind; SELECT 1", "stats.total_spent)", 'attributes."x"', "attributes.",
    ])
    async def test_injection_in_field_names_is_422(self, client: httpx.AsyncClient, name: str) -> None:
        assert_problem(await preview(client, {"all": [{"field": name, "op": "eq", "value": 1}]}), 422,
                       "filter.all[0].field")

    async def test_injection_in_ops_and_values_is_harmless(self, client: httpx.AsyncClient) -> None:
        bad_op = {"all": [{"field": "company", "op": "eq; DROP TABLE contact", "value": "x"}]}
        assert_problem(await preview(client, bad_op), 422, "filter.all[0].op")
        sneaky = await make_contact(client, company="O'Reilly % _ \\")
        for value in ["x' OR '1'='1", "O'Reilly % _ \\"]:
            found = await matching_ids(client, {"all": [{"field": "company", "op": "eq", "value": value}]})
            assert found == ({sneaky["id"]} if value.startswith("O'") else set())
        assert await matching_ids(client, {"all": [{"field": "company", "op": "contains", "value": "% _"}]}) == {
            sneaky["id"]}

    async def test_depth_and_size_limits(self, client: httpx.AsyncClient) -> None:
        deep: dict[str, Any] = {"field": "kind", "op": "eq", "value": "customer"}
        for _ in range(9):
            deep = {"not": deep}
        body = assert_problem(await preview(client, deep), 422)
        assert body["errors"][0]["code"] == "too_deep"
        many = {"any": [{"field": "kind", "op": "eq", "value": "customer"}] * 101}
        assert assert_problem(await preview(client, many), 422)["errors"][0]["code"] == "too_many_conditions"


class TestListsNamed:
    """A filter naming a list id that no list has matched nobody (neq, nin: everybody), silently: a typo, or a list
    deleted since, changed the segment's meaning without a word."""

    async def test_an_unknown_list_is_422_naming_the_value(self, client: httpx.AsyncClient) -> None:
        known, unknown = (await make_list(client))["id"], str(uuid.uuid4())
        for filter_, field in (({"all": [{"field": "lists", "op": "eq", "value": unknown}]}, "filter.all[0].value"),
                               ({"field": "lists", "op": "nin", "value": [known, unknown]}, "filter.value[1]")):
            assert assert_problem(await preview(client, filter_), 422, field)["errors"][0]["code"] == "unknown_list"
            create = await client.post("/v1/segments", json={"name": "typo", "filter": filter_}, headers=ADMIN)
            assert_problem(create, 422, field)
            segment = await make_segment(client, LYON)
            patched = await client.patch(f"/v1/segments/{segment['id']}", json={"filter": filter_}, headers=ADMIN)
            assert_problem(patched, 422, field)

    async def test_a_list_a_segment_names_cannot_be_deleted(self, client: httpx.AsyncClient) -> None:
        named, other = (await make_list(client))["id"], (await make_list(client))["id"]
        segment = await make_segment(client, {"not": {"field": "lists", "op": "in", "value": [other, named.upper()]}})
        problem = assert_problem(await client.delete(f"/v1/lists/{named}", headers=ADMIN), 409)
        assert (problem["type"].rsplit("/", 1)[1], problem["segment_ids"]) == ("list-in-use", [segment["id"]])
        assert (await client.get(f"/v1/lists/{named}", headers=ADMIN)).status_code == 200
        await make_segment(client, {"field": "tags", "op": "eq", "value": named})  # a tag spelt like it: no matter
        patched = await client.patch(f"/v1/segments/{segment['id']}", headers=ADMIN, json={
            "filter": {"field": "lists", "op": "eq", "value": other}})
        assert patched.status_code == 200, patched.text
        assert (await client.delete(f"/v1/lists/{named}", headers=ADMIN)).status_code == 204


class TestHostileFilters:
    """Audit: deep filters overflowed the recursion of the attribute look-up (500) before the depth check ran,
    and a value PostgreSQL cannot encode reached the database (500)."""

    @staticmethod
    async def post_raw(client: httpx.AsyncClient, url: str, body: str) -> httpx.Response:
        return await client.post(url, content=body, headers={**ADMIN, "Content-Type": "application/json"})

    @pytest.mark.parametrize(("opening", "closing", "depth"), [('{"all":[', "]}", 200), ('{"not":', "}", 900),
                                                               ('{"any":[', "]}", 9)])
    async def test_deep_groups_are_422_naming_the_path(self, client: httpx.AsyncClient, opening: str, closing: str,
                                                       depth: int) -> None:
        filter_ = opening * depth + '{"field":"attributes.x","op":"eq","value":1}' + closing * depth
        for url, body in (("/v1/segments/preview", f'{{"filter":{filter_}}}'),
                          ("/v1/segments", f'{{"name":"deep","filter":{filter_}}}')):
            problem = assert_problem(await self.post_raw(client, url, body), 422)
            assert [(e["code"], e["field"].startswith("filter.")) for e in problem["errors"]] == [("too_deep", True)]
        assert (await client.get("/v1/segments", headers=ADMIN)).json()["data"] == []

    async def test_deep_or_unencodable_values_are_422(self, client: httpx.AsyncClient) -> None:
        surrogate = '{"all":[{"field":"company","op":"eq","value":"\\ud800"}]}'
        for url, body in (("/v1/segments/preview", f'{{"filter":{surrogate}}}'),
                          ("/v1/segments", f'{{"name":"bad","filter":{surrogate}}}')):
            assert_problem(await self.post_raw(client, url, body), 422, "filter.all[0].value")
        in_list = '{"all":[{"field":"company","op":"in","value":["a","\\udfff"]}]}'
        assert_problem(await self.post_raw(client, "/v1/segments/preview", f'{{"filter":{in_list}}}'), 422)
        deep_value = '{"all":[{"field":"company","op":"eq","value":' + "[" * 500 + "]" * 500 + "}]}"
        assert_problem(await self.post_raw(client, "/v1/segments/preview", f'{{"filter":{deep_value}}}'), 422)
        assert (await client.get("/v1/segments", headers=ADMIN)).json()["data"] == []


class TestAuth:
    async def test_401_without_token(self, client: httpx.AsyncClient) -> None:
        assert (await client.get("/v1/segments")).status_code == 401
        assert (await client.post("/v1/segments/preview", json={"filter": LYON})).status_code == 401

    async def test_403_names_the_missing_scope(self, client: httpx.AsyncClient) -> None:
        reader = bearer(Role.ADMIN, scopes={Scope.SEGMENTS_READ})
        denied = await client.post("/v1/segments", json={"name": "x", "filter": LYON}, headers=reader)
        assert assert_problem(denied, 403)["missing_scopes"] == ["segments:write"]
        members = await preview(client, LYON, headers=reader)
        assert assert_problem(members, 403)["missing_scopes"] == ["contacts:read"]
        assert (await client.get("/v1/segments", headers=reader)).status_code == 200
        integration = bearer(Role.INTEGRATION, subject="backoffice")
        assert assert_problem(await client.get("/v1/segments", headers=integration), 403)["missing_scopes"] == [
            "segments:read"]
        editor = bearer(Role.EDITOR, subject="editor")
        assert_problem(await client.post("/v1/segments", json={"name": "x", "filter": LYON}, headers=editor), 403)

    async def test_the_contacts_filter_needs_the_scope_the_segment_and_list_routes_need(
        self, client: httpx.AsyncClient
    ) -> None:
        """`GET /v1/contacts?segment=` answers a segment's members, as `/v1/segments/{id}/contacts` does, and `?list=`
        a list's subscribed members, as `/v1/lists/{id}/members` does: the integration role (contacts:read, no
        segments:read) read, unmasked, the members of any segment it was refused. Each filter now needs the scope
        of the route it stands for."""
        city = f"City{uuid.uuid4().hex[:6]}"
        member = await make_contact(client, address={"city": city})
        segment = await make_segment(client, {"all": [{"field": "address.city", "op": "eq", "value": city}]})
        assert_problem(await client.get(f"/v1/segments/{segment['id']}/contacts", headers=INTEGRATION), 403)
        through_filter = await client.get("/v1/contacts", params={"segment": segment["id"]}, headers=INTEGRATION)
        assert assert_problem(through_filter, 403)["missing_scopes"] == ["segments:read"], through_filter.text
        viewer = bearer(Role.VIEWER, subject="viewer")  # contacts:read and segments:read: the filter works
        listed = await client.get("/v1/contacts", params={"segment": segment["id"]}, headers=viewer)
        assert [c["id"] for c in listed.json()["data"]] == [member["id"]]
        the_list = await make_list(client)
        no_lists = bearer(Role.ADMIN, scopes={Scope.CONTACTS_READ, Scope.PII_READ})
        assert_problem(await client.get(f"/v1/lists/{the_list['id']}/members", headers=no_lists), 403)
        by_list = await client.get("/v1/contacts", params={"list": the_list["id"]}, headers=no_lists)
        assert assert_problem(by_list, 403)["missing_scopes"] == ["lists:read"]
        assert (await client.get("/v1/contacts", params={"list": the_list["id"]}, headers=INTEGRATION)).status_code \
            == 200  # integration holds lists:read
