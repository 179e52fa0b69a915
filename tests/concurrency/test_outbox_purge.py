"""Outbox retention racing deliveries: the purge never takes what a destination is still owed (issue 18).

Clients change contacts (fields, tags, list memberships) while the live worker delivers to a Standard Webhooks
receiver that fails some calls (500, 429: retries) and to a fake Mailchimp, and this process purges with a
window of zero (everything delivered goes at once) in a loop, as fast as it can. After every purge batch, in
one snapshot: no undelivered delivery refers to a message that is gone. Once drained:

- every message written (recorded by a trigger) reached the receiver exactly once, signed, each contact's in
  order: a purged message would be missing, a message purged and retried would be doubled;
- Mailchimp's members have Carnet's statuses and names;
- one last sweep leaves no delivery and no dispatched message behind.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import Message, Receive, Scope, Send

from app.db import make_sessionmaker
from app.models.base import utc_now
from app.services.outbox_retention import purge_deliveries, purge_messages
from tests.concurrency.conftest import Race
from tests.factories import unique_email
from tests.fakes.mailchimp import FakeMailchimp
from tests.fakes.server import LiveServer as FakeServer
from tests.fakes.webhook_receiver import FakeWebhookReceiver
from tests.sync.keys import MC_KEY

CONTACTS = 40
CLIENTS = 8
OPS = 40
DRAIN_SECONDS = 90
SUBSCRIBE = {"consent": {"source": "newsletter_form", "proof": {"wording": "Yes, send me the newsletter"}}}

# Every message id written while the test runs (statement-level: one insert for many rows in imports).
_RECORD = """
CREATE TABLE written_for_test (id bigint PRIMARY KEY);
CREATE FUNCTION record_written_for_test() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO written_for_test SELECT id FROM new_rows; RETURN NULL; END $$;
CREATE TRIGGER written_for_test AFTER INSERT ON outbox_message REFERENCING NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION record_written_for_test();
"""
_UNRECORD = """
DROP TRIGGER IF EXISTS written_for_test ON outbox_message;
DROP FUNCTION IF EXISTS record_written_for_test();
DROP TABLE IF EXISTS written_for_test;
"""
# Undelivered deliveries whose message is gone (message 0: a resync or a queued erasure, no message).
_ORPHANS = """
SELECT count(*) FROM delivery d
WHERE d.status <> 'delivered' AND d.message_id > 0
  AND NOT EXISTS (SELECT 1 FROM outbox_message m WHERE m.id = d.message_id)
"""


class Accepted:
    """The receiver's answers seen from outside: the `webhook-id` of each call it accepted, in order."""

    def __init__(self, receiver: FakeWebhookReceiver) -> None:
        self.receiver, self.ids = receiver, []  # type: list[str]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        webhook_id = dict(scope.get("headers", [])).get(b"webhook-id", b"").decode()

        async def answer(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] < 300:
                self.ids.append(webhook_id)
            await send(message)

        await self.receiver(scope, receive, answer)


async def test_a_purge_racing_deliveries_takes_nothing_still_owed(race: Race, engine: AsyncEngine) -> None:
    rng = random.Random(18)  # noqa: S311 (test data)
    sessions = make_sessionmaker(engine)
    await race.db.execute(_UNRECORD)
    await race.db.execute(_RECORD)
    try:
        news = await race.ok("POST", "/v1/lists", json={"name": "news"})
        hook = await race.ok("POST", "/v1/destinations", json={
            "kind": "webhook", "name": "shop", "config": {"url": "http://placeholder.invalid/"}})
        secret = hook["generated_secrets"]["secret"]
        receiver = FakeWebhookReceiver(secret)
        accepted = Accepted(receiver)
        chimp = FakeMailchimp(api_key=MC_KEY, lists={"mc-news"})
        with FakeServer(accepted) as hook_server, FakeServer(chimp) as chimp_server:
            await race.ok("PATCH", f"/v1/destinations/{hook['id']}", json={
                "config": {"url": hook_server.url + "/carnet", "secret": secret}})
            await race.ok("POST", "/v1/destinations", json={
                "kind": "mailchimp", "name": "chimp", "config": {"api_key": MC_KEY, "base_url": chimp_server.url},
                "list_mappings": [{"list_id": news["id"], "remote_list_id": "mc-news"}],
                "field_mappings": {"first_name": "FNAME"}})
            contacts = [str((await race.ok("POST", "/v1/contacts", json={"email": unique_email()}))["id"])
                        for _ in range(CONTACTS)]
            receiver.answer(500, 5)
            receiver.answer(429, 3, headers={"Retry-After": "1"})

            async def client(no: int) -> None:
                for op in range(OPS):
                    contact = rng.choice(contacts)
                    member = f"/v1/lists/{news['id']}/members/{contact}"
                    choice = rng.randrange(4)
                    if choice == 0:
                        await race.send("PATCH", f"/v1/contacts/{contact}", json={"first_name": f"c{no}-{op}"})
                    elif choice == 1:
                        await race.send("PUT", f"/v1/contacts/{contact}/tags/t{no}")
                    elif choice == 2:
                        await race.send("PUT", member, json=SUBSCRIBE)
                    else:
                        await race.send("DELETE", member)
                    if op == OPS // 2 and no == 0:  # more failures once the traffic is under way
                        receiver.answer(500, 10)

            purges = orphans_seen = 0
            stop = asyncio.Event()

            async def purge() -> None:
                nonlocal purges, orphans_seen
                after = 0
                while not stop.is_set():
                    async with sessions.begin() as session:
                        await purge_deliveries(session, cutoff=utc_now(), limit=50)
                        batch = await purge_messages(session, cutoff=utc_now(), after=after, limit=50)
                    after = batch.last_id if batch.more else 0
                    purges += 1
                    async with sessions() as session:
                        orphans_seen += await session.scalar(text(_ORPHANS)) or 0
                    await asyncio.sleep(0.01)

            purging = asyncio.create_task(purge())
            await asyncio.gather(*(client(no) for no in range(CLIENTS)))
            left = await race.outbox_waiting(within=DRAIN_SECONDS)
            stop.set()
            await purging
            assert left == 0, f"{left} messages or deliveries still waiting after {DRAIN_SECONDS} s"

        assert orphans_seen == 0, "an undelivered delivery lost its message"
        written = [r["id"] for r in await race.db.fetch("SELECT id FROM written_for_test ORDER BY id")]
        assert all(d.valid for d in receiver.deliveries), [d.reason for d in receiver.deliveries if not d.valid][:3]
        refused = len(receiver.deliveries) - len(accepted.ids)
        assert refused == 18  # every scripted failure was answered, and retried
        delivered = [int(i.removeprefix("msg_")) for i in accepted.ids]
        assert sorted(delivered) == written, "a message was lost or delivered twice"
        about = {d.id: d.payload["data"].get("contact_id") for d in receiver.deliveries}
        per_contact: dict[str, list[int]] = defaultdict(list)
        for webhook_id, message_id in zip(accepted.ids, delivered, strict=True):
            if about[webhook_id]:
                per_contact[about[webhook_id]].append(message_id)
        assert {c: ids for c, ids in per_contact.items() if ids != sorted(ids)} == {}

        rows = await race.db.fetch(
            "SELECT c.email, c.first_name, m.status FROM contact c JOIN list_membership m ON m.contact_id = c.id"
            " WHERE m.list_id = $1", news["id"])
        wrong = [(r["status"], chimp.member("mc-news", r["email"])) for r in rows
                 if (found := chimp.member("mc-news", r["email"])) is None or found.status != r["status"]
                 or found.merge_fields.get("FNAME") != (r["first_name"] or "")]
        assert wrong == []
        assert chimp.violations == []

        async with sessions.begin() as session:
            while await purge_deliveries(session, cutoff=utc_now(), limit=5000) == 5000:
                pass
            await purge_messages(session, cutoff=utc_now(), after=0, limit=1_000_000)
        assert await race.db.fetchval("SELECT count(*) FROM delivery") == 0
        assert await race.db.fetchval("SELECT count(*) FROM outbox_message WHERE dispatched_at IS NOT NULL") == 0
        print(f"outbox purge race: {len(written)} messages delivered once each while {purges} purge rounds ran; "
              f"{refused} receiver calls refused and retried; statuses {dict(race.statuses)}")
        race.assert_no_server_error()
    finally:
        await race.db.execute(_UNRECORD)
