"""API → outbox → worker → real adapters → live spec-checking fakes of Mailchimp, Brevo and a webhook receiver.

The remote state the fakes hold must equal Carnet's after every drain, with zero spec violations.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest

from app.worker import Worker
from tests.factories import ADMIN, PROOF, make_contact, make_list
from tests.fakes.brevo import FakeBrevo
from tests.fakes.mailchimp import FakeMailchimp, subscriber_hash
from tests.fakes.server import LiveServer
from tests.fakes.webhook_receiver import FakeWebhookReceiver
from tests.sync.keys import BREVO_KEY, MC_KEY

pytestmark = pytest.mark.committing



async def drain(worker: Worker) -> None:
    async with asyncio.timeout(60):
        await worker.drain()


async def destination(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await client.post("/v1/destinations", json={"name": f"d-{uuid.uuid4().hex[:6]}", **body},
                                 headers=ADMIN)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


async def subscribe(client: httpx.AsyncClient, list_id: str, contact_id: str) -> None:
    response = await client.put(f"/v1/lists/{list_id}/members/{contact_id}", json={"consent": {"proof": PROOF}},
                                headers=ADMIN)
    assert response.status_code in (200, 201), response.text


async def test_mailchimp_follows_carnet(
    committing_client: httpx.AsyncClient, worker: Worker, mailchimp: tuple[FakeMailchimp, LiveServer],
) -> None:
    fake, live = mailchimp
    news, vip = await make_list(committing_client), await make_list(committing_client)
    await destination(committing_client, kind="mailchimp", config={"api_key": MC_KEY, "base_url": live.url},
                      list_mappings=[{"list_id": news["id"], "remote_list_id": "mc-news"},
                                     {"list_id": vip["id"], "remote_list_id": "mc-vip"}],
                      field_mappings={"first_name": "FNAME", "address.city": "CITY"})
    people = [await make_contact(committing_client, first_name=f"P{i}", address={"city": "Lyon"}) for i in range(3)]
    for person in people:
        await subscribe(committing_client, news["id"], person["id"])
    await subscribe(committing_client, vip["id"], people[0]["id"])
    await drain(worker)
    for person in people:
        member = fake.member("mc-news", person["email"])
        assert member is not None and member.status == "subscribed"
        assert member.merge_fields == {"FNAME": person["first_name"], "CITY": "Lyon"}
    assert fake.member("mc-vip", people[0]["email"]).status == "subscribed"  # type: ignore[union-attr]
    assert fake.member("mc-vip", people[1]["email"]) is None

    # Unsubscribing from one list is exactly that at Mailchimp too.
    await committing_client.delete(f"/v1/lists/{news['id']}/members/{people[0]['id']}", headers=ADMIN)
    await committing_client.patch(f"/v1/contacts/{people[1]['id']}", json={"first_name": "Renamed"}, headers=ADMIN)
    await drain(worker)
    assert fake.member("mc-news", people[0]["email"]).status == "unsubscribed"  # type: ignore[union-attr]
    assert fake.member("mc-vip", people[0]["email"]).status == "subscribed"  # type: ignore[union-attr]
    assert fake.member("mc-news", people[1]["email"]).merge_fields["FNAME"] == "Renamed"  # type: ignore[union-attr]

    # Erasure deletes the person permanently from every mapped audience.
    assert (await committing_client.delete(f"/v1/contacts/{people[0]['id']}", headers=ADMIN)).status_code == 204
    await drain(worker)
    assert fake.member("mc-news", people[0]["email"]) is None and fake.member("mc-vip", people[0]["email"]) is None


async def test_brevo_follows_carnet(
    committing_client: httpx.AsyncClient, worker: Worker, brevo: tuple[FakeBrevo, LiveServer],
) -> None:
    fake, live = brevo
    news = await make_list(committing_client)
    await destination(committing_client, kind="brevo", config={"api_key": BREVO_KEY, "base_url": live.url},
                      list_mappings=[{"list_id": news["id"], "remote_list_id": "7"}],
                      field_mappings={"first_name": "FIRSTNAME"})
    people = [await make_contact(committing_client, first_name=f"B{i}") for i in range(3)]
    for person in people:
        await subscribe(committing_client, news["id"], person["id"])
    await drain(worker)
    assert fake.members(7) == {p["email"] for p in people}
    assert fake.by_email(people[0]["email"]).attributes["FIRSTNAME"] == "B0"  # type: ignore[union-attr]

    await committing_client.delete(f"/v1/lists/{news['id']}/members/{people[0]['id']}", headers=ADMIN)
    await committing_client.post(f"/v1/contacts/{people[1]['id']}/consents", headers=ADMIN, json={
        "purpose": "email_marketing", "action": "withdrawn", "source": "preference_center"})
    await drain(worker)
    assert fake.members(7) == {people[2]["email"]}
    assert fake.by_email(people[1]["email"]).email_blacklisted  # type: ignore[union-attr]

    assert (await committing_client.delete(f"/v1/contacts/{people[2]['id']}", headers=ADMIN)).status_code == 204
    await drain(worker)
    assert fake.by_email(people[2]["email"]) is None


async def test_webhook_receives_signed_events_in_order(committing_client: httpx.AsyncClient, worker: Worker) -> None:
    hook = await destination(committing_client, kind="webhook", config={"url": "http://placeholder.invalid/"})
    secret = hook["generated_secrets"]["secret"]
    receiver = FakeWebhookReceiver(secret)
    with LiveServer(receiver) as live:
        # A new URL takes the secret again in the same request (docs/security.md, "Class 1").
        response = await committing_client.patch(f"/v1/destinations/{hook['id']}", headers=ADMIN,
                                                 json={"config": {"url": live.url + "/carnet", "secret": secret}})
        assert response.status_code == 200, response.text
        person = await make_contact(committing_client)
        await committing_client.patch(f"/v1/contacts/{person['id']}", json={"first_name": "Zoé"}, headers=ADMIN)
        await drain(worker)
    topics = [d.payload["type"] for d in receiver.deliveries]
    assert all(d.valid for d in receiver.deliveries), [d.reason for d in receiver.deliveries]
    assert topics == ["contact.created", "contact.updated"]
    assert len({d.id for d in receiver.deliveries}) == 2


async def test_the_worker_runs_imports_beside_deliveries(committing_client: httpx.AsyncClient, worker: Worker) -> None:
    """`carnet worker` (and the worker inside `carnet serve` in embedded mode) picks up queued imports."""
    csv = "Prénom;Nom;E-mail\nChloé;Durand;chloe.durand@shop.example\nMarc;Petit;marc.petit@shop.example\n"
    response = await committing_client.post("/v1/imports", files={"file": ("clients.csv", csv.encode("cp1252"),
                                                                            "text/csv")}, headers=ADMIN)
    assert response.status_code == 202, response.text
    job_url = f"/v1/imports/{response.json()['id']}"
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        async with asyncio.timeout(30):
            while (await committing_client.get(job_url, headers=ADMIN)).json()["status"] not in ("done", "failed"):  # noqa: ASYNC110
                await asyncio.sleep(0.2)
    finally:
        stop.set()
        await running
    job = (await committing_client.get(job_url, headers=ADMIN)).json()
    assert (job["status"], job["created"], job["rejected"]) == ("done", 2, 0)
    found = await committing_client.get("/v1/contacts", params={"email": "chloe.durand@shop.example"}, headers=ADMIN)
    assert found.json()["data"][0]["first_name"] == "Chloé"


async def test_a_merged_away_address_leaves_the_vendors(
    committing_client: httpx.AsyncClient, worker: Worker, mailchimp: tuple[FakeMailchimp, LiveServer],
    brevo: tuple[FakeBrevo, LiveServer],
) -> None:
    """Merge two synced contacts: the duplicate's address no longer gets campaigns (archived at Mailchimp, so
    it may come back; deleted at Brevo); an address the survivor takes over stays where it is."""
    (chimp, chimp_live), (sib, sib_live) = mailchimp, brevo
    client = committing_client
    news = await make_list(client)
    await destination(client, kind="mailchimp", config={"api_key": MC_KEY, "base_url": chimp_live.url},
                      list_mappings=[{"list_id": news["id"], "remote_list_id": "mc-news"}])
    await destination(client, kind="brevo", config={"api_key": BREVO_KEY, "base_url": sib_live.url},
                      list_mappings=[{"list_id": news["id"], "remote_list_id": "7"}])
    survivor, duplicate = await make_contact(client), await make_contact(client)
    no_address = await make_contact(client, email=None, phone="+33612345678")
    taken_over = await make_contact(client)
    for person in (survivor, duplicate, taken_over):
        await subscribe(client, news["id"], person["id"])
    await drain(worker)
    assert chimp.member("mc-news", duplicate["email"]) is not None and sib.by_email(duplicate["email"]) is not None

    for keeper, gone in ((survivor, duplicate), (no_address, taken_over)):
        response = await client.post(f"/v1/contacts/{keeper['id']}/merge", json={"duplicate_id": gone["id"]},
                                     headers=ADMIN)
        assert response.status_code == 200, response.text
    await drain(worker)
    assert chimp.member("mc-news", duplicate["email"]) is None and sib.by_email(duplicate["email"]) is None
    assert ("mc-news", subscriber_hash(duplicate["email"])) in chimp.archived and not chimp.forgotten
    assert chimp.member("mc-news", survivor["email"]).status == "subscribed"  # type: ignore[union-attr]
    # The survivor took the address over: its remote record is the survivor's now, subscribed as before.
    assert chimp.member("mc-news", taken_over["email"]).status == "subscribed"  # type: ignore[union-attr]
    assert sib.members(7) == {survivor["email"], taken_over["email"]}
