"""Segments as a sync source: API → snapshot diff → outbox → worker → spec-checking fakes.

People enter and leave a synced segment with their data, their consent and with time alone; the vendor
follows, and only people whose email_marketing consent is granted are ever sent to it.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.db import make_sessionmaker, plain_dsn
from app.models.base import utc_now
from app.services import segment_sync, segments
from app.worker import Worker
from tests.auth import TEST_SECRET
from tests.concurrency.held import race_past_held_table
from tests.factories import ADMIN, grant_marketing, make_contact, make_list
from tests.fakes.brevo import FakeBrevo
from tests.fakes.mailchimp import FakeMailchimp
from tests.fakes.server import LiveServer
from tests.fakes.webhook_receiver import FakeWebhookReceiver
from tests.routers.test_contacts import assert_problem
from tests.routers.test_segments import make_segment, place_order
from tests.sync.keys import BREVO_KEY, MC_KEY
from tests.sync.test_end_to_end import destination, drain, subscribe

pytestmark = pytest.mark.committing
ROOT = Path(__file__).resolve().parents[2]

VIP = {"all": [{"field": "tags", "op": "contains", "value": "vip"}]}


async def refresh(engine: AsyncEngine, destination_id: str, *, now: Any = None) -> list[segment_sync.Refreshed]:
    """As if SEGMENT_REFRESH_SECONDS had elapsed for this destination: every due snapshot refreshed once."""
    sessions = make_sessionmaker(engine)
    async with sessions.begin() as session:
        await session.execute(text("UPDATE segment_sync SET refreshed_at = NULL WHERE destination_id = :d"),
                              {"d": destination_id})
    done = []
    while True:
        async with sessions.begin() as session:
            refreshed = await segment_sync.refresh_next(session, every_seconds=3600, now=now)
        if refreshed is None:
            return [r for r in done if str(r.destination_id) == destination_id]
        done.append(refreshed)


async def tag(client: httpx.AsyncClient, contact: dict[str, Any], *tags: str) -> None:
    response = await client.patch(f"/v1/contacts/{contact['id']}", json={"tags": list(tags)}, headers=ADMIN)
    assert response.status_code == 200, response.text


async def withdraw(client: httpx.AsyncClient, contact: dict[str, Any]) -> None:
    body = {"purpose": "email_marketing", "action": "withdrawn", "source": "preference_center"}
    response = await client.post(f"/v1/contacts/{contact['id']}/consents", json=body, headers=ADMIN)
    assert response.status_code == 201, response.text


async def test_brevo_list_follows_the_segment_and_the_consent_rule(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, worker: Worker, brevo: tuple[FakeBrevo, LiveServer],
) -> None:
    fake, live = brevo
    client = committing_client
    segment = await make_segment(client, VIP)
    consented, unconsented, outsider = [await make_contact(client, tags=t) for t in (["vip"], ["vip"], [])]
    await grant_marketing(client, consented["id"])
    await grant_marketing(client, outsider["id"])
    sink = await destination(client, kind="brevo", config={"api_key": BREVO_KEY, "base_url": live.url},
                             segment_mappings=[{"segment_id": segment["id"], "remote_list_id": "9"}])

    [first] = await refresh(engine, sink["id"])
    assert (first.members, first.entered, first.left) == (2, 2, 0)
    await drain(worker)
    # The member without consent is not sent at all: a segment never decides who may receive marketing.
    assert fake.members(9) == {consented["email"]}
    assert fake.by_email(unconsented["email"]) is None and fake.by_email(outsider["email"]) is None

    # Nothing changed: the next refresh writes nothing.
    [again] = await refresh(engine, sink["id"])
    assert (again.members, again.entered, again.left) == (2, 0, 0)

    # A grant is enough to send a member who was held back; no refresh needed.
    await grant_marketing(client, unconsented["id"])
    await drain(worker)
    assert fake.members(9) == {consented["email"], unconsented["email"]}

    # Leaving the segment takes the person out of the list, and only out of it.
    await tag(client, consented)
    await tag(client, outsider, "vip")
    [moved] = await refresh(engine, sink["id"])
    assert (moved.members, moved.entered, moved.left) == (2, 1, 1)
    await drain(worker)
    assert fake.members(9) == {unconsented["email"], outsider["email"]}
    assert fake.by_email(consented["email"]) is not None  # still a Brevo contact, just not in the segment's list

    # A withdrawal takes a member out at once (and blacklists the address), before any refresh.
    await withdraw(client, unconsented)
    await drain(worker)
    assert fake.members(9) == {outsider["email"]}
    assert fake.by_email(unconsented["email"]).email_blacklisted  # type: ignore[union-attr]

    shown = (await client.get(f"/v1/destinations/{sink['id']}", headers=ADMIN)).json()
    [mapping] = shown["segment_mappings"]
    assert mapping["segment_id"] == segment["id"] and mapping["remote_list_id"] == "9"
    assert mapping["members"] == 2 and mapping["refreshed_at"] is not None


async def test_unsubscribing_from_a_segment_list_at_brevo_withdraws_marketing(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, worker: Worker, brevo: tuple[FakeBrevo, LiveServer],
) -> None:
    """The segment's list is no subscription: leaving it at Brevo must not be undone by the next push."""
    fake, live = brevo
    client = committing_client
    segment = await make_segment(client, VIP)
    person = await make_contact(client, tags=["vip"])
    await grant_marketing(client, person["id"])
    sink = await destination(client, kind="brevo",
                             config={"api_key": BREVO_KEY, "base_url": live.url, "inbound_secret": "in-" + "s" * 30},
                             segment_mappings=[{"segment_id": segment["id"], "remote_list_id": "9"}])
    await refresh(engine, sink["id"])
    await drain(worker)
    assert fake.members(9) == {person["email"]}

    event = {"event": "unsubscribe", "email": person["email"], "list_id": [9], "camp_id": 3, "ts_event": 1763633100}
    response = await client.post(f"/v1/inbound/brevo/{sink['id']}", json=event,
                                 headers={"Authorization": "Bearer in-" + "s" * 30})
    assert response.status_code == 200 and response.json() == {"received": 1}
    ledger = (await client.get(f"/v1/contacts/{person['id']}/consents", headers=ADMIN)).json()
    assert ledger["state"]["email_marketing"]["granted"] is False
    await client.patch(f"/v1/contacts/{person['id']}", json={"first_name": "Later"}, headers=ADMIN)
    await refresh(engine, sink["id"])
    await drain(worker)
    remote = fake.by_email(person["email"])
    assert remote is not None and remote.email_blacklisted and 9 not in remote.list_ids


async def test_mailchimp_tag_marks_the_segment_in_a_mapped_audience(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, worker: Worker,
    mailchimp: tuple[FakeMailchimp, LiveServer],
) -> None:
    fake, live = mailchimp
    client = committing_client
    news = await make_list(client)
    segment = await make_segment(client, VIP)
    inside = await make_contact(client, tags=["vip", "shoes"])
    not_in_audience = await make_contact(client, tags=["vip"])
    await subscribe(client, news["id"], inside["id"])
    await grant_marketing(client, not_in_audience["id"])
    sink = await destination(client, kind="mailchimp", config={"api_key": MC_KEY, "base_url": live.url},
                             list_mappings=[{"list_id": news["id"], "remote_list_id": "mc-news"}],
                             segment_mappings=[{"segment_id": segment["id"], "remote_list_id": "mc-news",
                                                "tag": "Segment VIP"}])
    await drain(worker)
    [entered] = await refresh(engine, sink["id"])
    assert (entered.members, entered.entered) == (2, 2)
    await drain(worker)
    member = fake.member("mc-news", inside["email"])
    assert member is not None and member.status == "subscribed"
    assert member.tags == {"vip", "shoes", "Segment VIP"}
    # Tags live on audience members: the segment never adds someone to an audience.
    assert fake.member("mc-news", not_in_audience["email"]) is None

    await tag(client, inside, "shoes")
    await refresh(engine, sink["id"])
    await drain(worker)
    member = fake.member("mc-news", inside["email"])
    assert member is not None and member.tags == {"shoes"} and member.status == "subscribed"


async def test_webhook_gets_entered_and_left_events_of_its_segments_only(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, worker: Worker,
) -> None:
    client = committing_client
    segment = await make_segment(client, VIP)
    person = await make_contact(client, tags=["vip"])
    mapped = await destination(client, kind="webhook", config={"url": "http://placeholder.invalid/"},
                               segment_mappings=[{"segment_id": segment["id"]}])
    unmapped = await destination(client, kind="webhook", config={"url": "http://placeholder.invalid/"})
    receivers = [FakeWebhookReceiver(mapped["generated_secrets"]["secret"]),
                 FakeWebhookReceiver(unmapped["generated_secrets"]["secret"])]
    with LiveServer(receivers[0]) as first, LiveServer(receivers[1]) as second:
        for hook, live in ((mapped, first), (unmapped, second)):
            # A new URL takes the secret again in the same request (docs/security.md, "Class 1").
            config = {"url": live.url, "secret": hook["generated_secrets"]["secret"]}
            response = await client.patch(f"/v1/destinations/{hook['id']}", json={"config": config}, headers=ADMIN)
            assert response.status_code == 200, response.text
        await refresh(engine, mapped["id"])
        await drain(worker)
        await tag(client, person)
        await refresh(engine, mapped["id"])
        await drain(worker)
    events = [d.payload for r in receivers for d in r.deliveries if d.payload["type"].startswith("segment.")]
    assert all(d.valid for r in receivers for d in r.deliveries)
    assert [e["type"] for e in events] == ["segment.entered", "segment.left"]  # the unmapped receiver got none
    assert all({k: v for k, v in e["data"].items() if k != "preferences_url"} == {
        "segment_id": segment["id"], "destination_id": mapped["id"], "contact_id": person["id"]} for e in events)
    assert all("/v1/public/preferences/" in e["data"]["preferences_url"] for e in events)  # ids, and the link


async def live_webhook(client: httpx.AsyncClient, url: str, **body: Any) -> tuple[dict[str, Any], str]:
    """A webhook destination posting to `url` (a new URL takes the secret again: docs/security.md, "Class 1")."""
    hook = await destination(client, kind="webhook", config={"url": "http://placeholder.invalid/"}, **body)
    secret = hook["generated_secrets"]["secret"]
    response = await client.patch(f"/v1/destinations/{hook['id']}", json={"config": {"url": url, "secret": secret}},
                                  headers=ADMIN)
    assert response.status_code == 200, response.text
    return hook, secret


async def test_merged_and_erased_members_leave_their_segments(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, worker: Worker,
) -> None:
    """A member merged away or erased went with its snapshot rows (ON DELETE CASCADE): the receiver never heard
    `segment.left` and kept counting them in the segment (one subscribed to `segment.*` alone never heard of them
    at all). Now each leaves every synced segment it was in, before its `contact.merged` / `contact.erased`; the
    survivor enters where it matches in the merge (it entered only at the next refresh: until then the receiver
    counted the person in no segment at all)."""
    client = committing_client
    segment, other = await make_segment(client, VIP), await make_segment(client, {"any": [
        {"field": "tags", "op": "contains", "value": "vip"}, {"field": "tags", "op": "contains", "value": "gold"}]})
    duplicate, survivor, erased = (await make_contact(client, tags=["vip"]), await make_contact(client),
                                   await make_contact(client, tags=["gold"]))
    receiver = FakeWebhookReceiver()
    with LiveServer(receiver) as live:
        hook, secret = await live_webhook(client, live.url, segment_mappings=[
            {"segment_id": segment["id"]}, {"segment_id": other["id"]}])
        receiver.secrets.append(secret)
        await refresh(engine, hook["id"])
        response = await client.post(f"/v1/contacts/{survivor['id']}/merge", json={"duplicate_id": duplicate["id"]},
                                     headers=ADMIN)
        assert response.status_code == 200, response.text
        assert (await client.delete(f"/v1/contacts/{erased['id']}", headers=ADMIN)).status_code == 204
        await drain(worker)
        heard_before_refresh = len(receiver.deliveries)
        await refresh(engine, hook["id"])  # the survivor now has the duplicate's tags
        await drain(worker)
    assert all(d.valid for d in receiver.deliveries), [d.reason for d in receiver.deliveries]
    told = ("segment.entered", "segment.left", "contact.merged", "contact.erased")
    seen = [(d.payload["type"], d.payload["data"]) for d in receiver.deliveries if d.payload["type"] in told]
    about = {c["id"]: [(t, data.get("segment_id")) for t, data in seen  # contact.merged names the duplicate merged_id
                       if c["id"] == data.get("contact_id", data.get("merged_id"))]
             for c in (duplicate, survivor, erased)}
    entered = [("segment.entered", s) for s in sorted((segment["id"], other["id"]))]
    assert sorted(about[duplicate["id"]][:2]) == entered
    assert sorted(about[duplicate["id"]][2:4]) == [("segment.left", s) for s in sorted((segment["id"], other["id"]))]
    assert about[duplicate["id"]][4:] == [("contact.merged", None)]
    assert about[erased["id"]] == [("segment.entered", other["id"]), ("segment.left", other["id"]),
                                   ("contact.erased", None)]
    assert sorted(about[survivor["id"]]) == entered
    assert all(d.payload["data"].get("contact_id") != survivor["id"]  # in the merge: the refresh had nothing to say
               for d in receiver.deliveries[heard_before_refresh:])
    survivor_entered = [data for t, data in seen if t == "segment.entered" and data["contact_id"] == survivor["id"]]
    assert all(data["reason"] == "merged" and data["merged_id"] == duplicate["id"] for data in survivor_entered)
    left = {(t, data["contact_id"]): data for t, data in seen if t == "segment.left"}
    merged_left, erased_left = left[("segment.left", duplicate["id"])], left[("segment.left", erased["id"])]
    assert merged_left["reason"] == "merged" and merged_left["survivor_id"] == survivor["id"]
    assert erased_left == {  # ids only: no link to a person who is gone
        "segment_id": other["id"], "destination_id": hook["id"], "contact_id": erased["id"], "reason": "erased"}
    async with make_sessionmaker(engine)() as session:
        members = (await session.execute(text(
            "SELECT contact_id::text, count(*) FROM segment_member WHERE destination_id = :d GROUP BY 1"),
            {"d": hook["id"]})).all()
    assert members == [(survivor["id"], 2)]


ACME = {"all": [{"field": "company", "op": "eq", "value": "Acme"}]}
VIP_AND_GOLD = {"all": [{"field": "tags", "op": "contains", "value": "vip"},
                        {"field": "tags", "op": "contains", "value": "gold"}]}


async def merge(client: httpx.AsyncClient, survivor: dict[str, Any], duplicate: dict[str, Any]) -> None:
    response = await client.post(f"/v1/contacts/{survivor['id']}/merge", json={"duplicate_id": duplicate["id"]},
                                 headers=ADMIN)
    assert response.status_code == 200, response.text


async def addressless_pair(client: httpx.AsyncClient) -> tuple[dict[str, Any], dict[str, Any]]:
    """(duplicate, survivor): the duplicate at Acme, gold; the survivor without an address, vip, at Globex (it keeps
    its own company: only empty fields are filled)."""
    duplicate = await make_contact(client, tags=["gold"], company="Acme")
    survivor = await make_contact(client, email=None, external_id=f"shop-{uuid.uuid4().hex[:8]}", tags=["vip"],
                                  company="Globex")
    return duplicate, survivor


async def snapshot(engine: AsyncEngine, destination_id: str) -> dict[str, set[str]]:
    """segment id -> contact ids, as this destination's snapshots hold them now."""
    async with make_sessionmaker(engine)() as session:
        rows = (await session.execute(text(
            "SELECT segment_id::text, contact_id::text FROM segment_member WHERE destination_id = :d"),
            {"d": destination_id})).all()
    found: dict[str, set[str]] = {}
    for segment_id, contact_id in rows:
        found.setdefault(segment_id, set()).add(contact_id)
    return found


async def test_a_merge_moving_the_address_restates_the_survivor_at_brevo(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, worker: Worker, brevo: tuple[FakeBrevo, LiveServer],
) -> None:
    """The survivor (no address) takes the duplicate's: Brevo's contact of that address is the survivor's now. It
    stayed in the list of a segment only the duplicate matched (the duplicate's `segment.left` changed nothing at
    Brevo, and no refresh ever would: the survivor never entered), and was put in the list of a segment the merged
    contact matches only at the next refresh. Now the merge states the survivor's place in every synced segment,
    and the record it took over brings the duplicate's places at that destination with it, so its push says both."""
    fake, live = brevo
    client = committing_client
    acme, vip, both = [await make_segment(client, f) for f in (ACME, VIP, VIP_AND_GOLD)]
    duplicate, survivor = await addressless_pair(client)
    await grant_marketing(client, duplicate["id"])
    sink = await destination(client, kind="brevo", config={"api_key": BREVO_KEY, "base_url": live.url},
                             segment_mappings=[{"segment_id": acme["id"], "remote_list_id": "8"},
                                               {"segment_id": vip["id"], "remote_list_id": "9"},
                                               {"segment_id": both["id"], "remote_list_id": "7"}])
    await refresh(engine, sink["id"])
    await drain(worker)
    address = duplicate["email"]
    assert (fake.members(8), fake.members(9), fake.members(7)) == ({address}, set(), set())

    await merge(client, survivor, duplicate)
    await drain(worker)  # no refresh: what the merge queued alone
    assert (fake.members(8), fake.members(9), fake.members(7)) == (set(), {address}, {address})
    assert await snapshot(engine, sink["id"]) == {vip["id"]: {survivor["id"]}, both["id"]: {survivor["id"]}}

    # The next refresh finds nothing to change: Carnet's snapshots and Brevo agreed already.
    assert [(r.entered, r.left) for r in await refresh(engine, sink["id"])] == [(0, 0)] * 3
    await drain(worker)
    assert (fake.members(8), fake.members(9), fake.members(7)) == (set(), {address}, {address})


async def test_a_refresh_during_such_a_merge_passes_its_snapshots_by(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, worker: Worker, brevo: tuple[FakeBrevo, LiveServer],
    database_url: str,
) -> None:
    """The merge holds the snapshots it restates (FOR SHARE) until it commits; a refresh at that moment takes none
    of them, and does not wait for the merge (waiting could deadlock: a refresh's insert waits for the merged
    contacts). The next refresh finds the merge's word standing."""
    fake, live = brevo
    client = committing_client
    acme, both = await make_segment(client, ACME), await make_segment(client, VIP_AND_GOLD)
    duplicate, survivor = await addressless_pair(client)
    await grant_marketing(client, duplicate["id"])
    sink = await destination(client, kind="brevo", config={"api_key": BREVO_KEY, "base_url": live.url},
                             segment_mappings=[{"segment_id": acme["id"], "remote_list_id": "8"},
                                               {"segment_id": both["id"], "remote_list_id": "7"}])
    await refresh(engine, sink["id"])
    await drain(worker)
    sessions = make_sessionmaker(engine)
    # the merge stops at contact_merge, its snapshots locked (carried); the refresh runs meanwhile
    merged, done = await _merge_racing_a_refresh(client, sessions, database_url, sink, survivor, duplicate)
    assert merged.status_code == 200, merged.text
    assert done is None or str(done.destination_id) != sink["id"]
    await drain(worker)
    assert (fake.members(8), fake.members(7)) == (set(), {duplicate["email"]})
    assert [(r.entered, r.left) for r in await refresh(engine, sink["id"])] == [(0, 0)] * 2


async def test_a_merge_passing_by_a_snapshot_a_refresh_holds_still_takes_the_record_out_of_it(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, worker: Worker, brevo: tuple[FakeBrevo, LiveServer],
) -> None:
    """The other order: a refresh holds the snapshot of a segment only the duplicate matched when the merge runs.
    The merge passed it by (it may not wait for a refresh), so the duplicate's place there was not carried: its
    `segment.left` went to a contact with no record at Brevo any more (its link went to the survivor), and no
    refresh ever took the survivor out of a list it never entered. Brevo's record of the address stayed in the
    segment's list for good, though nobody in Carnet matches it."""
    fake, live = brevo
    client = committing_client
    acme = await make_segment(client, ACME)
    duplicate, survivor = await addressless_pair(client)
    await grant_marketing(client, duplicate["id"])
    sink = await destination(client, kind="brevo", config={"api_key": BREVO_KEY, "base_url": live.url},
                             segment_mappings=[{"segment_id": acme["id"], "remote_list_id": "8"}])
    await refresh(engine, sink["id"])
    await drain(worker)
    address = duplicate["email"]
    assert fake.members(8) == {address}

    sessions = make_sessionmaker(engine)
    async with sessions.begin() as refreshing:  # a refresh holding the snapshot (refresh_next's lock) meanwhile
        await refreshing.execute(text("SELECT 1 FROM segment_sync WHERE destination_id = :d FOR UPDATE"),
                                 {"d": sink["id"]})
        await merge(client, survivor, duplicate)
    assert [(r.entered, r.left) for r in await refresh(engine, sink["id"])] in ([(0, 0)], [(0, 1)])
    await drain(worker)
    assert fake.members(8) == set(), "the address stayed in the list of a segment nobody matches"
    assert [(r.entered, r.left) for r in await refresh(engine, sink["id"])] == [(0, 0)]


async def test_a_merge_moving_the_address_restates_the_survivor_at_mailchimp(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, worker: Worker,
    mailchimp: tuple[FakeMailchimp, LiveServer],
) -> None:
    """As at Brevo, with the segments as tags on the audience member the survivor took over."""
    fake, live = mailchimp
    client = committing_client
    news = await make_list(client)
    acme, both = await make_segment(client, ACME), await make_segment(client, VIP_AND_GOLD)
    duplicate, survivor = await addressless_pair(client)
    await subscribe(client, news["id"], duplicate["id"])
    sink = await destination(client, kind="mailchimp", config={"api_key": MC_KEY, "base_url": live.url},
                             list_mappings=[{"list_id": news["id"], "remote_list_id": "mc-news"}],
                             segment_mappings=[{"segment_id": acme["id"], "remote_list_id": "mc-news", "tag": "Acme"},
                                               {"segment_id": both["id"], "remote_list_id": "mc-news",
                                                "tag": "VIP gold"}])
    await refresh(engine, sink["id"])
    await drain(worker)
    member = fake.member("mc-news", duplicate["email"])
    assert member is not None and member.tags == {"gold", "Acme"}

    await merge(client, survivor, duplicate)
    await drain(worker)
    member = fake.member("mc-news", duplicate["email"])
    assert member is not None and member.status == "subscribed"
    assert member.tags == {"gold", "vip", "VIP gold"}
    assert await snapshot(engine, sink["id"]) == {both["id"]: {survivor["id"]}}


async def test_a_merge_while_a_refresh_runs(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, database_url: str,
) -> None:
    """A refresh whose diff inserted a member being merged away waited for the merge, then failed on the foreign key
    (the contact was gone): the whole refresh rolled back, the worker logged an error, and every round could lose it
    again to the next merge. Now the diff is taken again once the merge is in: the duplicate neither enters nor
    leaves, and the survivor enters in its place."""
    client = committing_client
    segment = await make_segment(client, VIP)
    duplicate, survivor = await make_contact(client), await make_contact(client)
    sink = await destination(client, kind="webhook", config={"url": "https://hooks.example/segment"},
                             segment_mappings=[{"segment_id": segment["id"]}])
    await refresh(engine, sink["id"])
    await tag(client, duplicate, "vip")  # enters at the next refresh
    sessions = make_sessionmaker(engine)
    # the merge stops at contact_merge, its duplicate deleted; the refresh's insert then waits for that row
    merged, done = await _merge_racing_a_refresh(client, sessions, database_url, sink, survivor, duplicate)
    assert merged.status_code == 200, merged.text
    assert done is not None and done.failed is None and (done.members, done.entered, done.left) == (1, 1, 0)
    async with sessions() as session:
        said = (await session.execute(text(
            "SELECT topic, contact_id::text FROM outbox_message WHERE topic LIKE 'segment.%' "
            "AND payload ->> 'destination_id' = :d ORDER BY id"), {"d": sink["id"]})).all()
        members = (await session.scalars(text("SELECT contact_id::text FROM segment_member WHERE destination_id = :d"),
                                         {"d": sink["id"]})).all()
    assert said == [("segment.entered", survivor["id"])] and members == [survivor["id"]]


async def test_members_leave_with_time_alone(committing_client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    client = committing_client
    recent = await make_segment(client, {"all": [{"field": "stats.last_order_at", "op": "within_days", "value": 30}]})
    buyer = await make_contact(client)
    await place_order(client, buyer["id"], sku="SHOE-1", category="shoes", days_ago=20)
    sink = await destination(client, kind="webhook", config={"url": "https://hooks.example/segment"},
                             segment_mappings=[{"segment_id": recent["id"]}])
    [today] = await refresh(engine, sink["id"])
    [later] = await refresh(engine, sink["id"], now=utc_now() + timedelta(days=15))
    assert (today.members, today.entered, today.left) == (1, 1, 0)
    assert (later.members, later.entered, later.left) == (0, 0, 1)
    sessions = make_sessionmaker(engine)
    async with sessions() as session:
        topics = (await session.scalars(text(
            "SELECT topic FROM outbox_message WHERE contact_id = :c AND topic LIKE 'segment.%' ORDER BY id"
        ), {"c": buyer["id"]})).all()
    assert topics == ["segment.entered", "segment.left"]


@pytest.mark.parametrize("grouped_past", [math.inf, 0.0])  # repeat buyers read contact by contact, or grouped
async def test_repeat_buyers_enter_and_leave_in_either_form(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch, grouped_past: float
) -> None:
    monkeypatch.setattr(segments, "GROUPED_PAST", grouped_past)
    conditions: list[Any] = []

    async def spied(*args: Any, **kwargs: Any) -> Any:
        conditions.append(await segments.members_condition(*args, **kwargs))
        return conditions[-1]

    monkeypatch.setattr(segment_sync, "members_condition", spied)
    client = committing_client
    repeat = await make_segment(client, {"all": [{"field": "orders.count", "op": "gte", "value": 2,
                                                  "within_days": 30}]})
    buyer, once = await make_contact(client), await make_contact(client)
    for days_ago in (5, 20):
        await place_order(client, buyer["id"], sku="SHOE-1", category="shoes", days_ago=days_ago)
    await place_order(client, once["id"], sku="SHOE-1", category="shoes", days_ago=5)
    sink = await destination(client, kind="webhook", config={"url": "https://hooks.example/repeat"},
                             segment_mappings=[{"segment_id": repeat["id"]}])
    [today] = await refresh(engine, sink["id"])
    [later] = await refresh(engine, sink["id"], now=utc_now() + timedelta(days=15))  # the older order is 35 days old
    assert (today.members, today.entered, today.left) == (1, 1, 0)
    assert (later.members, later.entered, later.left) == (0, 0, 1)
    assert {"GROUP BY" in str(c.compile()) for c in conditions} == {grouped_past == 0.0}


async def test_two_workers_refresh_without_double_messages(
    committing_client: httpx.AsyncClient, engine: AsyncEngine,
) -> None:
    client = committing_client
    segment = await make_segment(client, VIP)
    people = [await make_contact(client, tags=["vip"]) for _ in range(20)]
    sink = await destination(client, kind="webhook", config={"url": "https://hooks.example/segment"},
                             segment_mappings=[{"segment_id": segment["id"]}])
    sessions = make_sessionmaker(engine)

    async def one(maker: async_sessionmaker[AsyncSession]) -> None:
        while True:
            async with maker.begin() as session:
                if await segment_sync.refresh_next(session, every_seconds=3600) is None:
                    return

    await asyncio.gather(one(sessions), one(sessions))
    async with sessions() as session:
        count = await session.scalar(text(
            "SELECT count(*) FROM outbox_message WHERE topic = 'segment.entered' AND payload ->> 'destination_id' = :d"
        ), {"d": sink["id"]})
    assert count == len(people)


async def test_a_snapshot_that_cannot_be_refreshed_waits_its_turn_and_the_others_go_on(
    committing_client: httpx.AsyncClient, engine: AsyncEngine,
) -> None:
    """A synced segment naming an attribute deleted since (or whose refresh ran past the statement timeout) failed
    its refresh, stayed the most overdue, and was taken again by every round: no other snapshot was refreshed
    again, and the worker logged the same error forever."""
    client = committing_client
    name = f"size_{uuid.uuid4().hex[:8]}"
    await client.post("/v1/attributes", json={"name": name, "type": "number"}, headers=ADMIN)
    broken = await make_segment(client, {"field": f"attributes.{name}", "op": "exists"})
    assert (await client.delete(f"/v1/attributes/{name}", headers=ADMIN)).status_code == 204
    slow, fine = await make_segment(client, {"field": "address.city", "op": "eq", "value": "Lyon"}), \
        await make_segment(client, VIP)
    await make_contact(client, tags=["vip"])
    sink = await destination(client, kind="webhook", config={"url": "https://hooks.example/segment"},
                             segment_mappings=[{"segment_id": s["id"]} for s in (broken, slow, fine)])
    sessions = make_sessionmaker(engine)
    # the snapshots queue in this order, the broken one first
    async with sessions.begin() as session:
        for minutes, segment in enumerate((broken, slow, fine)):
            await session.execute(text("UPDATE segment_sync SET refreshed_at = now() - make_interval(hours => 2) "
                                       "+ make_interval(mins => :m) WHERE segment_id = :s"),
                                  {"m": minutes, "s": segment["id"]})
    done = []
    async with engine.connect() as holder:  # holds `contact`: the slow one's diff waits, past its timeout
        await holder.execute(text("LOCK TABLE contact IN ACCESS EXCLUSIVE MODE"))
        for _ in range(2):
            async with sessions.begin() as session:
                await session.execute(text("SET LOCAL statement_timeout = '300ms'"))
                done.append(await segment_sync.refresh_next(session, every_seconds=3600))
        await holder.rollback()
    async with sessions.begin() as session:
        done.append(await segment_sync.refresh_next(session, every_seconds=3600))
        done.append(await segment_sync.refresh_next(session, every_seconds=3600))
    assert [(r.segment_id, r.failed) for r in done[:3]] == [  # type: ignore[union-attr]
        (uuid.UUID(broken["id"]), "invalid_filter"), (uuid.UUID(slow["id"]), "statement_timeout"),
        (uuid.UUID(fine["id"]), None)]
    assert done[3] is None  # the two that failed wait for the next round, as refreshed ones do
    assert (done[2].members, done[2].entered) == (1, 1)  # type: ignore[union-attr]
    async with sessions() as session:
        topics = (await session.execute(text(
            "SELECT payload ->> 'segment_id', count(*) FROM outbox_message WHERE payload ->> 'destination_id' = :d"
            " GROUP BY 1"), {"d": sink["id"]})).all()
    assert topics == [(fine["id"], 1)]


async def test_a_failed_refresh_shows_on_the_destination_until_one_succeeds(
    committing_client: httpx.AsyncClient, engine: AsyncEngine,
) -> None:
    """A refresh that failed (invalid_filter, statement_timeout) stamped `refreshed_at` like a good one: the admin
    saw a fresh snapshot, and only the worker's log said otherwise. Now the mapping shows `last_error` and
    `failed_at`, `refreshed_at` stays the last good refresh, and the next good refresh clears both."""
    client = committing_client
    name = f"size_{uuid.uuid4().hex[:8]}"
    attribute = {"name": name, "type": "number"}
    assert (await client.post("/v1/attributes", json=attribute, headers=ADMIN)).status_code == 201
    segment = await make_segment(client, {"field": f"attributes.{name}", "op": "exists"})
    sink = await destination(client, kind="webhook", config={"url": "https://hooks.example/segment"},
                             segment_mappings=[{"segment_id": segment["id"]}])
    sessions = make_sessionmaker(engine)

    async def round_at(hours: int) -> segment_sync.Refreshed | None:
        async with sessions.begin() as session:
            return await segment_sync.refresh_next(session, every_seconds=3600, now=utc_now() + timedelta(hours=hours))

    async def shown() -> dict[str, Any]:
        response = await client.get(f"/v1/destinations/{sink['id']}", headers=ADMIN)
        assert response.status_code == 200, response.text
        return response.json()["segment_mappings"][0]  # type: ignore[no-any-return]

    good = await round_at(0)
    assert good is not None and good.failed is None
    first = await shown()
    assert (first["last_error"], first["failed_at"]) == (None, None) and first["refreshed_at"] is not None
    assert (await client.delete(f"/v1/attributes/{name}", headers=ADMIN)).status_code == 204
    failed = await round_at(2)
    assert failed is not None and failed.failed == "invalid_filter"
    after = await shown()
    assert after["refreshed_at"] == first["refreshed_at"]  # not refreshed: the last good one stands
    assert after["last_error"] == "invalid_filter" and after["failed_at"] > first["refreshed_at"]
    assert await round_at(2) is None  # it waits for the next round, as a refreshed one does
    assert (await client.post("/v1/attributes", json=attribute, headers=ADMIN)).status_code == 201
    again = await round_at(4)
    assert again is not None and again.failed is None
    last = await shown()
    assert (last["last_error"], last["failed_at"]) == (None, None) and last["refreshed_at"] > after["failed_at"]
    schema = (await client.get("/openapi.json")).json()["components"]["schemas"]["SegmentMappingRead"]
    assert {"last_error", "failed_at"} <= set(schema["required"])
    assert schema["properties"]["last_error"]["anyOf"][0]["enum"] == ["invalid_filter", "statement_timeout"]


class TestMappingRules:
    async def test_each_kind_names_what_it_cannot_sync(self, committing_client: httpx.AsyncClient) -> None:
        client = committing_client
        news = await make_list(client)
        segment = await make_segment(client, VIP)
        s = segment["id"]
        brevo = {"kind": "brevo", "config": {"api_key": BREVO_KEY},
                 "list_mappings": [{"list_id": news["id"], "remote_list_id": "7"}]}
        mailchimp = {"kind": "mailchimp", "config": {"api_key": MC_KEY},
                     "list_mappings": [{"list_id": news["id"], "remote_list_id": "mc-news"}]}
        webhook = {"kind": "webhook", "config": {"url": "https://hooks.example/x"}}
        cases = [
            (brevo, [{"segment_id": s, "remote_list_id": "abc"}], ["segment_mappings[0].remote_list_id"]),
            (brevo, [{"segment_id": s, "remote_list_id": "7"}], ["segment_mappings[0].remote_list_id"]),
            (brevo, [{"segment_id": s}], ["segment_mappings[0].remote_list_id"]),
            (brevo, [{"segment_id": s, "remote_list_id": "9", "tag": "x"}], ["segment_mappings[0].tag"]),
            (brevo, [{"segment_id": str(uuid.uuid4()), "remote_list_id": "9"}], ["segment_mappings[0].segment_id"]),
            (mailchimp, [{"segment_id": s, "remote_list_id": "mc-news"}], ["segment_mappings[0].tag"]),
            (mailchimp, [{"segment_id": s, "remote_list_id": "mc-other", "tag": "t"}],
             ["segment_mappings[0].remote_list_id"]),
            (webhook, [{"segment_id": s, "remote_list_id": "9"}], ["segment_mappings[0].remote_list_id"]),
            (webhook, [{"segment_id": s}, {"segment_id": s}], ["segment_mappings"]),
        ]
        for body, mappings, fields in cases:
            response = await client.post("/v1/destinations", json={
                "name": f"d-{uuid.uuid4().hex[:6]}", **body, "segment_mappings": mappings}, headers=ADMIN)
            assert_problem(response, 422, *fields)

    async def test_patch_delete_and_the_snapshot(
        self, committing_client: httpx.AsyncClient, engine: AsyncEngine,
    ) -> None:
        client = committing_client
        segment = await make_segment(client, VIP)
        await make_contact(client, tags=["vip"])
        sink = await destination(client, kind="webhook", config={"url": "https://hooks.example/x"},
                                 segment_mappings=[{"segment_id": segment["id"]}])
        [first] = await refresh(engine, sink["id"])
        assert first.members == 1

        # A segment a destination syncs cannot be deleted: 409 naming the destination.
        body = assert_problem(await client.delete(f"/v1/segments/{segment['id']}", headers=ADMIN), 409)
        assert sink["name"] in body["detail"]

        # A new filter makes the snapshot due at once.
        response = await client.patch(f"/v1/segments/{segment['id']}",
                                      json={"filter": {"all": [{"field": "tags", "op": "contains", "value": "x"}]}},
                                      headers=ADMIN)
        assert response.status_code == 200, response.text
        shown = (await client.get(f"/v1/destinations/{sink['id']}", headers=ADMIN)).json()
        assert shown["segment_mappings"][0]["refreshed_at"] is None

        # Unmapping drops the snapshot; then the segment can go.
        response = await client.patch(f"/v1/destinations/{sink['id']}", json={"segment_mappings": []}, headers=ADMIN)
        assert response.status_code == 200 and response.json()["segment_mappings"] == []
        sessions = make_sessionmaker(engine)
        async with sessions() as session:
            left = await session.scalar(text("SELECT count(*) FROM segment_member WHERE destination_id = :d"),
                                        {"d": sink["id"]})
        assert left == 0
        assert (await client.delete(f"/v1/segments/{segment['id']}", headers=ADMIN)).status_code == 204


async def test_worker_once_refreshes_due_snapshots(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, database_url: str, tmp_path: Path,
) -> None:
    """`carnet worker --once` (cron) runs the due jobs before delivering: a new mapping's members enter."""
    segment = await make_segment(committing_client, VIP)
    person = await make_contact(committing_client, tags=["vip"])
    sink = await destination(committing_client, kind="webhook", config={"url": "https://hooks.example/segment"},
                             segment_mappings=[{"segment_id": segment["id"]}])
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(DATABASE_URL=database_url, JWT_SECRET=TEST_SECRET, PYTHONPATH=str(ROOT))
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "app", "worker", "--once"],
                                   env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    logged = [line for line in done.stderr.splitlines() if line.strip()]
    assert logged and all(json.loads(line)["event"] for line in logged), "JSON log lines, as the API's"
    async with make_sessionmaker(engine)() as session:
        entered = await session.scalar(text(
            "SELECT count(*) FROM outbox_message WHERE topic = 'segment.entered' AND contact_id = :c "
            "AND payload ->> 'destination_id' = :d"), {"c": person["id"], "d": sink["id"]})
        refreshed = await session.scalar(text("SELECT refreshed_at FROM segment_sync WHERE destination_id = :d"),
                                         {"d": sink["id"]})
    assert entered == 1 and refreshed is not None


async def _merge_racing_a_refresh(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], database_url: str,
    sink: dict[str, Any], survivor: dict[str, Any], duplicate: dict[str, Any],
) -> tuple[httpx.Response, segment_sync.Refreshed | None]:
    """The sink's snapshots due again; the merge held at `contact_merge` while a refresh runs: both outcomes."""
    async with sessions.begin() as session:
        await session.execute(text("UPDATE segment_sync SET refreshed_at = NULL WHERE destination_id = :d"),
                              {"d": sink["id"]})

    async def refreshing() -> segment_sync.Refreshed | None:
        async with sessions.begin() as session:
            return await segment_sync.refresh_next(session, every_seconds=3600)

    merging = client.post(f"/v1/contacts/{survivor['id']}/merge", json={"duplicate_id": duplicate["id"]},
                          headers=ADMIN)
    db = await asyncpg.connect(plain_dsn(database_url))
    try:
        return await race_past_held_table(db, "contact_merge", merging, refreshing())
    finally:
        await db.close()
