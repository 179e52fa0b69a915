"""Class 10: a vendor acts only on the people it was given (issue 15, threat model: "a compromised vendor").

The attack: whoever holds one destination's inbound secret (a hostile account at the vendor, a leaked webhook
URL) posts the vendor's own event shapes naming any address. Before the fix Carnet looked the address up among
all its contacts: the sender could mark anyone bounced or complained (withdrawing their marketing consent on
every list), move anyone's address (Mailchimp `upemail`), and tell from `changed` / `ignored` whether an address
was in the file. Now an event reaches only a person the destination holds a record of or was sent through a
mapped list, only on the lists it maps, and the answer is the same whatever Carnet holds.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from tests.factories import ADMIN, PROOF, grant_marketing, make_contact, make_list
from tests.routers.test_segments import make_segment
from tests.routers.test_signup import SHOP, fresh_limits, signup  # noqa: F401 (fresh_limits: a fixture used by name)
from tests.sync.test_inbound import BREVO_LIST, FIRED, REMOTE, membership, post_mailchimp, unsubscribe_form

OTHER_REMOTE = "f00dfeed42"  # an audience of another destination


async def subscribe(client: httpx.AsyncClient, list_id: str, contact_id: str) -> None:
    response = await client.put(f"/v1/lists/{list_id}/members/{contact_id}", json={"consent": {"proof": PROOF}},
                                headers=ADMIN)
    assert response.status_code == 201, response.text


async def make_destination(client: httpx.AsyncClient, kind: str, mapped: dict[str, Any], remote: str,
                           **extra: Any) -> tuple[dict[str, Any], str]:
    response = await client.post("/v1/destinations", headers=ADMIN, json={
        "kind": kind, "name": f"{kind}-{uuid.uuid4().hex[:6]}", "config": {"api_key": "0123456789abcdef0123-us6"},
        "list_mappings": [{"list_id": mapped["id"], "remote_list_id": remote}], **extra})
    assert response.status_code == 201, response.text
    return response.json(), response.json()["generated_secrets"]["inbound_secret"]


async def everything_about(client: httpx.AsyncClient, person: dict[str, Any]) -> dict[str, Any]:
    """The person's whole record (GDPR export): profile, memberships, consent ledger, history."""
    export = (await client.get(f"/v1/contacts/{person['id']}/export", headers=ADMIN)).json()
    export.pop("generated_at")
    return export  # type: ignore[no-any-return]


async def world(client: httpx.AsyncClient) -> dict[str, Any]:
    """A hostile destination (`ours` mapped), another destination (`theirs` mapped) and an unmapped list.

    `given` is on `ours` (the hostile vendor was given them); `stranger` is on `theirs` and the unmapped list
    with marketing consent granted; `loner` is on no list at all.
    """
    ours, theirs, private = await make_list(client), await make_list(client), await make_list(client)
    given, stranger, loner = [await make_contact(client, email=f"{who}-{uuid.uuid4().hex[:8]}@example.com")
                              for who in ("given", "stranger", "loner")]
    await subscribe(client, ours["id"], given["id"])
    for the_list in (theirs, private):
        await subscribe(client, the_list["id"], stranger["id"])
    await grant_marketing(client, stranger["id"])
    await grant_marketing(client, loner["id"])
    return {"lists": {"ours": ours, "theirs": theirs, "private": private},
            "given": given, "stranger": stranger, "loner": loner}


def brevo_events(email: str, list_ids: list[int]) -> list[dict[str, Any]]:
    return [{"event": "unsubscribe", "email": email, "list_id": list_ids, "id": 1, "camp_id": 3},
            {"event": "unsubscribe", "email": email, "id": 2},  # no list: Brevo's global unsubscribe
            {"event": "hard_bounce", "email": email, "id": 3, "reason": "mailbox does not exist"},
            {"event": "spam", "email": email, "id": 4}]


def mailchimp_forms(email: str, new_email: str) -> list[dict[str, str]]:
    return [unsubscribe_form(email, reason="abuse"),
            {"type": "cleaned", "fired_at": FIRED, "data[list_id]": REMOTE, "data[reason]": "hard",
             "data[email]": email},
            {"type": "cleaned", "fired_at": FIRED, "data[list_id]": REMOTE, "data[reason]": "abuse",
             "data[email]": email},
            {"type": "upemail", "fired_at": FIRED, "data[list_id]": REMOTE, "data[new_id]": "51da8c3259",
             "data[new_email]": new_email, "data[old_email]": email}]


async def test_a_brevo_account_cannot_bounce_complain_or_unsubscribe_people_it_was_not_given(
    client: httpx.AsyncClient,
) -> None:
    w = await world(client)
    theirs_remote = 8
    await make_destination(client, "brevo", w["lists"]["theirs"], str(theirs_remote))  # the stranger's vendor
    hostile, secret = await make_destination(client, "brevo", w["lists"]["ours"], str(BREVO_LIST))
    url, auth = f"/v1/inbound/brevo/{hostile['id']}", {"Authorization": f"Bearer {secret}"}
    before = {who: await everything_about(client, w[who]) for who in ("stranger", "loner")}

    for who in ("stranger", "loner"):
        response = await client.post(url, json=brevo_events(w[who]["email"], [BREVO_LIST, theirs_remote]),
                                     headers=auth)
        assert response.status_code == 200, response.text
        assert await everything_about(client, w[who]) == before[who], f"a hostile Brevo account changed {who}"

    # The same events about the person it was given still apply (the gate is no blanket refusal).
    assert (await client.post(url, json=brevo_events(w["given"]["email"], [BREVO_LIST]), headers=auth)).is_success
    given = await everything_about(client, w["given"])
    assert given["profile"]["email_status"] == "complained"
    assert given["consents"]["state"]["email_marketing"]["granted"] is False
    assert await membership(client, w["lists"]["ours"]["id"], w["given"]["id"]) == "unsubscribed"


async def test_a_mailchimp_account_cannot_move_bounce_or_unsubscribe_people_it_was_not_given(
    client: httpx.AsyncClient,
) -> None:
    w = await world(client)
    await make_destination(client, "mailchimp", w["lists"]["theirs"], OTHER_REMOTE)
    hostile, secret = await make_destination(client, "mailchimp", w["lists"]["ours"], REMOTE)
    before = {who: await everything_about(client, w[who]) for who in ("stranger", "loner")}

    for who in ("stranger", "loner"):
        for form in mailchimp_forms(w[who]["email"], f"attacker-{uuid.uuid4().hex[:8]}@example.com"):
            for audience in (REMOTE, OTHER_REMOTE):
                response = await post_mailchimp(client, hostile, secret, {**form, "data[list_id]": audience})
                assert response.status_code == 200, response.text
        assert await everything_about(client, w[who]) == before[who], f"a hostile Mailchimp account changed {who}"

    new = f"moved-{uuid.uuid4().hex[:8]}@example.com"
    assert (await post_mailchimp(client, hostile, secret, mailchimp_forms(w["given"]["email"], new)[3])).is_success
    assert (await everything_about(client, w["given"]))["profile"]["email"] == new


async def test_the_answer_does_not_tell_which_addresses_carnet_holds(client: httpx.AsyncClient) -> None:
    w = await world(client)
    await make_destination(client, "mailchimp", w["lists"]["theirs"], OTHER_REMOTE)
    mailchimp, mc_secret = await make_destination(client, "mailchimp", w["lists"]["ours"], REMOTE)
    brevo, brevo_secret = await make_destination(client, "brevo", w["lists"]["ours"], str(BREVO_LIST))
    nobody = f"nobody-{uuid.uuid4().hex[:8]}@example.com"

    async def answers(email: str) -> list[tuple[int, str, bytes]]:
        """Each vendor's answer to each event kind about `email`: status, content type, body."""
        seen = []
        for event in brevo_events(email, [BREVO_LIST]):
            response = await client.post(f"/v1/inbound/brevo/{brevo['id']}", json=event,
                                         headers={"Authorization": f"Bearer {brevo_secret}"})
            seen.append((response.status_code, response.headers["content-type"], response.content))
        for form in mailchimp_forms(email, f"n-{uuid.uuid4().hex[:8]}@example.com")[:3]:
            response = await post_mailchimp(client, mailchimp, mc_secret, form)
            seen.append((response.status_code, response.headers["content-type"], response.content))
        return seen

    unknown = await answers(nobody)
    assert all(status == 200 for status, *_ in unknown)
    # In the file but not given to this vendor; given and changed by the events; given, and a replay.
    for who in ("stranger", "loner", "given", "given"):
        assert await answers(w[who]["email"]) == unknown, f"the answer about {who} differs from an unknown address"
    assert (await everything_about(client, w["given"]))["profile"]["email_status"] == "complained"  # it did apply


async def test_leaving_a_mailchimp_audience_with_a_segment_tag_unsubscribes_only_that_list(
    client: httpx.AsyncClient,
) -> None:
    """A Mailchimp segment is a tag on a mapped audience: leaving the audience is that list's unsubscribe, not a
    withdrawal of consent that would reach lists this vendor does not map."""
    w = await world(client)
    await subscribe(client, w["lists"]["ours"]["id"], w["stranger"]["id"])  # now given to the hostile vendor
    segment = await make_segment(client, {"all": [{"field": "tags", "op": "contains", "value": "vip"}]})
    hostile, secret = await make_destination(client, "mailchimp", w["lists"]["ours"], REMOTE, segment_mappings=[
        {"segment_id": segment["id"], "remote_list_id": REMOTE, "tag": "Everyone"}])

    response = await post_mailchimp(client, hostile, secret, unsubscribe_form(w["stranger"]["email"]))
    assert response.status_code == 200
    person = w["stranger"]["id"]
    assert await membership(client, w["lists"]["ours"]["id"], person) == "unsubscribed"
    assert await membership(client, w["lists"]["private"]["id"], person) == "subscribed"
    assert await membership(client, w["lists"]["theirs"]["id"], person) == "subscribed"
    ledger = (await client.get(f"/v1/contacts/{person}/consents", headers=ADMIN)).json()
    assert ledger["state"]["email_marketing"]["granted"] is True


@pytest.mark.usefixtures("fresh_limits")
async def test_an_anonymous_signup_does_not_hand_a_stranger_to_the_vendor(client: httpx.AsyncClient) -> None:
    """The attack in two steps: anyone types the stranger's address in the public form of a list the hostile
    Mailchimp destination maps (the shop's newsletter, mapped without the vendor's double opt-in), which makes
    a membership `pending` on Carnet's own confirmation; then the holder of the inbound URL moves the address
    to one of theirs, or marks it complained. Mailchimp was never sent that member (docs/sync.md: "a member
    pending on Carnet's own confirmation is not sent at all"), so the destination was not given the person."""
    newsletter = await make_list(client, public_signup=True, signup_origins=[SHOP], signup_wording="yes")
    private = await make_list(client)
    stranger = await make_contact(client, email=f"stranger-{uuid.uuid4().hex[:8]}@example.com")
    await subscribe(client, private["id"], stranger["id"])
    hostile, secret = await make_destination(client, "mailchimp", newsletter, REMOTE)
    signed_up = await signup(client, newsletter["id"], {"email": stranger["email"], "consent": True})
    assert signed_up.status_code == 202, signed_up.text
    assert await membership(client, newsletter["id"], stranger["id"]) == "pending"
    before = await everything_about(client, stranger)

    for form in mailchimp_forms(stranger["email"], f"attacker-{uuid.uuid4().hex[:8]}@example.com"):
        response = await post_mailchimp(client, hostile, secret, form)
        assert response.status_code == 200, response.text
    assert await everything_about(client, stranger) == before, "the vendor acted on a person it was never sent"
    assert await membership(client, private["id"], stranger["id"]) == "subscribed"
