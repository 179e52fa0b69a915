"""The preference center link reaches every email: a vendor field (Mailchimp merge field, Brevo attribute) that
templates can use, and every webhook payload about a contact. Made at send time from the key, never stored."""

from __future__ import annotations

import httpx
import pytest

from app.services.links import LinkCodec, LinkKind
from app.settings import Settings
from app.worker import Worker
from tests.auth import TEST_SECRET
from tests.factories import ADMIN, make_contact, make_list
from tests.fakes.brevo import FakeBrevo
from tests.fakes.mailchimp import FakeMailchimp
from tests.fakes.server import LiveServer
from tests.fakes.webhook_receiver import FakeWebhookReceiver
from tests.sync.keys import BREVO_KEY, MC_KEY
from tests.sync.test_end_to_end import destination, drain, subscribe

pytestmark = pytest.mark.committing
CODEC = LinkCodec(TEST_SECRET)


def contact_of(url: str, settings: Settings) -> str:
    assert url.startswith(f"{settings.public_base_url}/v1/public/preferences/")
    return str(CODEC.decode(url.rsplit("/", 1)[1], kind=LinkKind.PREFERENCES).contact_id)


async def test_vendors_get_it_as_a_mapped_field(
    committing_client: httpx.AsyncClient, worker: Worker, settings: Settings,
    mailchimp: tuple[FakeMailchimp, LiveServer], brevo: tuple[FakeBrevo, LiveServer],
) -> None:
    (mc, mc_live), (br, br_live) = mailchimp, brevo
    news = await make_list(committing_client)
    await destination(committing_client, kind="mailchimp", config={"api_key": MC_KEY, "base_url": mc_live.url},
                      list_mappings=[{"list_id": news["id"], "remote_list_id": "mc-news"}],
                      field_mappings={"first_name": "FNAME", "preferences_url": "PREFS"})
    await destination(committing_client, kind="brevo", config={"api_key": BREVO_KEY, "base_url": br_live.url},
                      list_mappings=[{"list_id": news["id"], "remote_list_id": "7"}],
                      field_mappings={"preferences_url": "PREFERENCES_URL"})
    person = await make_contact(committing_client, first_name="Inès")
    await subscribe(committing_client, news["id"], person["id"])
    await drain(worker)
    member = mc.member("mc-news", person["email"])
    assert member is not None and contact_of(member.merge_fields["PREFS"], settings) == person["id"]
    assert contact_of(br.by_email(person["email"]).attributes["PREFERENCES_URL"], settings) == person["id"]


async def test_webhook_payloads_carry_it(
    committing_client: httpx.AsyncClient, worker: Worker, settings: Settings,
) -> None:
    hook = await destination(committing_client, kind="webhook", config={"url": "http://placeholder.invalid/"})
    receiver = FakeWebhookReceiver(hook["generated_secrets"]["secret"])
    with LiveServer(receiver) as live:
        moved = await committing_client.patch(f"/v1/destinations/{hook['id']}", headers=ADMIN, json={
            "config": {"url": live.url, "secret": hook["generated_secrets"]["secret"]}})  # a secret goes with its address
        assert moved.status_code == 200, moved.text
        news = await make_list(committing_client, double_opt_in=True)
        person = await make_contact(committing_client)
        await subscribe(committing_client, news["id"], person["id"])
        assert (await committing_client.delete(f"/v1/contacts/{person['id']}", headers=ADMIN)).status_code == 204
        await drain(worker)
    payloads = {d.payload["type"]: d.payload["data"] for d in receiver.deliveries}
    assert all(d.valid for d in receiver.deliveries)
    for topic in ("contact.created", "membership.confirmation_requested"):
        assert contact_of(payloads[topic]["preferences_url"], settings) == person["id"], topic
    assert "preferences_url" not in payloads["contact.erased"]  # nothing left to manage
