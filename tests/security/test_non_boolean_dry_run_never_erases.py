"""Class 6: a request that violates its schema is refused, never converted into one that destroys data.

The attack (issue 15, finding 6): `POST /v1/retention/run {"dry_run": 0}` was read as `dry_run: false` and erased
every stale prospect. pydantic's default (lax) mode turns `0`, `"0"`, `"false"`, `"no"`, `"off"` into `false` and
`"1"` into `1`; the OpenAPI document says `boolean`. Every flag guarding a destructive effect is tried with values of
the wrong JSON type, then the class: every request schema of the app is strict (a walk of every schema, and a
wrong-typed value on a sample of fields of each JSON type).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

import app.schemas
from app.schemas.base import InputSchema
from tests.factories import ADMIN, make_contact
from tests.routers.test_contacts import assert_problem
from tests.routers.test_imports import upload
from tests.routers.test_lists import ledger
from tests.routers.test_preferences import change, person_on_two_lists

# What lax validation reads as false (or true); each is a JSON value of another type than boolean.
NOT_BOOLEANS: list[Any] = [0, 0.0, "0", "false", "False", "no", "off", "f", "n", "", 1, "1", "true", "yes", [], {}]


async def _stale_prospect(client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]) -> dict[str, Any]:
    """A prospect untouched for 1200 days: the next real retention run erases them."""
    contact = await make_contact(client, kind="prospect")
    async with sessions() as session, session.begin():
        await session.execute(text("UPDATE contact SET created_at = :at, updated_at = :at WHERE id = :id"),
                              {"at": datetime.now(UTC) - timedelta(days=1200), "id": contact["id"]})
    return contact


async def test_a_non_boolean_dry_run_never_runs_a_real_retention(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession],
) -> None:
    stale = await _stale_prospect(client, sessions)
    for value in NOT_BOOLEANS:
        refused = await client.post("/v1/retention/run", json={"dry_run": value}, headers=ADMIN)
        assert refused.status_code == 422, (value, refused.status_code, refused.text)
        assert [e["field"] for e in refused.json()["errors"]] == ["dry_run"], value
        assert (await client.get(f"/v1/contacts/{stale['id']}", headers=ADMIN)).status_code == 200, value
    # The same person, with the boolean the schema declares: the run was real all along.
    erased = await client.post("/v1/retention/run", json={"dry_run": False}, headers=ADMIN)
    assert erased.status_code == 200 and stale["id"] in erased.json()["contact_ids"]
    assert_problem(await client.get(f"/v1/contacts/{stale['id']}", headers=ADMIN), 404)


async def test_an_import_form_says_true_or_false(client: httpx.AsyncClient,
                                                 sessions: async_sessionmaker[AsyncSession]) -> None:
    """Multipart fields are text, so `true`/`false` are the booleans; `0`, `no`, `off` are refused, not false."""
    csv = b"email,first_name\nlea@example.com,\n"
    for flag in ("dry_run", "blank_erases"):
        for value in ("0", "no", "off", "1", "yes", "on", "f", ""):
            refused = await upload(client, csv, **{flag: value})
            assert refused.status_code == 422, (flag, value, refused.text)
            assert [e["field"] for e in refused.json()["errors"]] == [flag]
    async with sessions() as session:
        assert await session.scalar(text("SELECT count(*) FROM import_job")) == 0
    assert (await upload(client, csv, dry_run="TRUE", blank_erases="false")).status_code == 202


async def test_a_public_link_withdraws_consent_only_on_true(client: httpx.AsyncClient) -> None:
    """`unsubscribe_all: true` (`Literal[True]`) took `1` as true, even in strict mode (1 == True in Python)."""
    contact, *_lists = await person_on_two_lists(client)
    before = await ledger(client, contact["id"])
    for value in (1, 1.0, "true", "1"):
        refused = await change(client, contact["id"], {"unsubscribe_all": value})
        assert refused.status_code == 422, (value, refused.text)
        assert [e["field"] for e in refused.json()["errors"]] == ["unsubscribe_all"]
    assert (await ledger(client, contact["id"]))["events"] == before["events"]


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/v1/tokens", {"subject": "a@shop.example", "role": "viewer", "ttl_seconds": "3600"}, "ttl_seconds"),
    ("/v1/tokens", {"subject": "a@shop.example", "role": "viewer", "ttl_seconds": 3600.5}, "ttl_seconds"),
    ("/v1/tokens", {"subject": "a@shop.example", "role": "viewer", "ttl_seconds": True}, "ttl_seconds"),
    ("/v1/tokens", {"subject": 12345, "role": "viewer"}, "subject"),
    ("/v1/lists", {"name": "strict-list", "double_opt_in": "false"}, "double_opt_in"),
    ("/v1/contacts", {"email": "strict@example.com", "birth_date": 0}, "birth_date"),
    ("/v1/contacts", {"email": "strict@example.com", "first_contact_at": 1700000000}, "first_contact_at"),
    ("/v1/contacts", {"email": "strict@example.com", "tags": "vip"}, "tags"),
    ("/v1/contacts", {"email": "strict@example.com", "kind": 1}, "kind"),
], ids=lambda v: v if isinstance(v, str) else "")
async def test_no_value_is_converted_to_the_declared_type(client: httpx.AsyncClient, path: str,
                                                          body: dict[str, Any], field: str) -> None:
    refused = await client.post(path, json=body, headers=ADMIN)
    assert refused.status_code == 422, refused.text
    assert [e["field"] for e in refused.json()["errors"]] == [field]


async def test_the_text_forms_json_has_no_literal_for_are_still_read(client: httpx.AsyncClient) -> None:
    """Strict, not unusable: UUIDs, enumerations, dates, timestamps and decimals arrive as JSON text."""
    made = await client.post("/v1/contacts", headers=ADMIN, json={
        "email": "text-forms@example.com", "kind": "customer", "birth_date": "1990-05-17",
        "first_contact_at": "2026-01-02T03:04:05+01:00"})
    assert made.status_code == 201, made.text
    assert (made.json()["birth_date"], made.json()["first_contact_at"]) == ("1990-05-17", "2026-01-02T02:04:05Z")
    order = await client.put("/v1/orders/strict-1", headers=ADMIN, json={
        "contact": {"id": made.json()["id"]}, "placed_at": "2026-01-02T03:04:05Z", "status": "paid",
        "currency": "EUR", "total_amount": "12.50", "items": [{"sku": "a", "quantity": 1, "unit_price": 12.5}]})
    assert order.status_code in (200, 201), order.text


async def test_a_whole_number_with_a_zero_fraction_is_that_integer(client: httpx.AsyncClient) -> None:
    """JSON Schema's `integer` is any number with a zero fraction: `2.0` is the integer 2. `2.5`, `"2"`, `true`,
    `1e400` (infinity) are not integers: still refused, naming the field."""
    issued = await client.post("/v1/tokens", headers=ADMIN, json={"subject": "a@shop.example", "role": "viewer",
                                                                  "ttl_seconds": 3600.0})
    assert issued.status_code == 201, issued.text
    made = await make_contact(client)
    item = {"sku": "a", "unit_price": "5.00"}
    order = {"contact": {"id": made["id"]}, "placed_at": "2026-01-02T03:04:05Z", "status": "paid",
             "currency": "EUR", "total_amount": "10.00"}
    stored = await client.put("/v1/orders/whole-1", headers=ADMIN, json={**order, "items": [{**item, "quantity": 2.0}]})
    assert stored.status_code == 201, stored.text
    assert stored.json()["items"][0]["quantity"] == 2 and isinstance(stored.json()["items"][0]["quantity"], int)
    for wrong in ("2.5", '"2"', "true", "1e400"):
        body = f'{{"contact": {{"id": "{made["id"]}"}}, "placed_at": "2026-01-02T03:04:05Z", "status": "paid", ' \
               f'"currency": "EUR", "total_amount": "10.00", "items": [{{"sku": "a", "unit_price": "5.00", ' \
               f'"quantity": {wrong}}}]}}'
        refused = await client.put("/v1/orders/whole-2", headers={**ADMIN, "Content-Type": "application/json"},
                                   content=body)
        assert refused.status_code == 422, (wrong, refused.text)
        assert [e["field"] for e in refused.json()["errors"]] == ["items.0.quantity"], wrong


# ---- the class: every request schema ---------------------------------------------------------------------------

# Types JSON carries as text: strict validation in Python mode refuses that text, so each needs FromJSON.
_TEXT_TYPES = {"uuid", "date", "datetime", "time", "timedelta", "decimal", "enum", "tuple", "set", "frozenset",
               "bytes"}


def _request_schemas() -> Iterator[type[InputSchema]]:
    for module in pkgutil.iter_modules(app.schemas.__path__):
        importlib.import_module(f"app.schemas.{module.name}")
    pending: list[type[InputSchema]] = [InputSchema]
    while pending:
        for sub in pending.pop().__subclasses__():
            pending.append(sub)
            yield sub


def _loose_spots(schema: Any, where: str, defs: dict[str, Any], guarded: bool = False) -> Iterator[str]:
    """Places of a core schema where a wrong-typed JSON value is converted, or a right one refused."""
    from app.schemas.strict import is_guard  # here: the walk is what fails before the change, not the import

    if isinstance(schema, list):
        for item in schema:
            yield from _loose_spots(item, where, defs, guarded)
        return
    if not isinstance(schema, dict):
        return
    kind = schema.get("type")
    if kind == "definitions":
        defs.update({d["ref"]: d for d in schema["definitions"]})
    if kind == "definition-ref":
        yield from _loose_spots(defs[schema["schema_ref"]], where, defs, guarded)
        return
    if kind == "json-or-python":  # FastAPI validates the parsed body in Python mode
        yield from _loose_spots(schema["python_schema"], where, defs, guarded)
        return
    guarded = guarded or (kind == "function-before" and is_guard(schema["function"].get("function")))
    if kind == "model" and not schema.get("config", {}).get("strict"):
        yield f"{where}: a lax model ({schema['cls'].__name__})"
    if kind in _TEXT_TYPES and not guarded:
        yield f"{where}: {kind} without FromJSON (its JSON text is refused)"
    if kind == "literal" and any(isinstance(e, bool) for e in schema["expected"]) and not guarded:
        yield f"{where}: a boolean literal takes 1 for true (use TrueOnly)"
    if kind == "int" and not guarded:
        yield f"{where}: an int that refuses 2.0, a JSON Schema integer (Annotated[int, ..., WholeNumber])"
    for key, value in schema.items():
        if key == "fields" and kind == "model-fields":
            for name, field in value.items():
                yield from _loose_spots(field, f"{where}.{name}", defs, guarded)
        elif key not in ("metadata", "serialization", "cls", "config", "definitions"):
            yield from _loose_spots(value, where, defs, guarded and kind != "model")


def test_every_request_schema_is_strict() -> None:
    loose = [spot for cls in _request_schemas()
             for spot in _loose_spots(cls.__pydantic_core_schema__, cls.__name__, {})]
    assert not loose, "\n".join(loose)


def test_the_contract_states_bounds_in_json_schema_words(app: FastAPI) -> None:
    """Bounds pydantic cannot push under a validator reach the document as `ge`/`le`: no client reads those."""
    def walk(node: Any, where: str) -> Iterator[str]:
        if isinstance(node, dict):
            if isinstance(node.get("type"), str) and node.keys() & {"ge", "le", "gt", "lt"}:
                yield where
            for key, value in node.items():
                yield from walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                yield from walk(value, f"{where}/{index}")

    assert not list(walk(app.openapi(), "#"))


def test_every_json_body_is_a_request_schema(app: FastAPI) -> None:
    """A body typed otherwise (a bare bool, a dict, an output model) would escape the strict base class."""
    for context in iter_route_contexts(app.routes):
        route = context.original_route
        if not isinstance(route, APIRoute):
            continue
        for field in route.dependant.body_params:
            annotation = field.field_info.annotation
            models = [a for a in getattr(annotation, "__args__", (annotation,)) if a is not type(None)]
            assert all(isinstance(m, type) and issubclass(m, InputSchema) for m in models), (route.path, annotation)
