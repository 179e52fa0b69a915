"""Erasure reaches the emailing tools: after an erasure and a drain, no vendor keeps the person (API.md: a
permanent delete there) and nothing in Carnet remembers them (sync links, retired records, delivery text). Each
test guards a path by which the person could survive (docs/sync.md "Erasure"); see tests/routers/test_gdpr_sweep.py
for the sweep itself.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from app.worker import Worker
from tests.factories import ADMIN, make_contact, make_list
from tests.fakes.brevo import FakeBrevo
from tests.fakes.mailchimp import FakeMailchimp, Member
from tests.fakes.server import LiveServer
from tests.fakes.webhook_receiver import FakeWebhookReceiver
from tests.routers.test_gdpr import erase
from tests.routers.test_gdpr_sweep import (
    committed,
    drain,
    logged,
    mailchimp_hash,
    ok,
    proof,
    subscribed_person,
    sweep,
)
from tests.sync.keys import BREVO_KEY, MC_KEY


@pytest.mark.committing
async def test_vendors_and_webhook_forget_them(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, worker: Worker,
    mailchimp: tuple[FakeMailchimp, LiveServer], brevo: tuple[FakeBrevo, LiveServer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Mailchimp, Brevo and a webhook receiver all hear of the person; after erasure and a drain: no sync_link, no
    delivery text, nothing at either vendor, only ids sent to the webhook, nothing logged."""
    caplog.set_level(logging.DEBUG)
    client = committing_client
    (mc, mc_live), (bv, bv_live) = mailchimp, brevo
    news = await make_list(client)
    receiver = FakeWebhookReceiver("whsec_" + "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=")
    with LiveServer(receiver) as hook_live:
        for body in (
            {"kind": "mailchimp", "config": {"api_key": MC_KEY, "base_url": mc_live.url},
             "list_mappings": [{"list_id": news["id"], "remote_list_id": "mc-news"}],
             "field_mappings": {"first_name": "FNAME", "last_name": "LNAME", "phone": "PHONE"}},
            {"kind": "brevo", "config": {"api_key": BREVO_KEY, "base_url": bv_live.url},
             "list_mappings": [{"list_id": news["id"], "remote_list_id": "7"}],
             "field_mappings": {"first_name": "PRENOM", "last_name": "NOM", "phone": "SMS"}},
            {"kind": "webhook", "config": {"url": hook_live.url, "secret": receiver.secrets[0]}},
        ):
            await ok(await client.post("/v1/destinations", json={"name": f"d-{uuid.uuid4().hex[:6]}", **body},
                                       headers=ADMIN), 201)
        person = await subscribed_person(client, news["id"])
        await drain(worker)
        assert mc.member("mc-news", person.email) is not None and bv.by_email(person.email) is not None
        sessions = committed(engine)
        person.extra.append(mailchimp_hash(person.email))
        assert "sync_link.remote_ref" in await sweep(sessions, person.needles)

        assert (await erase(client, person.id)).status_code == 204
        await drain(worker)

        assert await sweep(sessions, person.needles) == {}
        assert mc.member("mc-news", person.email) is None and bv.by_email(person.email) is None
        sent = [d.body.decode() for d in receiver.deliveries]
        assert any('"contact.erased"' in body for body in sent)
        assert not [n for n in person.needles for body in sent if n.lower() in body.lower()]
    assert logged(caplog, person.needles) == []


@pytest.mark.committing
async def test_erased_while_a_destination_is_disabled(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, worker: Worker,
    mailchimp: tuple[FakeMailchimp, LiveServer],
) -> None:
    # Guards: sync_link.remote_ref = md5(email), an unkeyed hash of the address (Mailchimp's subscriber hash: anyone
    # with a list of addresses reverses it), and the member itself at Mailchimp. An erasure makes its delivery for
    # a destination disabled at the time too; the delivery waits there and goes out once the destination is
    # enabled again, and the link is forgotten only after the vendor confirmed (API.md: "permanent delete there").
    client = committing_client
    mc, mc_live = mailchimp
    news = await make_list(client)
    destination = await mailchimp_destination(client, mc_live, news["id"])
    person = await subscribed_person(client, news["id"])
    await drain(worker)
    assert mc.member("mc-news", person.email) is not None
    await ok(await client.patch(f"/v1/destinations/{destination['id']}", json={"enabled": False}, headers=ADMIN))

    assert (await erase(client, person.id)).status_code == 204
    await drain(worker)
    await ok(await client.patch(f"/v1/destinations/{destination['id']}", json={"enabled": True}, headers=ADMIN))
    await drain(worker)

    person.extra.append(mailchimp_hash(person.email))
    assert await sweep(committed(engine), person.needles) == {}
    assert mc.member("mc-news", person.email) is None


@pytest.mark.committing
async def test_vendors_forget_a_former_address(
    committing_client: httpx.AsyncClient, worker: Worker,
    mailchimp: tuple[FakeMailchimp, LiveServer], brevo: tuple[FakeBrevo, LiveServer],
) -> None:
    # Guards: at Mailchimp and Brevo, the person's record under their FORMER address, with their name. An address
    # changed in Carnet moves the remote record the link names (Mailchimp: PATCH of the member whose hash is the
    # link's, Brevo: update by contact id with the new EMAIL) instead of making a second one, so erasure deletes the
    # one record there is (and the old address no longer gets campaigns).
    client = committing_client
    (mc, mc_live), (bv, bv_live) = mailchimp, brevo
    news = await make_list(client)
    await both_vendors(client, mc_live, bv_live, news["id"], names=True)
    person = await subscribed_person(client, news["id"])
    old = person.email
    await drain(worker)
    assert mc.member("mc-news", old) is not None and bv.by_email(old) is not None
    await ok(await client.patch(f"/v1/contacts/{person.id}", json={"email": f"new.{person.tag}@example.org"},
                                headers=ADMIN))
    await drain(worker)

    assert (await erase(client, person.id)).status_code == 204
    await drain(worker)

    assert (mc.member("mc-news", old), bv.by_email(old)) == (None, None)


@pytest.mark.committing
async def test_an_address_removed_in_carnet_leaves_both_vendors_and_the_erasure_deletes_it_for_good(
    committing_client: httpx.AsyncClient, worker: Worker,
    mailchimp: tuple[FakeMailchimp, LiveServer], brevo: tuple[FakeBrevo, LiveServer],
) -> None:
    # Guards: the vendors' record of an address the shop removed (PATCH email: null, the phone stays). It was left
    # subscribed there; now Mailchimp archives the member (kept as a retired record, so that the person's erasure
    # deletes it permanently) and Brevo deletes the contact, as for an address a merge retires.
    client = committing_client
    (mc, mc_live), (bv, bv_live) = mailchimp, brevo
    news = await make_list(client)
    await both_vendors(client, mc_live, bv_live, news["id"])
    person = await subscribed_person(client, news["id"])
    old = person.email
    await drain(worker)
    assert mc.member("mc-news", old) is not None and bv.by_email(old) is not None
    await ok(await client.patch(f"/v1/contacts/{person.id}", json={"email": None, "phone": "+33612345678"},
                                headers=ADMIN))
    await drain(worker)
    assert ("mc-news", mailchimp_hash(old)) in mc.archived and bv.by_email(old) is None

    assert (await erase(client, person.id)).status_code == 204
    await drain(worker)
    assert ("mc-news", mailchimp_hash(old)) in mc.forgotten, "archived, not deleted permanently"


@pytest.mark.committing
async def test_vendor_forgets_the_address_of_a_record_merged_into_theirs(
    committing_client: httpx.AsyncClient, worker: Worker,
    mailchimp: tuple[FakeMailchimp, LiveServer],
) -> None:
    # Guards: at Mailchimp, the archived member of the merged-away address. A merge retires the duplicate's address
    # by ARCHIVING its member (kept by Mailchimp, restorable), so that the address can come back; Carnet remembers it
    # as a retired record (sync_retired_ref) and the survivor's erasure deletes it permanently too (API.md: erasure =
    # "permanent delete there").
    client = committing_client
    mc, mc_live = mailchimp
    news = await make_list(client)
    await mailchimp_destination(client, mc_live, news["id"])
    person = await subscribed_person(client, news["id"])
    second = await make_contact(client, email=f"y.kervella.{person.tag}@example.net", last_name=person.last_name)
    await ok(await client.put(f"/v1/lists/{news['id']}/members/{second['id']}", headers=ADMIN,
                              json={"consent": {"proof": proof(person)}}))
    await drain(worker)
    await ok(await client.post(f"/v1/contacts/{person.id}/merge", json={"duplicate_id": second["id"]},
                               headers=ADMIN))
    await drain(worker)

    assert (await erase(client, person.id)).status_code == 204
    await drain(worker)

    gone = {("mc-news", mailchimp_hash(person.email)), ("mc-news", mailchimp_hash(second["email"]))}
    assert mc.forgotten >= gone, "archived, not deleted: " + str(mc.archived & gone)


async def both_vendors(client: httpx.AsyncClient, mc_live: LiveServer, bv_live: LiveServer, list_id: str, *,
                       names: bool = False) -> None:
    """Destinations syncing `list_id` to the Mailchimp fake's `mc-news` and the Brevo fake's list 7 (with the last
    name, when `names`)."""
    for body in ({"kind": "mailchimp", "config": {"api_key": MC_KEY, "base_url": mc_live.url},
                  "list_mappings": [{"list_id": list_id, "remote_list_id": "mc-news"}],
                  **({"field_mappings": {"last_name": "LNAME"}} if names else {})},
                 {"kind": "brevo", "config": {"api_key": BREVO_KEY, "base_url": bv_live.url},
                  "list_mappings": [{"list_id": list_id, "remote_list_id": "7"}],
                  **({"field_mappings": {"last_name": "NOM"}} if names else {})}):
        await ok(await client.post("/v1/destinations", json={"name": f"d-{uuid.uuid4().hex[:6]}", **body},
                                   headers=ADMIN), 201)


async def mailchimp_destination(
    client: httpx.AsyncClient, live: LiveServer, list_id: str, *, fields: dict[str, str] | None = None
) -> dict[str, Any]:
    """A Mailchimp destination syncing `list_id` to the audience `mc-news` of the fake."""
    return await ok(await client.post("/v1/destinations", headers=ADMIN, json={
        "name": f"d-{uuid.uuid4().hex[:6]}", "kind": "mailchimp",
        "config": {"api_key": MC_KEY, "base_url": live.url},
        "list_mappings": [{"list_id": list_id, "remote_list_id": "mc-news"}],
        **({"field_mappings": fields} if fields else {})}), 201)


def deleted_permanently(mc: FakeMailchimp) -> list[str]:
    """Subscriber hashes Carnet asked Mailchimp to delete permanently (whatever the fake could find)."""
    return [s.path.split("/")[-3] for s in mc.seen if s.operation == "postListsIdMembersHashActionsDeletePermanent"]


@pytest.mark.committing
async def test_a_destination_that_still_holds_erased_people_cannot_be_deleted(
    committing_client: httpx.AsyncClient, worker: Worker, mailchimp: tuple[FakeMailchimp, LiveServer],
) -> None:
    """Deleting it would drop the only references by which they can be deleted there (docs/sync.md)."""
    client = committing_client
    mc, mc_live = mailchimp
    news = await make_list(client)
    destination = await mailchimp_destination(client, mc_live, news["id"], fields={"last_name": "LNAME"})
    person = await subscribed_person(client, news["id"])
    await drain(worker)
    await ok(await client.patch(f"/v1/destinations/{destination['id']}", json={"enabled": False}, headers=ADMIN))
    assert (await erase(client, person.id)).status_code == 204
    await drain(worker)

    refused = await client.delete(f"/v1/destinations/{destination['id']}", headers=ADMIN)
    assert refused.status_code == 409, refused.text
    assert refused.json()["type"].endswith("/destination-owes-erasures") and refused.json()["erasures_owed"] == 1

    await ok(await client.patch(f"/v1/destinations/{destination['id']}", json={"enabled": True}, headers=ADMIN))
    await drain(worker)
    assert mc.member("mc-news", person.email) is None
    assert (await client.delete(f"/v1/destinations/{destination['id']}", headers=ADMIN)).status_code == 204


@pytest.mark.committing
async def test_a_dead_erasure_stays_visible_and_a_resync_delivers_it(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, worker: Worker,
    mailchimp: tuple[FakeMailchimp, LiveServer],
) -> None:
    client = committing_client
    mc, mc_live = mailchimp
    news = await make_list(client)
    destination = await mailchimp_destination(client, mc_live, news["id"], fields={"last_name": "LNAME"})
    person = await subscribed_person(client, news["id"])
    await drain(worker)
    assert (await erase(client, person.id)).status_code == 204
    mc.force(400)  # a permanent refusal of the delete: a dead letter at once
    await drain(worker)

    shown = await ok(await client.get(f"/v1/destinations/{destination['id']}", headers=ADMIN))
    assert shown["health"]["dead"] == 1
    [dead] = (await ok(await client.get(f"/v1/destinations/{destination['id']}/deliveries",
                                        params={"status": "dead"}, headers=ADMIN)))["data"]
    assert dead["topic"] == "contact.erased"
    assert mc.member("mc-news", person.email) is not None   # the link stays: it is how the person is reached

    await ok(await client.post(f"/v1/destinations/{destination['id']}/resync", headers=ADMIN), 200, 202)
    await drain(worker)
    assert mc.member("mc-news", person.email) is None
    person.extra.append(mailchimp_hash(person.email))
    assert await sweep(committed(engine), person.needles) == {}


@pytest.mark.committing
async def test_a_former_address_the_vendor_could_not_move_is_archived_then_deleted_with_the_person(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, worker: Worker,
    mailchimp: tuple[FakeMailchimp, LiveServer],
) -> None:
    """The new address is already a member at Mailchimp ("Member Exists"): that member becomes the person's, the old
    one is archived (no campaign twice) and remembered; the erasure deletes both permanently."""
    client = committing_client
    mc, mc_live = mailchimp
    news = await make_list(client)
    await mailchimp_destination(client, mc_live, news["id"], fields={"last_name": "LNAME"})
    person = await subscribed_person(client, news["id"])
    old, new = person.email, f"new.{person.tag}@example.org"
    await drain(worker)
    mc.lists["mc-news"][mailchimp_hash(new)] = Member(new, "subscribed")   # signed up at Mailchimp on their own
    await ok(await client.patch(f"/v1/contacts/{person.id}", json={"email": new}, headers=ADMIN))
    await drain(worker)
    assert mc.member("mc-news", old) is None and ("mc-news", mailchimp_hash(old)) in mc.archived
    assert mc.member("mc-news", new).merge_fields["LNAME"] == person.last_name  # type: ignore[union-attr]

    assert (await erase(client, person.id)).status_code == 204
    await drain(worker)
    assert set(deleted_permanently(mc)) == {mailchimp_hash(old), mailchimp_hash(new)}
    assert mc.member("mc-news", new) is None
    person.extra += [mailchimp_hash(old), mailchimp_hash(new)]
    assert await sweep(committed(engine), person.needles) == {}


@pytest.mark.committing
async def test_merges_of_merges_are_all_deleted_with_the_person(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, worker: Worker,
    mailchimp: tuple[FakeMailchimp, LiveServer],
) -> None:
    client = committing_client
    mc, mc_live = mailchimp
    news = await make_list(client)
    await mailchimp_destination(client, mc_live, news["id"], fields={"last_name": "LNAME"})
    person = await subscribed_person(client, news["id"])
    others = [await make_contact(client, email=f"{n}.{person.tag}@example.net") for n in ("second", "third")]
    for other in others:
        await ok(await client.put(f"/v1/lists/{news['id']}/members/{other['id']}", headers=ADMIN,
                                  json={"consent": {"proof": proof(person)}}))
    await drain(worker)
    second, third = others
    await ok(await client.post(f"/v1/contacts/{second['id']}/merge", json={"duplicate_id": third["id"]},
                               headers=ADMIN))
    await drain(worker)
    await ok(await client.post(f"/v1/contacts/{person.id}/merge", json={"duplicate_id": second["id"]},
                               headers=ADMIN))
    await drain(worker)
    assert {("mc-news", mailchimp_hash(o["email"])) for o in others} <= mc.archived

    assert (await erase(client, person.id)).status_code == 204
    await drain(worker)
    hashes = {mailchimp_hash(e) for e in (person.email, second["email"], third["email"])}
    assert set(deleted_permanently(mc)) == hashes
    person.extra += sorted(hashes)
    assert await sweep(committed(engine), person.needles) == {}


@pytest.mark.committing
async def test_a_retired_address_that_comes_back_is_not_deleted_with_its_former_owner(
    committing_client: httpx.AsyncClient, worker: Worker, mailchimp: tuple[FakeMailchimp, LiveServer],
) -> None:
    """The archived member of a merged-away address is restored by the push of a new contact with that address:
    it is the new contact's record now, and the first person's erasure leaves it alone."""
    client = committing_client
    mc, mc_live = mailchimp
    news = await make_list(client)
    await mailchimp_destination(client, mc_live, news["id"], fields={"last_name": "LNAME"})
    person = await subscribed_person(client, news["id"])
    second = await make_contact(client, email=f"back.{person.tag}@example.net")
    for contact_id in (person.id, second["id"]):
        await ok(await client.put(f"/v1/lists/{news['id']}/members/{contact_id}", headers=ADMIN,
                                  json={"consent": {"proof": proof(person)}}))
    await drain(worker)
    await ok(await client.post(f"/v1/contacts/{person.id}/merge", json={"duplicate_id": second["id"]},
                               headers=ADMIN))
    await drain(worker)
    newcomer = await make_contact(client, email=second["email"])
    await ok(await client.put(f"/v1/lists/{news['id']}/members/{newcomer['id']}", headers=ADMIN,
                              json={"consent": {"proof": proof(person)}}))
    await drain(worker)
    assert mc.member("mc-news", second["email"]) is not None

    assert (await erase(client, person.id)).status_code == 204
    await drain(worker)
    assert deleted_permanently(mc) == [mailchimp_hash(person.email)]
    assert mc.member("mc-news", second["email"]) is not None


@pytest.mark.committing
async def test_a_webhook_paused_at_the_time_still_hears_of_the_erasure(
    committing_client: httpx.AsyncClient, worker: Worker,
) -> None:
    client = committing_client
    receiver = FakeWebhookReceiver("whsec_" + "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=")
    with LiveServer(receiver) as hook_live:
        hook = await ok(await client.post("/v1/destinations", headers=ADMIN, json={
            "name": f"d-{uuid.uuid4().hex[:6]}", "kind": "webhook",
            "config": {"url": hook_live.url, "secret": receiver.secrets[0], "topics": ["contact.erased"]}}), 201)
        contact = await make_contact(client)
        await ok(await client.patch(f"/v1/destinations/{hook['id']}", json={"enabled": False}, headers=ADMIN))
        assert (await erase(client, contact["id"])).status_code == 204
        await drain(worker)
        assert receiver.deliveries == []
        await ok(await client.patch(f"/v1/destinations/{hook['id']}", json={"enabled": True}, headers=ADMIN))
        await drain(worker)
        assert [f'"contact_id":"{contact["id"]}"' in d.body.decode() for d in receiver.deliveries] == [True]
