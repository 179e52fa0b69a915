"""Class 8: a masked reader learns nothing about a masked value through another route (issue 15, finding 8).

The attack: a viewer (no `pii:read`: emails, phones, names, birth dates and address lines come masked) asks
other questions whose answers depend on those values: an order by last name, which contacts share an email
or a phone, whether an address was erased. Each route the sweep found (docs/security.md, "Class 8") answers
403 naming `pii:read`; those that never depend on a masked value are checked to stay so.
"""

from __future__ import annotations

import httpx
from fastapi import FastAPI

from app.security import Role, Scope
from app.security.masking import PII_FIELDS
from app.services.segments import FIELDS
from tests.auth import bearer
from tests.factories import ADMIN, make_contact, unique_email

VIEWER = bearer(Role.VIEWER, subject="intern@shop.example")
# A manager's token narrowed without pii:read reaches exports and segment writes, masked.
NARROWED = bearer(Role.MANAGER, subject="agency@shop.example", scopes={
    Scope.CONTACTS_READ, Scope.SEGMENTS_READ, Scope.SEGMENTS_WRITE, Scope.EXPORTS_READ, Scope.LISTS_READ})


def _denied_for_pii(response: httpx.Response) -> None:
    assert response.status_code == 403, response.text
    body = response.json()
    assert body["missing_scopes"] == ["pii:read"], body


async def test_a_viewer_cannot_sort_by_a_masked_field(client: httpx.AsyncClient) -> None:
    for name in ("Zola", "Aubert", "Martin"):
        await make_contact(client, last_name=name)
    for sort in ("last_name", "-last_name"):
        _denied_for_pii(await client.get("/v1/contacts", params={"sort": sort}, headers=VIEWER))
        ordered = await client.get("/v1/contacts", params={"sort": sort}, headers=ADMIN)
        assert ordered.status_code == 200
    for sort in ("created_at", "-updated_at", "last_order_at"):  # orders of values a viewer sees
        assert (await client.get("/v1/contacts", params={"sort": sort}, headers=VIEWER)).status_code == 200


async def test_a_viewer_cannot_learn_which_contacts_share_an_email_or_a_phone(client: httpx.AsyncClient) -> None:
    await make_contact(client, email="jean.dupont+shop@gmail.com", phone="06 12 34 56 78")
    await make_contact(client, email="jeandupont@googlemail.com", phone="+33 6 12 34 56 78")
    _denied_for_pii(await client.get("/v1/contacts/duplicates", headers=VIEWER))
    _denied_for_pii(await client.get("/v1/contacts/duplicates", params={"reason": "phone"}, headers=VIEWER))
    answer = await client.get("/v1/contacts/duplicates", headers=ADMIN)
    assert answer.status_code == 200 and answer.json()["data"][0]["reasons"] == ["email", "phone"]


async def test_a_viewer_cannot_ask_whether_an_address_was_erased(client: httpx.AsyncClient) -> None:
    email = unique_email()
    person = await make_contact(client, email=email, phone="+33612345679")
    assert (await client.delete(f"/v1/contacts/{person['id']}", headers=ADMIN)).status_code == 204
    for probe in ({"email": email}, {"phone": "+33612345679"}, {"email": unique_email()}):
        _denied_for_pii(await client.get("/v1/suppressions/check", params=probe, headers=VIEWER))
    assert (await client.get("/v1/suppressions/check", params={"email": email}, headers=ADMIN)).json() == {
        "suppressed": True}


async def test_the_searches_the_sweep_kept_closed_stay_closed(client: httpx.AsyncClient) -> None:
    person = await make_contact(client, first_name="Claire", last_name="Martin", phone="+33612345670")
    for probe in ({"q": "Martin"}, {"q": "+33612345670"}, {"email": person["email"]}):
        _denied_for_pii(await client.get("/v1/contacts", params=probe, headers=VIEWER))


async def test_no_segment_can_filter_on_a_masked_field(client: httpx.AsyncClient) -> None:
    """Segments are readable (count, members, preview, `?segment=`, exports) by masked tokens: their grammar must
    never name a masked field, or a count would answer "how many are called Martin?"."""
    assert not set(FIELDS) & PII_FIELDS
    await make_contact(client, last_name="Martin")
    for field in sorted(PII_FIELDS):
        condition = {"field": field, "op": "eq", "value": "Martin"}
        for headers in (VIEWER, NARROWED):
            preview = await client.post("/v1/segments/preview", json={"filter": condition}, headers=headers)
            assert preview.status_code == 422, preview.text
            assert preview.json()["errors"][0]["field"] == "filter.field"
        saved = await client.post("/v1/segments", json={"name": f"by {field}", "filter": condition},
                                  headers=NARROWED)
        assert saved.status_code == 422, saved.text


async def test_a_journal_reader_without_pii_read_cannot_look_people_up_by_address(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    """`GET /v1/journal?email=` (or `phone=`) finds the entries of whoever holds, or held, that address: its
    answer says whether the address is in the file, or was erased, and under which contact id. That is the
    suppression check's and `?email=`'s question: a token narrowed to journal:read without pii:read is refused it
    (filters by contact id, subject, token and dates stay open)."""
    email = unique_email()
    person = await make_contact(client, email=email, phone="+33612345671")
    assert (await client.get(f"/v1/contacts/{person['id']}", headers=ADMIN)).status_code == 200  # journaled
    await app.state.journal.flush(app.state.sessionmaker)
    auditor = bearer(Role.ADMIN, subject="auditor@shop.example", scopes={Scope.JOURNAL_READ})
    for probe in ({"email": email}, {"phone": "+33612345671"}, {"email": unique_email(), "contact_id": person["id"]}):
        _denied_for_pii(await client.get("/v1/journal", params=probe, headers=auditor))
    assert (await client.get("/v1/journal", params={"contact_id": person["id"]}, headers=auditor)).status_code == 200
    found = await client.get("/v1/journal", params={"email": email}, headers=ADMIN)  # what the lookup tells
    assert found.status_code == 200 and person["id"] in found.json()["data"][-1]["contact_ids"], found.text
