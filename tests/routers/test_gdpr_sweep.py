"""Erasure sweep: drive one person through every feature that can store them, erase them, then look for them
in every column of every table (the session's temporary tables and bytea included, case-insensitive,
substring) and in every log line.

The bar (ARCHITECTURE.md): "After erasure, the person's email, phone and name occur in 0 rows of any table
and 0 log lines." Each test below names a path by which the person's data once survived erasure. The vendors'
side is in tests/sync/test_gdpr_vendors.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.db import make_sessionmaker
from app.services import delivery as delivery_service
from app.services import segment_sync
from app.settings import Settings
from app.worker import Worker
from tests.csv_samples import build_csv
from tests.factories import ADMIN, make_attribute, make_contact, make_list
from tests.routers.test_gdpr import erase
from tests.routers.test_imports import report, run_import, upload
from tests.routers.test_lists import outbox, url_path
from tests.routers.test_preferences import change, request_mode  # noqa: F401  (a fixture)
from tests.routers.test_signup import fresh_limits  # noqa: F401  (fixture: full signup buckets, no answer delay)
from tests.sync.conftest import brevo, mailchimp, worker  # noqa: F401  (fixtures of the vendor tests)
from tests.sync.keys import BREVO_KEY, MC_KEY

# ---- the person, and where to look for them -----------------------------------------------------------------


@dataclass
class Person:
    tag: str
    email: str
    national_phone: str           # as typed: "06 12 34 56 78"
    first_name: str
    last_name: str
    external_id: str
    ip: str
    user_agent: str
    id: str = ""
    extra: list[str] = field(default_factory=list)  # more strings that identify them (an old address, ...)

    @property
    def phone(self) -> str:       # E.164, as stored
        return "+33" + self.digits.removeprefix("0")

    @property
    def digits(self) -> str:      # "0612345678"
        return self.national_phone.replace(" ", "")

    @property
    def needles(self) -> list[str]:
        return [self.email, self.phone, self.digits, self.digits.removeprefix("0"), self.national_phone,
                self.first_name, self.last_name, self.external_id, self.ip, self.user_agent, *self.extra]


def new_person() -> Person:
    tag = uuid.uuid4().hex[:8]
    digits = f"1{random.randint(0, 9_999_999):07d}"  # noqa: S311  (06 1x xx xx xx: a valid French mobile)
    national = "06 " + " ".join(digits[i:i + 2] for i in range(0, 8, 2))
    return Person(tag=tag, email=f"ysolde.{tag}@example.org", national_phone=national, first_name=f"Ysolde{tag}",
                  last_name=f"Kervella{tag}", external_id=f"CUST-{tag}",
                  ip=f"198.51.100.{random.randint(1, 254)}", user_agent=f"Browser/{tag}")  # noqa: S311


def proof(person: Person) -> dict[str, str]:
    return {"ip": person.ip, "user_agent": person.user_agent, "wording": "Yes, send me the newsletter",
            "form_url": f"https://shop.example/newsletter?email={person.email}", "policy_version": "2026-01"}


def _escape(needle: str) -> str:
    return needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


_COLUMNS = text("""
    SELECT n.nspname AS schema, c.relname AS "table", a.attname AS "column", t.typname AS type
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
    JOIN pg_type t ON t.oid = a.atttypid
    WHERE c.relkind IN ('r', 'p') AND (n.nspname = current_schema() OR n.oid = pg_my_temp_schema())
    ORDER BY 1, 2, 3
""")


async def sweep(sessions: async_sessionmaker[AsyncSession], needles: list[str]) -> dict[str, int]:
    """{table.column: rows} holding any needle, over EVERY column of every table of the schema and of this
    connection's temporary schema (an import's staging table): each value as text (bytea read byte for byte),
    case-insensitive, anywhere in the value."""
    patterns = [f"%{_escape(n)}%" for n in needles if n]
    found: dict[str, int] = {}
    async with sessions() as session:
        columns = (await session.execute(_COLUMNS)).all()
        tables = {c.table for c in columns}
        assert {"contact", "import_chunk", "import_reject", "sync_link", "idempotency_record"} <= tables
        for schema, table, column, type_ in columns:
            value = f'encode("{column}", \'escape\')' if type_ == "bytea" else f'"{column}"::text'
            count = await session.scalar(text(
                f'SELECT count(*) FROM "{schema}"."{table}" WHERE {value} ILIKE ANY(:patterns)'  # noqa: S608
            ), {"patterns": patterns})
            if count:
                name = f"{table}.{column}" if schema == "public" or not schema.startswith("pg_temp") \
                    else f"pg_temp.{table}.{column}"
                found[name] = count
    return found


def logged(caplog: pytest.LogCaptureFixture, needles: list[str]) -> list[str]:
    """Log lines (any logger but the test client's own httpx) that hold a needle."""
    lines = [f"{r.name} {r.getMessage()}" for r in caplog.records if not r.name.startswith("httpx")]
    return [line for line in lines for n in needles if n.lower() in line.lower()]


def mailchimp_hash(email: str) -> str:
    return hashlib.md5(email.lower().encode(), usedforsecurity=False).hexdigest()


async def ok(response: httpx.Response, *status: int) -> dict[str, Any]:
    assert response.status_code in (status or (200, 201)), response.text
    return response.json() if response.content else {}  # type: ignore[no-any-return]


# ---- the whole tour (in-process, rolled back) -------------------------------------------------------------


async def create_person(client: httpx.AsyncClient, person: Person, **extra: Any) -> dict[str, Any]:
    attribute = f"nick_{person.tag}"
    await make_attribute(client, attribute, "text")
    contact = await ok(await client.post("/v1/contacts", headers={**ADMIN, "Idempotency-Key": f"c-{person.tag}"},
                                         json={"email": person.email, "phone": person.national_phone,
                                               "first_name": person.first_name, "last_name": person.last_name,
                                               "external_id": person.external_id, "kind": "customer",
                                               "address": {"line1": "3 rue des Lilas", "city": "Quimper"},
                                               "attributes": {attribute: f"{person.first_name} {person.last_name}"},
                                               "tags": ["vip", f"fam-{person.tag}"], **extra}), 201)
    assert contact["phone"] in (person.phone, None)
    person.id = contact["id"]
    return contact


async def tour(client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], person: Person) -> None:
    """Every feature of API.md that can store something about the person, exercised once."""
    idem = {**ADMIN, "Idempotency-Key": f"k-{person.tag}"}
    await create_person(client, person)
    cid = person.id
    # history: edits, a rename, a tag, an upsert and a batch (with Idempotency-Key)
    await ok(await client.patch(f"/v1/contacts/{cid}", json={"last_name": f"{person.last_name}-Le Goff",
                                                              "company": "Ti Breizh"}, headers=ADMIN))
    await ok(await client.put(f"/v1/contacts/{cid}/tags/friend-{person.tag}", headers=ADMIN))
    await ok(await client.post("/v1/contacts/upsert", headers={**idem, "Idempotency-Key": f"u-{person.tag}"},
                               json={"email": person.email, "job_title": "Brodeuse"}))
    await ok(await client.post("/v1/contacts/batch", headers={**idem, "Idempotency-Key": f"b-{person.tag}"},
                               json={"items": [{"external_id": person.external_id, "sector": "Textile"}]}))
    # lists: a plain one (consent in the body), a double opt-in one confirmed by the emailed link, a batch
    plain, doi, third = (await make_list(client), await make_list(client, double_opt_in=True),
                         await make_list(client))
    await ok(await client.put(f"/v1/lists/{plain['id']}/members/{cid}", headers=ADMIN,
                              json={"consent": {"proof": proof(person)}, "source": "newsletter_form"}))
    await ok(await client.put(f"/v1/lists/{doi['id']}/members/{cid}", headers=ADMIN,
                              json={"consent": {"proof": proof(person)}}))
    requested = [p for t, p in await outbox(sessions, cid) if t == "membership.confirmation_requested"]
    browser = {"User-Agent": person.user_agent}
    await ok(await client.post(url_path(requested[0]["confirm_url"]), headers=browser))
    await ok(await client.post(f"/v1/lists/{third['id']}/members/batch", json={"add": [cid]},
                               headers={**ADMIN, "Idempotency-Key": f"m-{person.tag}"}))
    # consents with their proof
    await ok(await client.post(f"/v1/contacts/{cid}/consents", headers={**ADMIN, "Idempotency-Key": f"s-{person.tag}"},
                               json={"purpose": "sms_marketing", "action": "granted", "proof": proof(person)}), 201)
    # orders and events (by the person's email, properties naming them)
    await ok(await client.post("/v1/events", headers=ADMIN, json={
        "contact": {"external_id": person.external_id}, "type": "form_submitted", "event_id": f"ev-{person.tag}",
        "occurred_at": "2026-05-02T10:00:00Z",
        "properties": {"email": person.email, "phone": person.national_phone, "name": person.first_name}}), 201)
    await ok(await client.post("/v1/events/batch", headers=ADMIN, json={"items": [{
        "contact": {"email": person.email}, "type": "call", "occurred_at": "2026-05-03T10:00:00Z",
        "properties": {"note": f"called {person.first_name} {person.last_name} on {person.national_phone}"}}]}))
    # (after the events: an order by email nulls the contact's external_id, a separate bug)
    await ok(await client.put(f"/v1/orders/SWEEP-{person.tag}", headers=ADMIN, json={
        "contact": {"email": person.email}, "placed_at": "2026-05-01T10:00:00Z", "status": "paid",
        "currency": "EUR", "total_amount": "49.90",
        "items": [{"sku": "TSHIRT", "name": f"T-shirt brodé {person.first_name}", "quantity": 1,
                   "unit_price": "49.90"}]}), 201)
    # segments: saved, previewed, counted, and synced to a destination (a snapshot of its members)
    segment = await ok(await client.post("/v1/segments", headers={**ADMIN, "Idempotency-Key": f"g-{person.tag}"},
                                         json={"name": f"seg-{person.tag}", "filter": {
                                             "all": [{"field": "tags", "op": "contains", "value": "vip"}]}}), 201)
    await ok(await client.post("/v1/segments/preview", json={"filter": segment["filter"]}, headers=ADMIN))
    await ok(await client.get(f"/v1/segments/{segment['id']}/contacts", headers=ADMIN))
    brevo_destination = await ok(await client.post("/v1/destinations", headers=ADMIN, json={
        "kind": "brevo", "name": f"brevo-{person.tag}", "config": {"api_key": BREVO_KEY},
        "list_mappings": [{"list_id": plain["id"], "remote_list_id": "7"}],
        "segment_mappings": [{"segment_id": segment["id"], "remote_list_id": "9"}],
        "field_mappings": {"first_name": "PRENOM", "last_name": "NOM", "phone": "SMS"}}), 201)
    mc_destination = await ok(await client.post("/v1/destinations", headers=ADMIN, json={
        "kind": "mailchimp", "name": f"mc-{person.tag}", "config": {"api_key": MC_KEY},
        "list_mappings": [{"list_id": doi["id"], "remote_list_id": "mc-news"}]}), 201)
    async with sessions.begin() as session:
        while await segment_sync.refresh_next(session, every_seconds=3600):
            pass
    async with sessions.begin() as session:  # the outbox becomes deliveries (the worker's first step)
        while await delivery_service.dispatch(session):
            pass
    # inbound webhooks: Brevo (unsubscribe, hard bounce) and Mailchimp (profile, unsubscribe)
    inbound = brevo_destination["generated_secrets"]["inbound_secret"]
    await ok(await client.post(f"/v1/inbound/brevo/{brevo_destination['id']}",
                               headers={"Authorization": f"Bearer {inbound}"}, json=[
                                   {"event": "unsubscribed", "email": person.email.upper(), "list_id": [7]},
                                   {"event": "hard_bounce", "email": person.email, "reason": person.email}]))
    secret = mc_destination["generated_secrets"]["inbound_secret"]
    for form in ({"type": "profile", "data[email]": person.email, "data[merges][FNAME]": person.first_name},
                 {"type": "unsubscribe", "data[email]": person.email, "data[list_id]": "mc-news",
                  "data[reason]": "manual"}):
        await ok(await client.post(f"/v1/inbound/mailchimp/{mc_destination['id']}?secret={secret}", data=form))
    # one-click unsubscribe (RFC 8058): one list, then every list
    unsubscribe = url_path(requested[0]["unsubscribe_url"])
    await ok(await client.get(unsubscribe, headers=browser))
    await ok(await client.post(unsubscribe, headers=browser))
    await ok(await client.post(unsubscribe + "?all=1", headers=browser))
    # duplicates, then a merge of a second record of the same person (made without Idempotency-Key)
    second = await make_contact(client, email=f"y.kervella.{person.tag}@example.net", phone=person.national_phone,
                                first_name=person.first_name, last_name=person.last_name)
    person.extra.append(second["email"])
    await ok(await client.get("/v1/contacts/duplicates", headers=ADMIN))
    await ok(await client.post(f"/v1/contacts/{cid}/merge", json={"duplicate_id": second["id"]}, headers=ADMIN))
    # reads that must not log them: search, timeline, history, export, GDPR export, suppression check
    await ok(await client.get("/v1/contacts", params={"q": person.last_name}, headers=ADMIN))
    await ok(await client.get("/v1/contacts", params={"email": person.email}, headers=ADMIN))
    await ok(await client.get(f"/v1/contacts/{cid}/timeline", headers=ADMIN))
    await ok(await client.get(f"/v1/contacts/{cid}/history", headers=ADMIN))
    assert person.email in (await client.get("/v1/exports/contacts", params={"format": "jsonl"},
                                             headers=ADMIN)).text
    await ok(await client.get(f"/v1/contacts/{cid}/export", headers=ADMIN))
    await ok(await client.get("/v1/suppressions/check", params={"email": person.email}, headers=ADMIN))


async def test_every_feature_then_erasure_leaves_nothing(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    person = new_person()
    await tour(client, sessions, person)
    before = await sweep(sessions, person.needles)
    assert {"contact.email", "contact.attributes", "contact_history.new_value", "consent_event.proof",
            "event.properties", "order.items", "idempotency_record.response_body"} <= before.keys()

    assert (await erase(client, person.id)).status_code == 204

    assert await sweep(sessions, person.needles) == {}
    assert logged(caplog, person.needles) == []
    assert "contact.erased" in caplog.text


@pytest.mark.usefixtures("fresh_limits")
async def test_a_person_who_came_through_the_public_pages_then_erased_themselves_leaves_nothing(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], app: FastAPI,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The newsletter box, the confirmation, the preference center (join, download, erase), a cart, and the
    # admin's reads by their identifiers: after the self-service erasure, nothing of them anywhere, the access
    # journal included (flushed: its entries are otherwise still in this process's buffer).
    caplog.set_level(logging.DEBUG)
    person = new_person()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(person.ip, 50123)),
                                 base_url="http://test") as own:  # the person's browser, from their address
        await _public_tour(client, own, sessions, person)
    await app.state.journal.flush(app.state.sessionmaker)

    assert await sweep(sessions, person.needles) == {}
    assert logged(caplog, person.needles) == []


async def _public_tour(client: httpx.AsyncClient, own: httpx.AsyncClient,
                       sessions: async_sessionmaker[AsyncSession], person: Person) -> None:
    origin = "https://shop.example"
    box = {"public_signup": True, "signup_origins": [origin], "signup_wording": "Oui !"}
    letter, offers = await make_list(client, **box), await make_list(client, **box)
    browser = {"Origin": origin, "Referer": f"{origin}/newsletter?email={person.email}",
               "User-Agent": person.user_agent}
    await ok(await own.post(f"/v1/public/lists/{letter['id']}/signup", headers=browser, json={
        "email": person.email.upper(), "first_name": person.first_name, "last_name": person.last_name,
        "consent": True}), 202)
    [contact] = (await client.get("/v1/contacts", params={"email": person.email}, headers=ADMIN)).json()["data"]
    person.id = contact["id"]
    await ok(await client.patch(f"/v1/contacts/{person.id}", headers=ADMIN, json={
        "phone": person.national_phone, "external_id": person.external_id}))
    [requested] = [p for t, p in await outbox(sessions, person.id) if t == "membership.confirmation_requested"]
    await ok(await own.post(url_path(requested["confirm_url"]), headers={"User-Agent": person.user_agent}))
    await ok(await client.put(f"/v1/carts/CART-{person.tag}", headers=ADMIN, json={
        "contact": {"external_id": person.external_id}, "currency": "EUR", "opened_at": "2026-05-01T10:00:00Z",
        "checkout_url": f"https://shop.example/checkout?email={person.email}",
        "items": [{"sku": "TSHIRT", "name": f"T-shirt {person.first_name}", "quantity": 1, "unit_price": "9.90"}]}),
        201)
    # the admin's reads by the person's identifiers
    for params in ({"external_id": person.external_id}, {"email": person.email}, {"q": person.last_name}):
        await ok(await client.get("/v1/contacts", params=params, headers=ADMIN))
    await ok(await client.get("/v1/journal", params={"email": person.email, "phone": person.national_phone},
                              headers=ADMIN))
    await ok(await client.get("/v1/suppressions/check", params={"phone": person.national_phone}, headers=ADMIN))
    links = await ok(await client.get(f"/v1/contacts/{person.id}/links", headers=ADMIN))
    # the preference center: join a list, download the data, erase (two steps)
    prefs = url_path(links["preferences_url"])
    page = {"Accept": "application/json", "User-Agent": person.user_agent}
    await ok(await own.post(prefs, headers=page, json={"lists": {offers["id"]: "subscribed"}}))
    assert person.email in (await own.post(prefs, headers=page, json={"export": True})).text
    confirmation = (await ok(await own.post(prefs, headers=page, json={"erase": "request"})))["confirmation"]
    assert (await ok(await own.post(prefs, headers=page, json={"erase_confirmation": confirmation})))[
        "erasure"] == "completed"


# ---- imports ----------------------------------------------------------------------------------------------------


def without_staging(found: dict[str, int]) -> dict[str, int]:
    """The import's staging table has its own test (test_import_staging_table_is_emptied)."""
    return {k: v for k, v in found.items() if not k.startswith("pg_temp.import_stage.")}


async def test_import_exact_rejects_and_the_file_are_gone(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The person's row, its duplicate (the report names their address) and a conflicting external id: the
    report keeps row and reason, never their values; the uploaded file itself is deleted when the job ends."""
    caplog.set_level(logging.DEBUG)
    person = new_person()
    data = build_csv(["E-mail", "Prénom", "Nom", "Téléphone", "Code client"], [
        (person.email, person.first_name, person.last_name, person.national_phone, person.external_id),
        (person.email.upper(), person.first_name, person.last_name, "", ""),
        (f"other.{person.tag}@example.org", "Other", "Person", "", person.external_id),
    ])
    job = await run_import(client, sessions, settings, data)
    assert (job["created"], job["rejected"]) == (1, 2), job
    contact = (await client.get("/v1/contacts", params={"email": person.email}, headers=ADMIN)).json()["data"][0]
    assert contact["phone"] == person.phone
    assert "import_reject.value" in await sweep(sessions, person.needles)

    assert (await erase(client, contact["id"])).status_code == 204

    assert without_staging(await sweep(sessions, person.needles)) == {}
    assert [line["reason"] for line in await report(client, job["id"])] == [
        "duplicate of row 2", "duplicate of row 2"]
    assert logged(caplog, person.needles) == []


async def test_import_queued_when_erased_skips_them_and_drops_the_file(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    """Erased while a file naming them waits in the queue (import_chunk.data, bytea): the job skips them, and the
    file is deleted when it ends. (Until the job runs, the file still holds them: see the report.)"""
    from app.services.imports.runner import run_next

    person = new_person()
    contact = await create_person(client, person)
    data = build_csv(["E-mail", "Prénom", "Nom"], [(person.email, person.first_name, person.last_name)])
    queued = (await upload(client, data)).json()
    assert (await erase(client, contact["id"])).status_code == 204
    assert await sweep(sessions, [person.email]) == {"import_chunk.data": 1}  # the queued file, until it runs
    assert await run_next(sessions, settings)
    job = (await client.get(f"/v1/imports/{queued['id']}", headers=ADMIN)).json()
    assert (job["status"], job["skipped"], job["created"]) == ("done", 1, 0)
    assert without_staging(await sweep(sessions, person.needles)) == {}


async def test_import_after_the_erasure_reports_their_repeated_rows_without_their_address(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    """A file read after the erasure names the person twice: their first row is skipped and reported without its
    address (docs/gdpr.md); the rows repeating it (by address, by customer number) are theirs too, and were
    reported with the repeated value, keeping the erased address for IMPORT_REPORT_VALUES_DAYS."""
    person = new_person()
    contact = await create_person(client, person)
    assert (await erase(client, contact["id"])).status_code == 204
    stranger = f"stranger.{person.tag}@example.org"
    data = build_csv(["E-mail", "Prénom", "Nom", "Code client"], [
        (person.email, person.first_name, person.last_name, person.external_id),
        (person.email.upper(), person.first_name, person.last_name, ""),
        ("", person.first_name, person.last_name, person.external_id),
        (stranger, "Other", "Person", ""),
        (stranger, "Other", "Person", ""),
    ])
    job = await run_import(client, sessions, settings, data)
    assert (job["created"], job["skipped"], job["rejected"]) == (1, 1, 3), job
    assert [(line["reason"], line["value"]) for line in await report(client, job["id"])] == [
        ("skipped: this person was erased (GDPR); the address is on the suppression list", ""),
        ("duplicate of row 2", ""), ("duplicate of row 2", ""),
        ("duplicate of row 5", stranger)]  # a living person's duplicate still says which value repeats
    assert without_staging(await sweep(sessions, person.needles)) == {}


async def test_import_reject_values_that_contain_them(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    """Refused cells that CONTAIN them (not only equal): an email cell holding two addresses, a phone typed with a
    note, a too-long name cell starting with their full name (upper case, last name first, cut at 200 characters),
    their last name as the whole cell. All cleared; row, column and reason stay."""
    person = new_person()
    data = build_csv(["E-mail", "Prénom", "Nom", "Téléphone"], [
        (person.email, person.first_name, person.last_name, person.national_phone),
        (f"{person.email.upper()}, other.{person.tag}@example.org", "A", "B", ""),
        (f"x.{person.tag}@example.org", "C", f"{person.last_name} {person.first_name} ".upper() + "x" * 300, ""),
        (f"y.{person.tag}@example.org", "D", "E", f"{person.national_phone.replace(' ', '.')} (bureau)"),
        (f"z.{person.tag}@example.org", "F", "G", f"+33 {person.national_phone[1:]} / 07 00"),
        (person.last_name.upper(), "H", "I", ""),  # typed in the wrong column: the whole value
    ])
    job = await run_import(client, sessions, settings, data)
    assert (job["created"], job["rejected"]) == (1, 5), job
    contact = (await client.get("/v1/contacts", params={"email": person.email}, headers=ADMIN)).json()["data"][0]
    assert "import_reject.value" in await sweep(sessions, person.needles)

    assert (await erase(client, contact["id"])).status_code == 204

    assert without_staging(await sweep(sessions, person.needles)) == {}
    assert [(line["row"], line["value"]) for line in await report(client, job["id"])] == [
        ("3", ""), ("4", ""), ("5", ""), ("6", ""), ("7", "")]


async def test_import_reject_value_of_a_former_address(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    # An address the person had when the report was written (changed since, or a record merged into theirs)
    # is found through their own history, which erasure reads before deleting it.
    person = new_person()
    old = f"old.{person.tag}@example.org"
    person.extra.append(old)
    data = build_csv(["E-mail", "Prénom"], [(old, person.first_name), (old.upper(), person.first_name)])
    job = await run_import(client, sessions, settings, data)
    assert (job["created"], job["rejected"]) == (1, 1), job
    contact = (await client.get("/v1/contacts", params={"email": old}, headers=ADMIN)).json()["data"][0]
    await ok(await client.patch(f"/v1/contacts/{contact['id']}", json={"email": person.email}, headers=ADMIN))

    assert (await erase(client, contact["id"])).status_code == 204

    assert "import_reject.value" not in await sweep(sessions, [old])


async def test_import_reject_value_of_an_imported_record_merged_into_theirs(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    # An imported record's history holds no address (one `created` entry), and a merge deletes the record: the
    # merge keeps what it was known by on the survivor's history (`merged_contact.*`), where erasure finds it.
    person = new_person()
    await create_person(client, person)
    second = f"second.{person.tag}@example.org"
    person.extra.append(second)
    data = build_csv(["E-mail", "Prénom"], [(second, person.first_name), (second.upper(), person.first_name)])
    job = await run_import(client, sessions, settings, data)
    assert (job["created"], job["rejected"]) == (1, 1), job
    duplicate = (await client.get("/v1/contacts", params={"email": second}, headers=ADMIN)).json()["data"][0]
    await ok(await client.post(f"/v1/contacts/{person.id}/merge", json={"duplicate_id": duplicate["id"]},
                               headers=ADMIN))

    assert (await erase(client, person.id)).status_code == 204

    assert await sweep(sessions, person.needles) == {}


async def test_their_address_on_a_record_wrongly_merged_into_another_contact(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    # An imported record holding the person's address merged into someone else's (a wrong merge); the address,
    # freed, comes back as the person's own contact, which is then erased: the other contact's history keeps
    # the merged record's address (`merged_contact.email`), which goes with the person.
    person = new_person()
    job = await run_import(client, sessions, settings, build_csv(["E-mail"], [(person.email,)]))
    assert job["created"] == 1, job
    imported = (await client.get("/v1/contacts", params={"email": person.email}, headers=ADMIN)).json()["data"][0]
    other = await make_contact(client, first_name="Gwenn")
    await ok(await client.post(f"/v1/contacts/{other['id']}/merge", json={"duplicate_id": imported["id"]},
                               headers=ADMIN))
    await create_person(client, person)

    assert (await erase(client, person.id)).status_code == 204

    assert await sweep(sessions, person.needles) == {}
    assert (await client.get(f"/v1/contacts/{other['id']}", headers=ADMIN)).status_code == 200


async def test_import_reject_value_with_a_former_full_name(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    # A name changed since (a marriage): the full name they had is still theirs, in a refused cell among other text.
    person = new_person()
    await create_person(client, person)
    former = f"{person.first_name} Lovelace{person.tag}"
    await ok(await client.patch(f"/v1/contacts/{person.id}", json={"last_name": f"Lovelace{person.tag}"},
                                headers=ADMIN))
    await ok(await client.patch(f"/v1/contacts/{person.id}", json={"last_name": person.last_name}, headers=ADMIN))
    data = build_csv(["E-mail", "Téléphone"], [(f"other.{person.tag}@example.org", f"call {former}")])
    job = await run_import(client, sessions, settings, data)
    assert job["rejected"] == 1, job

    assert (await erase(client, person.id)).status_code == 204

    assert "import_reject.value" not in await sweep(sessions, [former])


async def test_import_staging_table_is_emptied(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    # The runner's per-connection staging table is emptied before each batch commits: a pooled connection's
    # temporary table is out of an erasure's reach.
    person = new_person()
    data = build_csv(["E-mail", "Prénom", "Nom", "Téléphone", "Code client"], [
        (person.email, person.first_name, person.last_name, person.national_phone, person.external_id)])
    job = await run_import(client, sessions, settings, data)
    assert job["created"] == 1, job
    contact = (await client.get("/v1/contacts", params={"email": person.email}, headers=ADMIN)).json()["data"][0]

    assert (await erase(client, contact["id"])).status_code == 204

    assert await sweep(sessions, person.needles) == {}


# ---- merge ------------------------------------------------------------------------------------------------------


async def test_merged_away_record_leaves_nothing(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]
) -> None:
    # Stored responses that name a record merged into the person's (an Idempotency-Key create of the duplicate)
    # go with the person: erasure follows contact_merge to the merged ids.
    person = new_person()
    await create_person(client, person)
    second_email = f"y.kervella.{person.tag}@example.net"
    person.extra.append(second_email)
    duplicate = await ok(await client.post("/v1/contacts", headers={**ADMIN, "Idempotency-Key": f"d-{person.tag}"},
                                           json={"email": second_email, "first_name": person.first_name,
                                                 "last_name": person.last_name, "phone": person.national_phone}),
                         201)
    await ok(await client.post(f"/v1/contacts/{duplicate['id']}/consents",
                               headers={**ADMIN, "Idempotency-Key": f"dc-{person.tag}"},
                               json={"purpose": "profiling", "action": "granted", "proof": proof(person)}), 201)
    await ok(await client.post(f"/v1/contacts/{person.id}/merge", json={"duplicate_id": duplicate["id"]},
                               headers=ADMIN))

    assert (await erase(client, person.id)).status_code == 204

    assert await sweep(sessions, person.needles) == {}


# ---- history of another contact ---------------------------------------------------------------------------------


async def test_their_address_typed_on_another_contact_first(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]
) -> None:
    # The person's address and phone once typed on the wrong record (then corrected), with their name: that
    # change of the other record's history loses the person's side (gdpr._SCRUB_OTHERS_HISTORY).
    person = new_person()
    await create_person(client, person, email=f"tmp.{person.tag}@example.org", phone=None)
    colleague = await make_contact(client, first_name="Gwenn")
    await ok(await client.patch(f"/v1/contacts/{colleague['id']}", headers=ADMIN,
                                json={"email": person.email, "phone": person.national_phone,
                                      "last_name": person.last_name}))
    await ok(await client.patch(f"/v1/contacts/{colleague['id']}", headers=ADMIN,
                                json={"email": colleague["email"], "phone": None, "last_name": "Le Goff"}))
    await ok(await client.patch(f"/v1/contacts/{person.id}", headers=ADMIN,
                                json={"email": person.email, "phone": person.national_phone}))
    person.extra.append(f"tmp.{person.tag}@example.org")

    assert (await erase(client, person.id)).status_code == 204

    assert await sweep(sessions, person.needles) == {}


# ---- the suppression list ---------------------------------------------------------------------------------------


async def test_erased_again_after_a_release(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]
) -> None:
    # A release keeps the person's proof on each released entry; a later erasure clears it on every entry of
    # that release, also the phone's, which is not suppressed again (they came back with the email only).
    person = new_person()
    await create_person(client, person)
    assert (await erase(client, person.id)).status_code == 204
    await ok(await client.post("/v1/suppressions/release", headers=ADMIN, json={
        "email": person.email, "phone": person.national_phone, "proof": proof(person)}))
    back = await make_contact(client, email=person.email, first_name=person.first_name)

    assert (await erase(client, back["id"])).status_code == 204

    assert await sweep(sessions, person.needles) == {}


@pytest.mark.usefixtures("request_mode")
async def test_a_refusal_note_naming_them(client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]
                                          ) -> None:
    """An admin refused their erasure request with a note naming them; a later erasure clears it (a note that
    names no one, the legal ground of another refusal, stays with the refusal it explains)."""
    person, stranger = new_person(), await make_contact(client)
    await create_person(client, person)
    legal = "Invoices are kept 10 years (Code de commerce L123-22)"
    notes = {person.id: f"{person.first_name} {person.last_name} ({person.email}) owes invoice 12",
             stranger["id"]: legal}
    for contact_id, note in notes.items():
        confirmation = (await change(client, contact_id, {"erase": "request"})).json()["confirmation"]
        filed = (await change(client, contact_id, {"erase_confirmation": confirmation})).json()["request"]
        await ok(await client.post(f"/v1/erasure-requests/{filed['id']}/refuse", headers=ADMIN, json={"note": note}))
    assert (await erase(client, person.id)).status_code == 204
    assert await sweep(sessions, person.needles) == {}
    async with sessions() as session:
        kept = (await session.scalars(text("SELECT note FROM erasure_request WHERE contact_id = :id"),
                                      {"id": stranger["id"]})).all()
    assert kept == [legal]


# ---- destinations, with the real worker and spec-checking fakes (committed transactions) ------------------------


async def drain(w: Worker) -> None:
    async with asyncio.timeout(30):
        await w.drain()


def committed(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return make_sessionmaker(engine)


async def subscribed_person(client: httpx.AsyncClient, list_id: str) -> Person:
    person = new_person()
    await create_person(client, person)
    await ok(await client.put(f"/v1/lists/{list_id}/members/{person.id}", headers=ADMIN,
                              json={"consent": {"proof": proof(person)}}))
    return person
