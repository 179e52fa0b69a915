"""A merge changes nobody's consent without saying so (issue 21, item 4).

Merging moves the duplicate's consent events onto the survivor's ledger; the state derived from the ledger
(email_marketing granted or not, hence the list memberships) must be re-evaluated afterwards, and the emailing
tools told (membership.unsubscribed, consent.withdrawn outbox messages). Checked alone, then with withdrawals
racing the merges. Invariants, in SQL:

- nobody withdrawn is subscribed: no pending/subscribed membership for a contact whose latest email_marketing
  event (in the order things happened) is a withdrawal;
- the outbox says so: for such memberships, the latest membership message is `membership.unsubscribed`, and
  the latest email_marketing consent message of such a contact is `consent.withdrawn`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tests.concurrency.conftest import Race, RoundStats
from tests.factories import unique_email

PAIRS = 12
ROUNDS = 3

_LATEST_CONSENT = """
    SELECT DISTINCT ON (contact_id) contact_id, action FROM consent_event
    WHERE purpose = 'email_marketing' AND contact_id IS NOT NULL ORDER BY contact_id, occurred_at DESC, id DESC
"""
WITHDRAWN_BUT_SUBSCRIBED = f"""
WITH latest AS ({_LATEST_CONSENT})
SELECT m.contact_id, m.list_id, m.status FROM list_membership m JOIN latest l USING (contact_id)
WHERE l.action = 'withdrawn' AND m.status <> 'unsubscribed'
"""  # noqa: S608 (our own SQL fragments)
UNTOLD = f"""
WITH latest AS ({_LATEST_CONSENT}),
said_member AS (
    SELECT DISTINCT ON (contact_id, payload ->> 'list_id') contact_id, payload ->> 'list_id' AS list_id, topic
    FROM outbox_message WHERE topic IN ('membership.subscribed', 'membership.unsubscribed')
    ORDER BY contact_id, payload ->> 'list_id', id DESC
), said_consent AS (
    SELECT DISTINCT ON (contact_id) contact_id, topic FROM outbox_message
    WHERE topic IN ('consent.granted', 'consent.withdrawn') AND payload ->> 'purpose' = 'email_marketing'
    ORDER BY contact_id, id DESC
)
SELECT m.contact_id, 'membership' AS what FROM list_membership m
JOIN said_member s ON s.contact_id = m.contact_id AND s.list_id = m.list_id::text
WHERE m.status = 'unsubscribed' AND s.topic = 'membership.subscribed'
UNION ALL
SELECT l.contact_id, 'consent' FROM latest l JOIN said_consent s USING (contact_id)
WHERE l.action = 'withdrawn' AND s.topic = 'consent.granted'
"""  # noqa: S608 (our own SQL fragments)
SUBSCRIBE = {"consent": {"source": "newsletter_form", "proof": {"wording": "Yes, send me the newsletter"}}}
WITHDRAW = {"purpose": "email_marketing", "action": "withdrawn", "source": "customer_service"}


async def subscribed_contact(race: Race, *list_ids: str) -> str:
    contact = await race.ok("POST", "/v1/contacts", json={"email": unique_email()})
    for list_id in list_ids:
        await race.ok("PUT", f"/v1/lists/{list_id}/members/{contact['id']}", json=SUBSCRIBE)
    return str(contact["id"])


async def broken(race: Race, contact_ids: list[str]) -> list[Any]:
    """The rows breaking either invariant, among these contacts."""
    return [row for query in (WITHDRAWN_BUT_SUBSCRIBED, UNTOLD)
            for row in await race.db.fetch(f"SELECT * FROM ({query}) broken WHERE contact_id = ANY($1::uuid[])",  # noqa: S608
                                           contact_ids)]


async def test_merging_a_withdrawn_duplicate_unsubscribes_the_survivor_and_says_so(race: Race) -> None:
    news = await race.ok("POST", "/v1/lists", json={"name": "news"})
    offers = await race.ok("POST", "/v1/lists", json={"name": "offers"})
    duplicate = await subscribed_contact(race, news["id"])
    survivor = await subscribed_contact(race, news["id"], offers["id"])
    await race.ok("POST", f"/v1/contacts/{duplicate}/consents", json=WITHDRAW)  # the latest decision
    before = await race.db.fetchval("SELECT max(id) FROM outbox_message")

    await race.ok("POST", f"/v1/contacts/{survivor}/merge", json={"duplicate_id": duplicate})

    members = await race.ok("GET", f"/v1/lists/{offers['id']}/members")
    assert [(m["contact_id"], m["status"]) for m in members["data"]] == [(survivor, "unsubscribed")]
    can = await race.ok("GET", f"/v1/contacts/{survivor}/can-email")
    assert can["marketing"] is False
    assert await broken(race, [survivor]) == []
    topics = await race.db.fetch("SELECT topic, payload ->> 'list_id' AS list_id FROM outbox_message "
                                 "WHERE contact_id = $1::text::uuid AND id > $2", survivor, before)
    assert {("membership.unsubscribed", news["id"]), ("membership.unsubscribed", offers["id"]),
            ("consent.withdrawn", None)} <= {(t["topic"], t["list_id"]) for t in topics}
    race.assert_no_server_error()


async def test_withdrawals_racing_merges_leave_nobody_withdrawn_subscribed(race: Race) -> None:
    news = await race.ok("POST", "/v1/lists", json={"name": "news"})
    stats = RoundStats("withdrawal racing merge")
    outcomes: dict[int, int] = {}
    for _ in range(ROUNDS):
        pairs = [(await subscribed_contact(race, news["id"]), await subscribed_contact(race, news["id"]))
                 for _ in range(PAIRS)]
        calls = []
        for i, (duplicate, survivor) in enumerate(pairs):
            withdrawn = duplicate if i % 3 else survivor  # mostly the duplicate's side: what the merge moves
            calls += [race.send("POST", f"/v1/contacts/{withdrawn}/consents", json=WITHDRAW),
                      race.send("POST", f"/v1/contacts/{survivor}/merge", json={"duplicate_id": duplicate})]
        responses = await asyncio.gather(*calls)
        for response in responses:
            outcomes[response.status_code] = outcomes.get(response.status_code, 0) + 1
        # A withdrawal that lost the race to the merge finds its contact gone: 404, nothing half written.
        ids = [contact_id for pair in pairs for contact_id in pair]
        ok = {r.status_code for r in responses} <= {200, 201, 404} and await broken(race, ids) == []
        stats.record(ok)
    print(stats, outcomes)
    assert stats.broken == 0, (stats, outcomes)
    race.assert_no_server_error()


async def test_list_counts_are_exact_after_merges_racing_list_writes(race: Race) -> None:
    """A list's counts (GET /v1/lists/{id}) right after merges that race subscribes and unsubscribes to that list:
    each person counted once, with the status the two writes decide in either order (a write to the duplicate that
    lost the race finds it gone: 404, nothing written)."""
    news = await race.ok("POST", "/v1/lists", json={"name": "news"})
    members = f"/v1/lists/{news['id']}/members"
    stats = RoundStats("list write racing merge")
    expected = {"subscribed": 0, "pending": 0, "unsubscribed": 0}
    orders: dict[str, int] = {}  # how the races went: the write to the duplicate before the merge, or after (404)
    for _ in range(ROUNDS):
        calls, settle = [], []
        for i in range(PAIRS):
            kind = i % 5
            duplicate = await subscribed_contact(race, *([news["id"]] if kind != 3 else []))
            survivor = await subscribed_contact(race, *([news["id"]] if kind in (0, 4) else []))
            calls.append(race.send("POST", f"/v1/contacts/{survivor}/merge", json={"duplicate_id": duplicate}))
            if kind == 0:    # both on the list; the survivor leaves it: unsubscribed, in either order
                calls.append(race.send("DELETE", f"{members}/{survivor}"))
            elif kind == 1:  # the duplicate's; the survivor joins: subscribed, in either order
                calls.append(race.send("PUT", f"{members}/{survivor}", json=SUBSCRIBE))
            elif kind == 2:  # the duplicate's; it leaves: unsubscribed, unless the merge came first (404)
                calls.append(race.send("DELETE", f"{members}/{duplicate}"))
            elif kind == 3:  # nobody's; the duplicate joins: subscribed, unless the merge came first (404)
                calls.append(race.send("PUT", f"{members}/{duplicate}", json=SUBSCRIBE))
            else:            # both on the list; a batch takes both out: unsubscribed, in either order
                calls.append(race.send("POST", f"{members}/batch", json={"remove": [duplicate, survivor]}))
            settle.append(kind)
        responses = await asyncio.gather(*calls)
        for kind, merged, written in zip(settle, responses[::2], responses[1::2], strict=True):
            assert merged.status_code == 200, merged.text
            assert written.status_code in ((200, 201, 404) if kind in (2, 3) else (200, 201)), written.text
            if kind in (2, 3):
                order = "merge first" if written.status_code == 404 else "write first"
                orders[order] = orders.get(order, 0) + 1
            if kind == 3 and written.status_code == 404:
                continue  # nobody on the list
            lost = kind == 2 and written.status_code == 404
            expected["subscribed" if kind in (1, 3) or lost else "unsubscribed"] += 1
        shown = await race.ok("GET", f"/v1/lists/{news['id']}")
        stored = dict(await race.db.fetch(  # type: ignore[arg-type]
            "SELECT status, count(*) FROM list_membership WHERE list_id = $1::text::uuid GROUP BY status", news["id"]))
        stats.record(shown["counts"] == expected and {k: v for k, v in expected.items() if v} == stored)
    print(stats, expected, orders)
    assert stats.broken == 0, (stats, expected, shown["counts"])
    race.assert_no_server_error()
