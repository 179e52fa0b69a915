"""GDPR over HTTP: right of access (export), right to erasure, the suppression list, prospect retention."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import subprocess
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.schemas.gdpr import RETENTION_IDS_SHOWN
from app.security import Role, Scope
from app.services.idempotency import IdempotencyExpiry
from app.services.imports.runner import run_next
from app.settings import Settings
from tests.auth import bearer
from tests.csv_samples import build_csv
from tests.factories import ADMIN, PROOF, make_attribute, make_contact, make_list, unique_email
from tests.routers.test_contacts import assert_problem
from tests.routers.test_imports import report, run_import, upload
from tests.routers.test_journal import seed_prospects
from tests.routers.test_lists import ledger, outbox

ROOT = Path(__file__).resolve().parents[2]
SCANNED_TYPES = ("text", "character varying", "jsonb", "json", "ARRAY")


@dataclass
class Person:
    """A contact with something in every table that can hold a person, and the strings that identify them."""

    id: str
    email: str
    phone: str
    first_name: str
    last_name: str
    line1: str
    ip: str
    user_agent: str
    list_id: str
    consent_event_ids: list[int]

    @property
    def needles(self) -> list[str]:
        return [self.email, self.phone, self.phone.removeprefix("+33"), self.first_name, self.last_name, self.line1,
                self.ip, self.user_agent]


async def build_person(client: httpx.AsyncClient) -> Person:
    tag = uuid.uuid4().hex[:8]
    phone = f"+3361{random.randint(0, 9_999_999):07d}"  # noqa: S311  (+33 61: valid mobile numbers)
    proof = {**PROOF, "ip": f"198.51.100.{random.randint(1, 254)}", "user_agent": f"Browser/{tag}",  # noqa: S311
             "form_url": f"https://shop.example/newsletter?ref={tag}"}
    await make_attribute(client, f"shoe_{tag}", "number")
    created = await client.post("/v1/contacts", headers={**ADMIN, "Idempotency-Key": f"create-{tag}"}, json={
        "email": f"ysolde.{tag}@example.org", "phone": phone, "first_name": f"Ysolde{tag}",
        "last_name": f"Kervella{tag}", "address": {"line1": f"{tag} rue des Lilas", "city": "Quimper"},
        "attributes": {f"shoe_{tag}": 38}, "tags": ["vip"], "kind": "customer",
    })
    assert created.status_code == 201, created.text
    contact = created.json()
    cid = contact["id"]
    renamed = await client.patch(f"/v1/contacts/{cid}", json={"last_name": f"Kervella{tag}-Le Goff"}, headers=ADMIN)
    assert renamed.status_code == 200, renamed.text
    the_list = await make_list(client)
    subscribed = await client.put(f"/v1/lists/{the_list['id']}/members/{cid}", json={"consent": {"proof": proof}},
                                  headers=ADMIN)
    assert subscribed.status_code in (200, 201), subscribed.text
    consent = await client.post(f"/v1/contacts/{cid}/consents", headers={**ADMIN, "Idempotency-Key": f"c-{tag}"},
                                json={"purpose": "sms_marketing", "action": "granted", "proof": proof})
    assert consent.status_code == 201, consent.text
    order = await client.put(f"/v1/orders/GDPR-{tag}", headers=ADMIN, json={
        "contact": {"id": cid}, "placed_at": "2026-05-01T10:00:00Z", "status": "paid", "currency": "EUR",
        "total_amount": "49.90", "items": [{"sku": "TSHIRT", "name": "T-shirt", "quantity": 1, "unit_price": "49.90"}],
    })
    assert order.status_code == 201, order.text
    event = await client.post("/v1/events", headers=ADMIN, json={
        "contact": {"id": cid}, "type": "form_submitted", "occurred_at": "2026-05-02T10:00:00Z",
        "properties": {"form": "contact", "email": contact["email"], "name": f"Ysolde{tag}"},
    })
    assert event.status_code == 201, event.text
    events = (await ledger(client, cid))["events"]
    return Person(cid, contact["email"], phone, f"Ysolde{tag}", f"Kervella{tag}", f"{tag} rue des Lilas",
                  proof["ip"], proof["user_agent"], the_list["id"], [e["id"] for e in events])


async def occurrences(sessions: async_sessionmaker[AsyncSession], needles: list[str]) -> dict[str, int]:
    """Every text, varchar, json(b) and array column of every table, searched for each needle."""
    found: dict[str, int] = {}
    async with sessions() as session:
        columns = (await session.execute(text(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND data_type = ANY(:types) ORDER BY table_name, column_name"
        ), {"types": list(SCANNED_TYPES)})).all()
        assert {"contact", "consent_event", "contact_history", "event", "order", "outbox_message",
                "idempotency_record", "suppression"} <= {c.table_name for c in columns}
        for table, column in columns:
            count = await session.scalar(text(
                f'SELECT count(*) FROM "{table}" WHERE "{column}"::text ILIKE ANY(:patterns)'  # noqa: S608
            ), {"patterns": [f"%{n}%" for n in needles]})
            if count:
                found[f"{table}.{column}"] = count
    return found


async def erase(client: httpx.AsyncClient, contact_id: str, headers: dict[str, str] = ADMIN) -> httpx.Response:
    return await client.delete(f"/v1/contacts/{contact_id}", headers=headers)


async def suppressed(client: httpx.AsyncClient, **params: str) -> bool:
    response = await client.get("/v1/suppressions/check", params=params, headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()["suppressed"]  # type: ignore[no-any-return]


# ---- right of access ----------------------------------------------------------------------------------------


class TestExport:
    async def test_holds_everything_about_the_person(self, client: httpx.AsyncClient) -> None:
        person = await build_person(client)
        response = await client.get(f"/v1/contacts/{person.id}/export", headers=ADMIN)
        assert response.status_code == 200, response.text
        doc = response.json()
        assert doc["format"] == "carnet.contact-export/1" and doc["contact_id"] == person.id
        assert doc["pii_masked"] is False
        profile = doc["profile"]
        assert (profile["email"], profile["phone"], profile["first_name"]) == (person.email, person.phone,
                                                                               person.first_name)
        assert profile["address"]["line1"] == person.line1
        assert doc["attributes"] == profile["attributes"] and list(doc["attributes"].values()) == [38]
        assert doc["tags"] == ["vip"]
        assert [(m["list_id"], m["status"]) for m in doc["memberships"]] == [(person.list_id, "subscribed")]
        assert doc["memberships"][0]["list_name"].startswith("list-")
        assert doc["consents"]["state"]["email_marketing"]["granted"] is True
        assert doc["consents"]["state"]["sms_marketing"]["granted"] is True
        assert [e["id"] for e in doc["consents"]["events"]] == person.consent_event_ids
        assert doc["consents"]["events"][0]["proof"]["ip"] == person.ip
        assert [(o["external_id"], o["total_amount"]) for o in doc["orders"]] == [(f"GDPR-{person.first_name[6:]}",
                                                                                  "49.90")]
        assert [(e["type"], e["properties"]["form"]) for e in doc["events"]] == [("form_submitted", "contact")]
        fields = {h["field"] for h in doc["history"]}
        assert {"created", "last_name", "lifecycle_stage"} <= fields
        renamed = next(h for h in doc["history"] if h["field"] == "last_name")
        assert (renamed["old_value"], renamed["new_value"]) == (person.last_name, f"{person.last_name}-Le Goff")
        assert [h["id"] for h in doc["history"]] == sorted(h["id"] for h in doc["history"])

    async def test_is_masked_without_pii_read(self, client: httpx.AsyncClient) -> None:
        person = await build_person(client)
        narrowed = bearer(Role.MANAGER, scopes={Scope.EXPORTS_READ})
        doc = (await client.get(f"/v1/contacts/{person.id}/export", headers=narrowed)).json()
        assert doc["pii_masked"] is True
        assert doc["profile"]["email"] == f"{person.email[0]}***@example.org"
        assert doc["profile"]["first_name"] == f"{person.first_name[0]}***"
        assert doc["consents"]["events"][0]["proof"]["ip"] == "***"
        assert [e["properties"] for e in doc["events"]] == [{"form": "***", "email": "***", "name": "***"}]
        renamed = next(h for h in doc["history"] if h["field"] == "last_name")
        assert (renamed["old_value"], renamed["new_value"]) == ("K***", "K***")

    async def test_needs_exports_read_and_an_existing_contact(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        for role in (Role.EDITOR, Role.VIEWER, Role.INTEGRATION):
            denied = await client.get(f"/v1/contacts/{contact['id']}/export", headers=bearer(role))
            assert assert_problem(denied, 403)["missing_scopes"] == ["exports:read"]
        manager = bearer(Role.MANAGER)
        assert (await client.get(f"/v1/contacts/{contact['id']}/export", headers=manager)).status_code == 200
        assert_problem(await client.get(f"/v1/contacts/{uuid.uuid4()}/export", headers=ADMIN), 404)


# ---- right to erasure ---------------------------------------------------------------------------------------


class TestErase:
    async def test_leaves_no_trace_in_any_table_or_log(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO)
        person = await build_person(client)
        before = await occurrences(sessions, person.needles)
        assert {"contact.email", "contact_history.new_value", "consent_event.proof", "event.properties",
                "idempotency_record.response_body"} <= before.keys()  # the scan does find the person

        response = await erase(client, person.id)
        assert response.status_code == 204 and response.content == b""

        assert await occurrences(sessions, person.needles) == {}
        assert caplog.text and not [n for n in person.needles if n in caplog.text]
        assert "contact.erased" in caplog.text
        assert_problem(await client.get(f"/v1/contacts/{person.id}", headers=ADMIN), 404)
        assert_problem(await erase(client, person.id), 404)
        async with sessions() as session:
            leftovers = {t: await session.scalar(text(f'SELECT count(*) FROM "{t}" WHERE contact_id = :c'),  # noqa: S608
                                                 {"c": person.id})
                         for t in ("contact_history", "event", "order", "list_membership", "consent_event")}
        assert leftovers == dict.fromkeys(leftovers, 0)
        assert (await outbox(sessions, person.id))[-1] == ("contact.erased", {"contact_id": person.id})

    async def test_leaves_no_trace_in_import_reject_reports(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
    ) -> None:
        """A person imported from a file whose rows also held them twice: the report named their address (the
        duplicate) and their too-long name. Erased, the report keeps its rows and reasons, not those values."""
        tag = uuid.uuid4().hex[:8]
        email, first, last = f"gwenn.{tag}@example.org", f"Gwenn{tag}", f"Le Goff{tag}"
        data = build_csv(["E-mail", "Prénom", "Nom", "Code client"],
                         [(email, first, last, f"C-{tag}"), (email.upper(), first, last, ""),
                          (f"other.{tag}@example.org", first, "x" * 300, "")])
        job = await run_import(client, sessions, settings, data)
        assert (job["status"], job["created"], job["rejected"]) == ("done", 1, 2)
        needles = [email, first, last, f"C-{tag}"]
        assert "import_reject.value" in await occurrences(sessions, needles)
        contact = (await client.get("/v1/contacts", params={"email": email}, headers=ADMIN)).json()["data"][0]

        assert (await erase(client, contact["id"])).status_code == 204

        assert await occurrences(sessions, needles) == {}
        lines = await report(client, job["id"])
        assert [(line["row"], line["reason"], line["value"][:3]) for line in lines] == [
            ("3", "duplicate of row 2", ""), ("4", "at most 255 characters (this one has 300)", "xxx")]  # not theirs

    async def test_clears_reject_values_that_contain_the_person(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
    ) -> None:
        """Refused cells holding the person among other text: two addresses in one cell, their mobile written
        with a second number, their full name in a cell cut at 200 characters. Strangers who only share the
        last name keep their lines' values."""
        tag = uuid.uuid4().hex[:8]
        email, first, last = f"maiwenn.{tag}@example.org", f"Maiwenn{tag}", f"Martin{tag}"
        mobile = f"61{random.randint(0, 9_999_999):07d}"  # noqa: S311  (06 1x: valid mobiles, as build_person's)
        national = "0" + " ".join([mobile[0], *(mobile[i:i + 2] for i in range(1, 9, 2))])  # 06 12 34 56 78
        data = build_csv(["E-mail", "Prénom", "Nom", "Portable"], [
            (email, first, last, national),
            (f"{email.upper()}, contact.{tag}@example.org", "", "", ""),        # an invalid email cell
            (f"b.{tag}@example.org", "", "", f"{national} / 07 00"),            # an invalid phone cell
            (f"c.{tag}@example.org", f"{first} {last} " + "x" * 300, "", ""),  # too long, cut at 200
            (f"d.{tag}@example.org", "Paul", f"{last} Dupont " + "y" * 300, ""),  # a stranger: Paul Martin… Dupont
            (f"e.{tag}@example.org", "", f"{last} " + "z" * 300, ""),            # a stranger named Martin… too
        ])
        job = await run_import(client, sessions, settings, data)
        assert (job["status"], job["created"], job["rejected"]) == ("done", 1, 5)
        contact = (await client.get("/v1/contacts", params={"email": email}, headers=ADMIN)).json()["data"][0]
        needles = [email, f"{first} {last}", national, mobile]
        assert "import_reject.value" in await occurrences(sessions, needles)

        assert (await erase(client, contact["id"])).status_code == 204

        assert await occurrences(sessions, needles) == {}
        values = {line["row"]: line["value"] for line in await report(client, job["id"])}
        assert (values["3"], values["4"], values["5"]) == ("", "", "")
        assert values["6"].startswith(f"{last} Dupont yyy") and values["7"].startswith(f"{last} zzz")

    async def test_clears_import_file_names_that_name_the_person(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
    ) -> None:
        """The uploaded file's name is the importer's free text: "relance_jean_dupont.csv" names the person and
        outlived their erasure. The report scrub's rules apply, separators and extension aside; a stranger's file
        that only shares the last name keeps its name."""
        tag = uuid.uuid4().hex[:8]
        email, first, last = f"jean.{tag}@example.org", f"Jean{tag}", f"Dupont{tag}"
        created = await client.post("/v1/contacts", json={"email": email, "first_name": first, "last_name": last},
                                    headers=ADMIN)
        assert created.status_code == 201, created.text
        names = {"full": f"relance_{first}_{last}.csv", "hyphens": f"{last}-{first}.csv",
                 "email": f"export {email}.csv", "alone": f"{last}.csv", "stranger": f"paul_{last}_2026.csv",
                 "nobody": f"clients-{tag}.csv"}
        jobs = {}
        for key, name in names.items():
            response = await upload(client, build_csv(["E-mail"], [(f"{key}.{tag}@example.net",)]), filename=name)
            assert response.status_code == 202, response.text
            jobs[key] = response.json()["id"]
        while await run_next(sessions, settings):
            pass

        assert (await erase(client, created.json()["id"])).status_code == 204

        kept = {key: (await client.get(f"/v1/imports/{job}", headers=ADMIN)).json()["filename"]
                for key, job in jobs.items()}
        assert kept == {"full": None, "hyphens": None, "email": None, "alone": None,
                        "stranger": names["stranger"], "nobody": names["nobody"]}
        assert await occurrences(sessions, [f"{first}_{last}", f"{last}-{first}", email, f"{last}.csv"]) == {}

    async def test_ledger_is_de_identified_not_deleted(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        person = await build_person(client)
        assert len(person.consent_event_ids) == 2
        async with sessions() as session:
            total = await session.scalar(text("SELECT count(*) FROM consent_event"))
        assert (await erase(client, person.id)).status_code == 204
        async with sessions() as session:
            assert await session.scalar(text("SELECT count(*) FROM consent_event")) == total
            rows = (await session.execute(text(
                "SELECT contact_id, purpose, action, proof FROM consent_event WHERE id = ANY(:ids) ORDER BY id"
            ), {"ids": person.consent_event_ids})).all()
        assert [(r.contact_id, r.purpose, r.action) for r in rows] == [
            (None, "email_marketing", "granted"), (None, "sms_marketing", "granted")]
        assert all(r.proof == {"wording": PROOF["wording"], "policy_version": PROOF["policy_version"]} for r in rows)
        async with sessions() as session:  # the erasure switched its flag off again
            assert await session.scalar(text("SELECT coalesce(current_setting('carnet.erasing', true), '')")) != "on"

    async def test_ledger_free_text_naming_the_person_is_cleared(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        """`source` and the proof's `wording` and `policy_version` are the caller's free text, kept by the
        de-identification whatever they said ("phone call with Ysolde Kervella"). Where they name the person they
        go; the shop's own wording, naming no one, stays with the event."""
        person = await build_person(client)
        full = f"{person.first_name} {person.last_name}"
        naming = await client.post(f"/v1/contacts/{person.id}/consents", headers=ADMIN, json={
            "purpose": "phone_marketing", "action": "granted", "source": f"phone call with {full}",
            "proof": {"wording": f"{full} said yes on the phone", "policy_version": f"v1 {person.email}"}})
        assert naming.status_code == 201, naming.text
        assert (await erase(client, person.id)).status_code == 204
        async with sessions() as session:
            rows = (await session.execute(text(
                "SELECT source, proof FROM consent_event WHERE id = ANY(:ids) ORDER BY id"
            ), {"ids": [*person.consent_event_ids, naming.json()["id"]]})).all()
        assert [(r.source, r.proof) for r in rows] == [
            *[(None, {"wording": PROOF["wording"], "policy_version": PROOF["policy_version"]})] * 2,
            (None, None)]
        assert await occurrences(sessions, [full, person.email]) == {}

    async def test_the_ledger_still_refuses_other_writes(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        person = await build_person(client)
        event_id = person.consent_event_ids[0]
        erasing = "SELECT set_config('carnet.erasing', 'on', true)"
        attempts = [
            (None, "UPDATE consent_event SET contact_id = NULL, proof = NULL WHERE id = :id"),  # no flag
            (None, "UPDATE consent_event SET contact_id = NULL, proof = proof - 'ip' - 'user_agent' - 'form_url' "
                   "WHERE id = :id"),
            (erasing, "UPDATE consent_event SET action = 'withdrawn' WHERE id = :id"),
            (erasing, "UPDATE consent_event SET contact_id = NULL, proof = proof WHERE id = :id"),  # proof kept
            (erasing, "UPDATE consent_event SET contact_id = NULL, proof = NULL, occurred_at = now() WHERE id = :id"),
            (erasing, "UPDATE consent_event SET contact_id = NULL, proof = NULL, source = 'x' WHERE id = :id"),
            (erasing, "UPDATE consent_event SET contact_id = NULL, proof = proof - 'ip' - 'user_agent' - 'form_url' "
                      "|| '{\"wording\": \"changed\"}' WHERE id = :id"),  # the free text cleared, never rewritten
            (erasing, "DELETE FROM consent_event WHERE id = :id"),
        ]
        for flag, statement in attempts:
            with pytest.raises(DBAPIError, match="consent_event is append-only"):
                async with sessions() as session, session.begin():
                    if flag:
                        await session.execute(text(flag))
                    await session.execute(text(statement), {"id": event_id})
        assert [e["id"] for e in (await ledger(client, person.id))["events"]] == person.consent_event_ids
        assert (await erase(client, person.id)).status_code == 204
        with pytest.raises(DBAPIError, match="consent_event is append-only"):
            async with sessions() as session, session.begin():
                await session.execute(text("DELETE FROM consent_event WHERE id = :id"), {"id": event_id})

    async def test_if_match_is_honoured(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        etag = (await client.get(f"/v1/contacts/{contact['id']}", headers=ADMIN)).headers["etag"]
        assert etag == '"v1"'
        await client.patch(f"/v1/contacts/{contact['id']}", json={"company": "Acme"}, headers=ADMIN)
        stale = await erase(client, contact["id"], {**ADMIN, "If-Match": etag})
        assert assert_problem(stale, 412)["current_version"] == 2
        assert (await client.get(f"/v1/contacts/{contact['id']}", headers=ADMIN)).status_code == 200
        assert (await erase(client, contact["id"], {**ADMIN, "If-Match": '"v2"'})).status_code == 204

    async def test_only_admins_erase(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        for role in (Role.MANAGER, Role.EDITOR, Role.VIEWER, Role.INTEGRATION):
            denied = await erase(client, contact["id"], bearer(role))
            assert assert_problem(denied, 403)["missing_scopes"] == ["contacts:erase"]
        assert (await client.get(f"/v1/contacts/{contact['id']}", headers=ADMIN)).status_code == 200
        assert_problem(await client.delete(f"/v1/contacts/{contact['id']}"), 401)


# ---- the suppression list -----------------------------------------------------------------------------------


class TestSuppression:
    async def test_an_erased_address_is_suppressed_and_keyed(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        person = await build_person(client)
        assert not await suppressed(client, email=person.email)
        assert (await erase(client, person.id)).status_code == 204
        assert await suppressed(client, email=person.email.upper())  # normalized like a contact's email
        assert await suppressed(client, phone=person.phone.replace("+33", "0"))
        assert not await suppressed(client, email=unique_email())
        async with sessions() as session:
            rows = (await session.execute(text("SELECT kind, digest, reason FROM suppression"))).all()
        assert sorted((r.kind, r.reason) for r in rows) == [("email", "erasure"), ("phone", "erasure")]
        bare = {hashlib.sha256(v.encode()).hexdigest() for v in (person.email, person.phone,
                                                                 f"email:{person.email}", f"phone:{person.phone}")}
        assert not bare & {r.digest for r in rows}  # keyed HMAC, never a bare SHA-256

    async def test_check_needs_contacts_read_pii_read_and_an_address(self, client: httpx.AsyncClient) -> None:
        body = assert_problem(await client.get("/v1/suppressions/check", params={"email": unique_email()},
                                               headers=bearer(Role.VIEWER)), 403)
        assert body["missing_scopes"] == ["pii:read"]  # a lookup by address, like ?email= (docs/security.md)
        assert_problem(await client.get("/v1/suppressions/check", headers=ADMIN), 422, "email")
        assert_problem(await client.get("/v1/suppressions/check", params={"email": "nope"}, headers=ADMIN), 422,
                       "email")
        assert_problem(await client.get("/v1/suppressions/check", params={"email": unique_email()}), 401)

    async def test_a_phone_no_record_can_hold_is_not_suppressed_and_nothing_to_release(
        self, client: httpx.AsyncClient
    ) -> None:
        # A lookup, not a write: the answer for text that is not a valid number is the one for any number that is
        # not suppressed (docs/decisions.md); writes keep refusing it.
        proof = {"ip": "192.0.2.10", "wording": "Please add me back"}
        for phone in ("hello", "0", "+33 6 12 34 56 7"):
            assert not await suppressed(client, phone=phone)
            missing = await client.post("/v1/suppressions/release", json={"phone": phone, "proof": proof},
                                        headers=ADMIN)
            assert assert_problem(missing, 404)["type"].endswith("/suppression-not-found")
        person = await build_person(client)
        assert (await erase(client, person.id)).status_code == 204
        released = await client.post("/v1/suppressions/release", headers=ADMIN,
                                     json={"email": person.email, "phone": "hello", "proof": proof})
        assert released.status_code == 200 and released.json() == {"released": ["email"]}
        for blank in ("", " "):  # the contract's pattern: never blank, no control characters
            assert_problem(await client.get("/v1/suppressions/check", params={"phone": blank}, headers=ADMIN),
                           422, "phone")
        assert_problem(await client.get("/v1/suppressions/check", params={"phone": "06\x0012"}, headers=ADMIN),
                       422, "phone")

    async def test_a_number_stored_when_it_was_valid_stays_suppressed_and_releasable(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        # libphonenumber's metadata changes between versions: a number erased under older metadata is still looked
        # up by its E.164 form (here a digit short, as if a numbering plan had grown since).
        contact = await make_contact(client)
        async with sessions() as session, session.begin():
            await session.execute(text("UPDATE contact SET phone = '+3361234567' WHERE id = :id"),
                                  {"id": contact["id"]})
        assert (await erase(client, contact["id"])).status_code == 204
        # Written internationally (as the API gives it back): nationally, libphonenumber keeps the 0 of a number
        # its current plan does not know (+33061234567).
        assert await suppressed(client, phone="+33 6 12 34 56 7")
        released = await client.post("/v1/suppressions/release", headers=ADMIN, json={
            "phone": "+33 6 12 34 56 7", "proof": {"ip": "192.0.2.10", "wording": "Please add me back"}})
        assert released.status_code == 200 and released.json() == {"released": ["phone"]}
        assert not await suppressed(client, phone="+3361234567")
        refused = await client.post("/v1/contacts", json={"phone": "+3361234567"}, headers=ADMIN)
        assert_problem(refused, 422, "phone")  # a write still judges the number

    async def test_an_erased_person_is_never_recreated_by_accident(self, client: httpx.AsyncClient) -> None:
        person = await build_person(client)
        other = await make_contact(client)
        assert (await erase(client, person.id)).status_code == 204
        attempts = [
            await client.post("/v1/contacts", json={"email": person.email}, headers=ADMIN),
            await client.post("/v1/contacts", json={"phone": person.phone, "first_name": "X"}, headers=ADMIN),
            await client.post("/v1/contacts/upsert", json={"email": person.email, "external_id": "E-1"},
                              headers=ADMIN),
            await client.put("/v1/orders/AFTER-ERASURE", headers=ADMIN, json={
                "contact": {"email": person.email}, "placed_at": "2026-06-01T10:00:00Z", "status": "paid",
                "currency": "EUR", "total_amount": "10.00"}),
            await client.post("/v1/events", headers=ADMIN, json={
                "contact": {"email": person.email}, "type": "page_view", "occurred_at": "2026-06-01T10:00:00Z"}),
            await client.patch(f"/v1/contacts/{other['id']}", json={"email": person.email}, headers=ADMIN),
        ]
        for response in attempts:
            body = assert_problem(response, 409)
            assert body["type"].endswith("/suppressed-contact") and "erased" in body["detail"]
            assert person.email not in response.text and person.phone not in response.text
        batch = await client.post("/v1/contacts/batch", json={"items": [{"email": person.email}]}, headers=ADMIN)
        assert batch.json()["results"][0]["error"]["type"].endswith("/suppressed-contact")

    async def test_release_then_create_works(self, client: httpx.AsyncClient,
                                             sessions: async_sessionmaker[AsyncSession]) -> None:
        person = await build_person(client)
        assert (await erase(client, person.id)).status_code == 204
        body = {"email": person.email, "proof": {"ip": "192.0.2.10", "wording": "Please add me back"}}
        denied = await client.post("/v1/suppressions/release", json=body, headers=bearer(Role.MANAGER))
        assert assert_problem(denied, 403)["missing_scopes"] == ["contacts:erase"]
        assert_problem(await client.post("/v1/suppressions/release", json={"email": person.email}, headers=ADMIN),
                       422, "proof")
        released = await client.post("/v1/suppressions/release", json=body, headers=bearer(subject="dpo@shop.example"))
        assert released.status_code == 200, released.text
        assert released.json() == {"released": ["email"]}
        assert_problem(await client.post("/v1/suppressions/release", json=body, headers=ADMIN), 404)
        assert not await suppressed(client, email=person.email)
        assert await suppressed(client, phone=person.phone)  # only what was released comes back
        refused = await client.post("/v1/contacts", json={"email": person.email, "phone": person.phone},
                                    headers=ADMIN)
        assert assert_problem(refused, 409)["suppressed"] == ["phone"]
        created = await client.post("/v1/contacts", json={"email": person.email}, headers=ADMIN)
        assert created.status_code == 201, created.text
        async with sessions() as session:
            why = (await session.execute(text(
                "SELECT released_by, release_proof FROM suppression WHERE released_at IS NOT NULL"))).all()
        assert ("dpo@shop.example", {"ip": "192.0.2.10", "wording": "Please add me back"}) in [tuple(r) for r in why]
        # Erased again: suppressed again.
        assert (await erase(client, created.json()["id"])).status_code == 204
        assert await suppressed(client, email=person.email)


# ---- retention ----------------------------------------------------------------------------------------------


async def _age(sessions: async_sessionmaker[AsyncSession], contact_id: str, days: int,
               last_activity_at: datetime | None = None) -> None:
    """Move a contact back in time (created and last updated `days` ago)."""
    async with sessions() as session, session.begin():
        await session.execute(text(
            "UPDATE contact SET created_at = :at, updated_at = :at, last_activity_at = :activity WHERE id = :id"
        ), {"at": datetime.now(UTC) - timedelta(days=days), "activity": last_activity_at, "id": contact_id})


class TestRetention:
    async def test_dry_run_lists_exactly_what_the_real_run_erases(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        stale = await make_contact(client, first_name="Stale")
        stale_too = await make_contact(client, phone="+33612345670")
        recent = await make_contact(client)
        customer = await make_contact(client, kind="customer")
        consented = await make_contact(client)
        active = await make_contact(client)
        await client.post(f"/v1/contacts/{consented['id']}/consents", headers=ADMIN,
                          json={"purpose": "email_marketing", "action": "granted", "proof": PROOF})
        for contact in (stale, stale_too, customer, consented):
            await _age(sessions, contact["id"], 1200)
        await _age(sessions, active["id"], 1200, last_activity_at=datetime.now(UTC) - timedelta(days=30))
        await _age(sessions, recent["id"], 1000)
        mine = {c["id"] for c in (stale, stale_too, recent, customer, consented, active)}

        dry = await client.post("/v1/retention/run", json={"dry_run": True}, headers=ADMIN)
        assert dry.status_code == 200, dry.text
        report = dry.json()
        assert report["dry_run"] is True and report["retention_days"] == 1095
        assert set(report["contact_ids"]) & mine == {stale["id"], stale_too["id"]}
        assert report["erased"] == len(report["contact_ids"]) and report["contact_ids_truncated"] is False
        assert (await client.get(f"/v1/contacts/{stale['id']}", headers=ADMIN)).status_code == 200

        real = (await client.post("/v1/retention/run", json={"dry_run": False}, headers=ADMIN)).json()
        assert real["dry_run"] is False and real["contact_ids"] == report["contact_ids"]
        assert real["erased"] == report["erased"]
        assert_problem(await client.get(f"/v1/contacts/{stale['id']}", headers=ADMIN), 404)
        for kept in (recent, customer, consented, active):
            assert (await client.get(f"/v1/contacts/{kept['id']}", headers=ADMIN)).status_code == 200
        assert await suppressed(client, email=stale["email"]) and await suppressed(client, phone="+33612345670")
        async with sessions() as session:
            reasons = set((await session.execute(text("SELECT DISTINCT reason FROM suppression"))).scalars())
        assert reasons == {"retention"}
        again = (await client.post("/v1/retention/run", json={"dry_run": True}, headers=ADMIN)).json()
        assert not set(again["contact_ids"]) & mine

    async def test_a_large_run_answers_its_count_and_a_bounded_list_of_ids(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        # The answer held every erased id: a first run over years of prospects answered them all, in one body.
        async with sessions.begin() as session:
            await seed_prospects(session, "bulk", RETENTION_IDS_SHOWN + 200, age_days=1200)
        for dry_run in (True, False):
            answer = await client.post("/v1/retention/run", json={"dry_run": dry_run}, headers=ADMIN)
            assert answer.status_code == 200, answer.text
            report = answer.json()
            assert report["erased"] == RETENTION_IDS_SHOWN + 200 and report["contact_ids_truncated"] is True
            assert len(report["contact_ids"]) == RETENTION_IDS_SHOWN
            assert report["contact_ids"] == sorted(report["contact_ids"], key=uuid.UUID)  # the first ones, by id
        small = (await client.post("/v1/retention/run", json={"dry_run": True}, headers=ADMIN)).json()
        assert small["erased"] == 0 and small["contact_ids"] == [] and small["contact_ids_truncated"] is False

    async def test_needs_retention_run_and_an_explicit_dry_run(self, client: httpx.AsyncClient) -> None:
        denied = await client.post("/v1/retention/run", json={"dry_run": True}, headers=bearer(Role.MANAGER))
        assert assert_problem(denied, 403)["missing_scopes"] == ["retention:run"]
        assert_problem(await client.post("/v1/retention/run", json={}, headers=ADMIN), 422, "dry_run")


def test_cli_retention_dry_run(tmp_path: Path, database_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "JWT_SECRET"}}
    env.update(PYTHONPATH=str(ROOT), DATABASE_URL=database_url, JWT_SECRET="cli-secret-" + "z" * 40)
    result = subprocess.run(
        [sys.executable, "-m", "app", "retention", "--dry-run"], capture_output=True, text=True, env=env,
        cwd=tmp_path, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "would be erased (dry run)" in result.stderr
    assert all(uuid.UUID(line) for line in result.stdout.split())  # stdout: the ids alone, for scripts


async def test_stored_idempotent_responses_are_deleted_once_they_cannot_be_replayed(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    """A create's stored response names the person; after KEEP_FOR (24 h) nothing can replay it, so it goes."""
    tag = uuid.uuid4().hex[:8]
    for key in (f"old-{tag}", f"new-{tag}"):
        created = await client.post("/v1/contacts", headers={**ADMIN, "Idempotency-Key": key},
                                    json={"email": f"{key}@example.org"})
        assert created.status_code == 201, created.text
    async with sessions.begin() as session:
        await session.execute(text("UPDATE idempotency_record SET created_at = now() - interval '25 hours' "
                                   "WHERE key = :key"), {"key": f"old-{tag}"})
    expiry = IdempotencyExpiry()

    assert await expiry(sessions, settings) is False      # less than a batch: done until the next interval

    async with sessions() as session:
        kept = (await session.execute(text("SELECT key FROM idempotency_record WHERE key LIKE :k"),
                                      {"k": f"%-{tag}"})).scalars().all()
    assert kept == [f"new-{tag}"]
