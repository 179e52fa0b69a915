"""The outbox keeps each contact's order (issue 21: an invariant that held under review; kept by this test).

Clients race edits, tags, subscribes, unsubscribes, consent withdrawals and merges on a few contacts while the
worker delivers every outbox message to a Standard Webhooks receiver. Once the outbox is drained:

- every message was delivered exactly once, signed;
- each contact's messages arrived in the order they were written (outbox ids increasing per contact);
- what the receiver last heard for each membership is the membership's status in the database.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict

from tests.concurrency.conftest import Race
from tests.factories import unique_email
from tests.fakes.server import LiveServer as FakeServer
from tests.fakes.webhook_receiver import FakeWebhookReceiver

CONTACTS = 6
CLIENTS = 12
OPS = 14
DRAIN_SECONDS = 60
SUBSCRIBE = {"consent": {"source": "newsletter_form", "proof": {"wording": "Yes, send me the newsletter"}}}


async def test_each_contact_hears_its_changes_in_order_exactly_once(race: Race) -> None:
    rng = random.Random(8)  # noqa: S311 (test data)
    news = await race.ok("POST", "/v1/lists", json={"name": "news"})
    hook = await race.ok("POST", "/v1/destinations", json={
        "kind": "webhook", "name": "shop", "config": {"url": "http://placeholder.invalid/"}})
    receiver = FakeWebhookReceiver(hook["generated_secrets"]["secret"])
    with FakeServer(receiver) as server:
        await race.ok("PATCH", f"/v1/destinations/{hook['id']}", json={  # a secret goes with its address
            "config": {"url": server.url + "/carnet", "secret": hook["generated_secrets"]["secret"]}})
        contacts = [str((await race.ok("POST", "/v1/contacts", json={"email": unique_email()}))["id"])
                    for _ in range(CONTACTS)]
        spares = [str((await race.ok("POST", "/v1/contacts", json={"email": unique_email()}))["id"])
                  for _ in range(CLIENTS)]

        async def client(no: int) -> None:
            for op in range(OPS):
                contact = rng.choice(contacts)
                member = f"/v1/lists/{news['id']}/members/{contact}"
                choice = rng.randrange(6)
                if choice == 0:
                    await race.send("PATCH", f"/v1/contacts/{contact}", json={"job_title": f"c{no}-{op}"})
                elif choice == 1:
                    await race.send("PUT" if rng.random() < 0.5 else "DELETE", f"/v1/contacts/{contact}/tags/t{no}")
                elif choice == 2:
                    await race.send("PUT", member, json=SUBSCRIBE)
                elif choice == 3:
                    await race.send("DELETE", member)
                elif choice == 4:
                    await race.send("POST", f"/v1/contacts/{contact}/consents",
                                    json={"purpose": "email_marketing", "action": "withdrawn"})
                elif op == OPS // 2:  # once per client: a spare contact merged into a busy one
                    await race.send("PUT", f"/v1/lists/{news['id']}/members/{spares[no]}", json=SUBSCRIBE)
                    await race.send("POST", f"/v1/contacts/{contact}/merge", json={"duplicate_id": spares[no]})

        await asyncio.gather(*(client(no) for no in range(CLIENTS)))
        left = await race.outbox_waiting(within=DRAIN_SECONDS)
        assert left == 0, f"{left} messages or deliveries still waiting after {DRAIN_SECONDS} s"

    messages = await race.db.fetch("SELECT id, contact_id, topic FROM outbox_message ORDER BY id")
    deliveries = receiver.deliveries
    assert all(d.valid for d in deliveries), [d.reason for d in deliveries if not d.valid][:3]
    delivered = [int(d.id.removeprefix("msg_")) for d in deliveries]
    assert sorted(delivered) == [m["id"] for m in messages], "lost or duplicated deliveries"

    per_contact: dict[str, list[int]] = defaultdict(list)
    for message_id, d in zip(delivered, deliveries, strict=True):
        if d.payload["data"].get("contact_id"):  # a message about no contact (a list, a destination) has no line
            per_contact[d.payload["data"]["contact_id"]].append(message_id)
    out_of_order = {c: ids for c, ids in per_contact.items() if ids != sorted(ids)}
    assert out_of_order == {}

    last_heard: dict[tuple[str, str], str] = {}
    for d in deliveries:
        if d.payload["type"] in ("membership.subscribed", "membership.unsubscribed"):
            data = d.payload["data"]
            last_heard[(data["contact_id"], data["list_id"])] = d.payload["type"].removeprefix("membership.")
    members = await race.db.fetch("SELECT contact_id::text, list_id::text, status FROM list_membership")
    stale = [(m["contact_id"], m["status"], last_heard.get((m["contact_id"], m["list_id"])))
             for m in members if m["contact_id"] in contacts
             and last_heard.get((m["contact_id"], m["list_id"])) not in (None, m["status"])]
    print(f"outbox order: {len(delivered)} messages delivered once each, in order for {len(per_contact)} contacts; "
          f"statuses {dict(race.statuses)}")
    assert stale == []
    race.assert_no_server_error()
