"""Class 2: unbounded input and error answers (issue 15, finding 2).

The attack: a viewer posts `{"filter": {"all": [{}, {}, ...]}}` with 200,000 children (600 KB) to
`/v1/segments/preview` and gets a 23 MB 422 (at 1.6M children: 20 s of CPU, 1.3 GB); the same with `scopes` of
200,000 items on `POST /v1/tokens`, and with `/v1/lists/{id}/members/batch`. The defence (docs/security.md,
"Class 2"): every input is bounded where it enters and the bound declared in OpenAPI; the filter tree is
measured by a walk that stops at the first container past a bound, before anything else reads it; and an error
answer lists at most 50 faulty fields, clipped, saying how many more there were. Small answers here; the time
is measured side by side by bench/bench_bounds.py (never in a test).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest

from app.security import Role
from tests.auth import bearer
from tests.factories import ADMIN, make_list
from tests.security.openapi_bounds import unbounded_inputs

VIEWER = bearer(Role.VIEWER, subject="intern@shop.example")
MANAGER = bearer(Role.MANAGER, subject="agency@shop.example")
SMALL = 4096  # a refusal of a bound names one field: a few hundred bytes
# The contract (docs/security.md, "Class 2"), as numbers: the test must run against code that predates the names.
MAX_FIELD_ERRORS, MAX_PROBLEM_BYTES, MAX_CONDITIONS, MAX_DEPTH = 50, 64 * 1024, 100, 8

# Inputs left open on purpose: each batch item is any JSON value so that a bad one fails alone, in its own result;
# it is then validated against ContactUpsert / EventCreate, every field of which is bounded (checked below).
OPEN_ON_PURPOSE = [
    "any JSON value: POST /v1/contacts/batch (application/json)→ContactBatch.items[]",
    "any JSON value: POST /v1/events/batch (application/json)→EventBatch.items[]",
]


def _raw(body: str, headers: dict[str, str]) -> dict[str, Any]:
    return {"content": body.encode(), "headers": {**headers, "Content-Type": "application/json"}}


def _small_422(response: httpx.Response, field: str, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == 422, response.text[:500]
    assert len(response.content) < SMALL, len(response.content)
    body = response.json()
    assert body["errors"][0]["field"] == field, body
    if code is not None:
        assert body["errors"][0]["code"] == code, body
    return body


@pytest.mark.parametrize("children", [200_000, 340_000])  # the tests' body limit is 1 MB (the default: 5 MB)
async def test_a_viewer_cannot_make_the_preview_answer_grow(client: httpx.AsyncClient, children: int) -> None:
    body = '{"filter":{"all":[' + ",".join(["{}"] * children) + "]}}"
    answer = await client.post("/v1/segments/preview", **_raw(body, VIEWER))
    problem = _small_422(answer, "filter.all", "too_many_conditions")
    assert len(problem["errors"]) == 1


async def test_saving_or_patching_a_huge_filter_is_refused_the_same_way(client: httpx.AsyncClient) -> None:
    huge = ",".join(['{"field":"kind","op":"eq","value":"customer"}'] * 20_000)
    saved = await client.post("/v1/segments", **_raw('{"name":"huge","filter":{"any":[' + huge + "]}}", MANAGER))
    _small_422(saved, "filter.any", "too_many_conditions")
    made = await client.post("/v1/segments", headers=MANAGER, json={
        "name": f"fine {uuid.uuid4().hex[:6]}", "filter": {"field": "kind", "op": "eq", "value": "customer"}})
    assert made.status_code == 201, made.text
    patched = await client.patch(f"/v1/segments/{made.json()['id']}",
                                 **_raw('{"filter":{"all":[' + huge + "]}}", MANAGER))
    _small_422(patched, "filter.all", "too_many_conditions")
    # within the counts of conditions and members, but with values past every `in` list's bound: the count of
    # JSON values stops the walk, before the compiler looks at any of them
    wide = json.dumps({"all": [{"field": "company", "op": "in", "value": ["x"] * 250}] * 60})
    _small_422(await client.post("/v1/segments/preview", **_raw('{"filter":' + wide + "}", VIEWER)),
               "filter", "too_large")
    in_values = json.dumps(list(range(100_000)))
    hidden = '{"filter":{"field":"kind","op":"in","value":' + in_values + "}}"
    _small_422(await client.post("/v1/segments/preview", **_raw(hidden, VIEWER)), "filter", "too_large")


async def test_deep_filters_are_refused_before_any_walk(client: httpx.AsyncClient) -> None:
    condition = '{"field":"kind","op":"eq","value":"customer"}'
    for opening, closing, depth in (('{"not":', "}", 50_000), ('{"all":[', "]}", 5_000)):
        body = '{"filter":' + opening * depth + condition + closing * depth + "}"
        answer = await client.post("/v1/segments/preview", **_raw(body, VIEWER))
        if answer.status_code == 400 or answer.json()["errors"][0]["code"] == "json_invalid":
            continue  # deeper than the JSON parser goes: refused as malformed, also small
        problem = _small_422(answer, answer.json()["errors"][0]["field"], "too_deep")
        assert problem["errors"][0]["field"].count(".") == MAX_DEPTH + 1


async def test_scopes_and_member_batches_of_many_items_are_refused_small(client: httpx.AsyncClient) -> None:
    scopes = json.dumps(["contacts:read"] * 60_000)
    answer = await client.post("/v1/tokens", **_raw(
        '{"subject":"x@shop.example","role":"viewer","scopes":' + scopes + "}", ADMIN))
    _small_422(answer, "scopes", "too_long")
    the_list = await make_list(client)
    for key in ("add", "remove"):
        ids = json.dumps([str(uuid.uuid4()) for _ in range(25_000)])
        answer = await client.post(f"/v1/lists/{the_list['id']}/members/batch", **_raw(
            "{" + f'"{key}":' + ids + "}", MANAGER))
        _small_422(answer, key, "too_long")
    not_ids = json.dumps(["not a uuid"] * 70_000)
    _small_422(await client.post(f"/v1/lists/{the_list['id']}/members/batch", **_raw('{"add":' + not_ids + "}",
                                                                                     MANAGER)), "add", "too_long")


async def test_attributes_and_event_properties_cannot_hold_100_000_keys(client: httpx.AsyncClient) -> None:
    keys = {f"k{i}": i for i in range(50_000)}
    answer = await client.post("/v1/contacts", headers=ADMIN, json={"email": "a@shop.example", "attributes": keys})
    _small_422(answer, "attributes", "too_long")
    answer = await client.post("/v1/events", headers=ADMIN, json={
        "contact": {"email": "a@shop.example"}, "type": "page_view", "occurred_at": "2026-01-01T00:00:00Z",
        "properties": {"items": list(range(150_000))}})
    _small_422(answer, "properties")


async def test_an_answer_lists_50_faulty_fields_and_counts_the_others(client: httpx.AsyncClient) -> None:
    """1,000 order lines (the maximum), each with three faulty fields: 3,000 errors found, 50 listed."""
    line = {"sku": "", "quantity": 0, "unit_price": "-1"}
    answer = await client.put("/v1/orders/o-many-errors", headers=ADMIN, json={
        "contact": {"email": "a@shop.example"}, "placed_at": "2026-01-01T00:00:00Z", "status": "paid",
        "currency": "EUR", "total_amount": "1", "items": [line] * 1000})
    assert answer.status_code == 422
    assert len(answer.content) < MAX_PROBLEM_BYTES
    problem = answer.json()
    assert len(problem["errors"]) == MAX_FIELD_ERRORS
    assert problem["more_errors"] == 3000 - MAX_FIELD_ERRORS
    assert problem["detail"].endswith("and 2,950 more errors not listed"), problem["detail"]
    # a batch answers for each item: each failed item lists at most 5
    bad_contact = {"email": "x", "phone": "x", "first_name": 1, "last_name": 1, "company": 1, "kind": "x",
                   "birth_date": "x", "source": "x"}
    batch = await client.post("/v1/contacts/batch", headers=ADMIN, json={"items": [bad_contact] * 1000})
    assert batch.status_code == 200
    for result in batch.json()["results"]:
        assert len(result["error"]["errors"]) == 5 and result["error"]["more_errors"] == 3


async def test_long_keys_and_messages_are_clipped(client: httpx.AsyncClient) -> None:
    key = "k" * 5_000 + "x"  # not a plain name: the compiler's path shows it as `?`; pydantic's keeps it
    answer = await client.post("/v1/segments/preview", headers=VIEWER, json={"filter": {"all": [
        {"field": "kind", "op": "eq", "value": "customer", key: 1}] * MAX_CONDITIONS}})
    assert answer.status_code == 422 and len(answer.content) < 16 * 1024
    problem = answer.json()
    assert len(problem["errors"]) == MAX_FIELD_ERRORS and problem["more_errors"] == MAX_CONDITIONS - MAX_FIELD_ERRORS
    assert all(len(e["field"]) <= 200 for e in problem["errors"])
    answer = await client.post("/v1/contacts", headers=ADMIN, json={"email": "a@shop.example", key * 10: 1})
    assert answer.status_code in (413, 422) and len(answer.content) < SMALL


async def test_every_input_declares_its_bound(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    assert unbounded_inputs(document) == OPEN_ON_PURPOSE
    filter_ = document["components"]["schemas"]["SegmentPreviewRequest"]["properties"]["filter"]
    assert f"nest at most {MAX_DEPTH} deep" in filter_["description"] and filter_["maxProperties"] == 5
    problem = document["components"]["schemas"]["Problem"]["properties"]
    assert problem["errors"]["anyOf"][0]["maxItems"] == MAX_FIELD_ERRORS and "more_errors" in problem
