"""What an erasure suppresses (docs/gdpr.md, "What suppression covers"): every email and phone the person held, as
their history says (a former address, a record merged into theirs), and each email's mailbox (Gmail dots, a
`+tag`). Each way a contact is created or given an address refuses or skips them, as for the current address."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.settings import Settings
from tests.csv_samples import build_csv
from tests.factories import ADMIN, make_contact
from tests.routers.test_contacts import assert_problem
from tests.routers.test_gdpr import erase, suppressed
from tests.routers.test_imports import report, run_import
from tests.routers.test_signup import contact_by_email, fresh_limits, public, signup  # noqa: F401  (fixtures)
from tests.sync.test_inbound import FIRED, REMOTE, post_mailchimp, setup


def _tag() -> str:
    return uuid.uuid4().hex[:8]


async def refused_everywhere(client: httpx.AsyncClient, email: str | None = None, phone: str | None = None) -> None:
    """Every API write that would create a contact with these values, or give one them, is a 409."""
    other = await make_contact(client)
    key = {"email": email} if email else {"phone": phone}
    attempts = [
        await client.post("/v1/contacts", json={**key, "first_name": "Again"}, headers=ADMIN),
        await client.patch(f"/v1/contacts/{other['id']}", json=key, headers=ADMIN),
        await client.post("/v1/contacts/upsert", json={**key, "external_id": f"E-{_tag()}"}, headers=ADMIN),
    ]
    if email:
        attempts += [
            await client.post("/v1/contacts/upsert", json={"email": email}, headers=ADMIN),  # the autocommit path
            await client.put(f"/v1/orders/AGAIN-{_tag()}", headers=ADMIN, json={
                "contact": {"email": email}, "placed_at": "2026-06-01T10:00:00Z", "status": "paid",
                "currency": "EUR", "total_amount": "10.00"}),
            await client.post("/v1/events", headers=ADMIN, json={
                "contact": {"email": email}, "type": "page_view", "occurred_at": "2026-06-01T10:00:00Z"}),
        ]
    for response in attempts:
        body = assert_problem(response, 409)
        assert body["type"].endswith("/suppressed-contact"), body
    batch = await client.post("/v1/contacts/batch", json={"items": [{**key, "external_id": f"E-{_tag()}"}]},
                              headers=ADMIN)
    assert batch.json()["results"][0]["error"]["type"].endswith("/suppressed-contact"), batch.text


async def test_a_former_address_and_phone_are_suppressed_too(client: httpx.AsyncClient) -> None:
    tag = _tag()
    old_email, new_email = f"old.{tag}@example.org", f"new.{tag}@example.org"
    contact = await make_contact(client, email=old_email, phone="+33612340001")
    moved = await client.patch(f"/v1/contacts/{contact['id']}", json={"email": new_email, "phone": "+33612340002"},
                               headers=ADMIN)
    assert moved.status_code == 200, moved.text
    assert (await erase(client, contact["id"])).status_code == 204
    for kind, value in (("email", old_email), ("email", new_email), ("phone", "+33612340001"),
                        ("phone", "06 12 34 00 02")):
        assert await suppressed(client, **{kind: value}), (kind, value)
    await refused_everywhere(client, email=old_email)
    await refused_everywhere(client, phone="+33612340001")


async def test_the_addresses_of_a_record_merged_into_theirs_are_suppressed(client: httpx.AsyncClient) -> None:
    tag = _tag()
    survivor = await make_contact(client, email=f"kept.{tag}@example.org")
    duplicate = await make_contact(client, email=f"dup.{tag}@example.net", phone="+33612340003")
    merged = await client.post(f"/v1/contacts/{survivor['id']}/merge", json={"duplicate_id": duplicate["id"]},
                               headers=ADMIN)
    assert merged.status_code == 200, merged.text
    assert (await erase(client, survivor["id"])).status_code == 204
    assert await suppressed(client, email=duplicate["email"])
    await refused_everywhere(client, email=duplicate["email"])
    await refused_everywhere(client, phone="+33612340003")


async def test_another_spelling_of_the_same_mailbox_is_suppressed(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]
) -> None:
    tag = _tag()
    gmail = await make_contact(client, email=f"ada.love.{tag}+shop@gmail.com")
    outlook = await make_contact(client, email=f"bob.{tag}+promo@outlook.fr")
    plain = await make_contact(client, email=f"carl.{tag}+x@example.org")
    for contact in (gmail, outlook, plain):
        assert (await erase(client, contact["id"])).status_code == 204
    for variant in (f"adalove{tag}@gmail.com", f"Ada.Love.{tag}@googlemail.com", f"a.d.a.l.o.v.e{tag}+news@gmail.com",
                    f"bob.{tag}@outlook.fr", f"bob.{tag}+other@outlook.fr"):
        assert await suppressed(client, email=variant), variant
        await refused_everywhere(client, email=variant)
    # Another domain's `+tag` may reach another mailbox: only the exact address is suppressed there.
    assert not await suppressed(client, email=f"carl.{tag}@example.org")
    assert (await client.post("/v1/contacts", json={"email": f"carl.{tag}@example.org"},
                              headers=ADMIN)).status_code == 201
    # Still hashes: no entry holds an address, the mailbox's included.
    async with sessions() as session:
        stored = await session.scalar(text("SELECT count(*) FROM suppression WHERE digest ILIKE :a OR digest ILIKE :b"),
                                      {"a": f"%{tag}%", "b": "%@%"})
    assert stored == 0
    # The person comes back with that inbox: releasing it lets it in (a new consent still needed for marketing).
    released = await client.post("/v1/suppressions/release", headers=ADMIN, json={
        "email": f"adalove{tag}+back@gmail.com", "proof": {"ip": "192.0.2.10", "wording": "Please add me back"}})
    assert released.status_code == 200 and released.json() == {"released": ["email"]}, released.text
    assert (await client.post("/v1/contacts", json={"email": f"adalove{tag}@gmail.com"},
                              headers=ADMIN)).status_code == 201


async def test_an_import_skips_a_former_address_and_a_mailbox_variant(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    tag = _tag()
    contact = await make_contact(client, email=f"old.{tag}@example.org")
    await client.patch(f"/v1/contacts/{contact['id']}", json={"email": f"z.oe.{tag}@gmail.com"}, headers=ADMIN)
    assert (await erase(client, contact["id"])).status_code == 204
    data = build_csv(["E-mail", "Prénom"], [(f"old.{tag}@example.org", "Old"), (f"zoe{tag}+x@gmail.com", "Variant"),
                                           (f"zoe{tag}+x@gmail.com", "Repeated"), (f"new.{tag}@example.org", "New")])
    job = await run_import(client, sessions, settings, data)
    assert (job["created"], job["skipped"], job["rejected"]) == (1, 2, 1), job
    assert [line["value"] for line in await report(client, job["id"])] == ["", "", ""]  # no address written back
    async with sessions() as session:
        created = (await session.scalars(text("SELECT email FROM contact WHERE email LIKE :t"),
                                         {"t": f"%{tag}%"})).all()
    assert created == [f"new.{tag}@example.org"]


async def test_the_public_signup_does_not_bring_back_a_former_address_or_variant(
    client: httpx.AsyncClient, public: dict[str, Any]  # noqa: F811  (the fixture)
) -> None:
    tag = _tag()
    contact = await make_contact(client, email=f"old.{tag}@example.org")
    await client.patch(f"/v1/contacts/{contact['id']}", json={"email": f"zoe.{tag}@gmail.com"}, headers=ADMIN)
    assert (await erase(client, contact["id"])).status_code == 204
    for email in (f"old.{tag}@example.org", f"Zoe{tag}+news@gmail.com"):
        assert (await signup(client, public["id"], {"email": email, "consent": True})).status_code == 202
        assert await contact_by_email(client, email.lower()) is None, email


async def test_an_inbound_address_change_does_not_bring_back_a_former_address_or_variant(
    client: httpx.AsyncClient,
) -> None:
    tag = _tag()
    erased = await make_contact(client, email=f"old.{tag}@example.org")
    await client.patch(f"/v1/contacts/{erased['id']}", json={"email": f"zoe.{tag}@gmail.com"}, headers=ADMIN)
    assert (await erase(client, erased["id"])).status_code == 204
    destination, secret, person, _ = await setup(client)
    for new in (f"old.{tag}@example.org", f"zoe{tag}+x@gmail.com"):
        form = {"type": "upemail", "fired_at": FIRED, "data[list_id]": REMOTE, "data[new_id]": "51da8c3259",
                "data[new_email]": new, "data[old_email]": person["email"]}
        assert (await post_mailchimp(client, destination, secret, form)).json() == {"received": 1}
        current = (await client.get(f"/v1/contacts/{person['id']}", headers=ADMIN)).json()
        assert current["email"] == person["email"], new


# ---- the customer number (decided 2026-12-08) --------------------------------------------------------------------


async def test_an_import_row_naming_an_erased_person_by_customer_number_only_is_skipped(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    """A back office's file often has no email column: the erased person's customer number (current or former)
    must not bring their name and address back as a new contact."""
    tag = _tag()
    contact = await make_contact(client, email=f"ada.{tag}@example.org", external_id=f"OLD-{tag}")
    moved = await client.patch(f"/v1/contacts/{contact['id']}", json={"external_id": f"C-{tag}"}, headers=ADMIN)
    assert moved.status_code == 200, moved.text
    assert (await erase(client, contact["id"])).status_code == 204
    data = build_csv(["Code client", "Prénom", "Nom", "Ville"], [
        (f"C-{tag}", "Ada", f"Martin{tag}", "Quimper"), (f"OLD-{tag}", "Ada", f"Martin{tag}", "Brest"),
        (f"NEW-{tag}", "Bob", "Dupont", "Paris")])
    job = await run_import(client, sessions, settings, data)
    assert (job["created"], job["skipped"], job["rejected"]) == (1, 2, 0), job
    lines = await report(client, job["id"])
    assert [(line["row"], line["column"], line["value"]) for line in lines] == [
        ("2", "Code client", ""), ("3", "Code client", "")]  # the customer number is not written back either
    assert all("erased" in line["reason"] and "external_id" in line["reason"] for line in lines), lines
    async with sessions() as session:
        again = await session.scalar(text("SELECT count(*) FROM contact WHERE last_name = :n"), {"n": f"Martin{tag}"})
        stored = await session.scalar(text("SELECT count(*) FROM suppression WHERE digest LIKE :t"), {"t": f"%{tag}%"})
    assert (again, stored) == (0, 0)  # not re-created; the suppression list holds no customer number in clear


async def test_every_api_write_refuses_an_erased_customer_number_until_released(client: httpx.AsyncClient) -> None:
    tag = _tag()
    contact = await make_contact(client, email=f"ada.{tag}@example.org", external_id=f"C-{tag}")
    assert (await erase(client, contact["id"])).status_code == 204
    assert await suppressed(client, external_id=f"C-{tag}")
    assert not await suppressed(client, external_id=f"c-{tag}")  # a customer number is compared as it is written
    other = await make_contact(client)
    key = {"external_id": f"C-{tag}"}
    attempts = [
        await client.post("/v1/contacts", json={**key, "first_name": "Again"}, headers=ADMIN),
        await client.post("/v1/contacts/upsert", json={**key, "first_name": "Again"}, headers=ADMIN),  # autocommit
        await client.post("/v1/contacts/upsert", json={**key, "tags": ["vip"]}, headers=ADMIN),  # transactional
        await client.post("/v1/contacts/upsert", json={**key, "email": other["email"]}, headers=ADMIN),  # given
        await client.patch(f"/v1/contacts/{other['id']}", json=key, headers=ADMIN),
    ]
    for response in attempts:
        body = assert_problem(response, 409)
        assert body["type"].endswith("/suppressed-contact") and body["suppressed"] == ["external_id"], body
        assert f"C-{tag}" not in response.text
    batch = await client.post("/v1/contacts/batch", json={"items": [key]}, headers=ADMIN)
    assert batch.json()["results"][0]["error"]["type"].endswith("/suppressed-contact"), batch.text
    # The shop gives the number again, or the person comes back: an explicit, audited release.
    released = await client.post("/v1/suppressions/release", headers=ADMIN, json={
        **key, "proof": {"wording": "customer number reissued"}})
    assert released.status_code == 200 and released.json() == {"released": ["external_id"]}, released.text
    assert (await client.post("/v1/contacts/upsert", json=key, headers=ADMIN)).status_code == 201


async def test_a_live_contact_holding_an_erased_persons_former_customer_number_is_still_updated(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    """The shop moved the person to another number and gave theirs to someone else: erasing the person suppresses
    it (an old file holds it for them), yet the one who holds it now is matched by it as before."""
    tag = _tag()
    person = await make_contact(client, email=f"ada.{tag}@example.org", external_id=f"C-{tag}")
    moved = await client.patch(f"/v1/contacts/{person['id']}", json={"external_id": f"D-{tag}"}, headers=ADMIN)
    assert moved.status_code == 200, moved.text
    holder = await make_contact(client, email=f"bob.{tag}@example.org", external_id=f"C-{tag}")
    assert (await erase(client, person["id"])).status_code == 204
    updated = await client.post("/v1/contacts/upsert", json={"external_id": f"C-{tag}", "first_name": "Bob"},
                                headers=ADMIN)
    assert updated.status_code == 200 and updated.json()["id"] == holder["id"], updated.text
    data = build_csv(["Code client", "Prénom"], [(f"C-{tag}", "Robert"), (f"D-{tag}", "Ada")])
    job = await run_import(client, sessions, settings, data)
    assert (job["updated"], job["skipped"], job["created"]) == (1, 1, 0), job
