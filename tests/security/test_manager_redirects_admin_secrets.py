"""Class 1: a secret goes only to the address it was given for (issue 15, finding 1).

The attack: an admin sets up a destination with a vendor secret; a manager (`destinations:write`, but secrets
are never shown to them) points the destination at a host of theirs and asks for a resync, so that the worker
sends the admin's secret there: Brevo's `api-key` header, Mailchimp's basic auth, a webhook's signatures.

Everything is real: tokens of each role, HTTP through the app, the production worker and adapters, and
spec-checking fakes on loopback for the honest vendor and for the thief's host.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.security import Role
from app.services.destinations import Loaded
from app.services.secret_targets import api_url, target
from app.settings import Settings
from app.sync.factory import build_adapter
from app.worker import Worker
from tests.auth import bearer
from tests.factories import ADMIN, PROOF, make_contact, make_list
from tests.fakes.brevo import FakeBrevo
from tests.fakes.mailchimp import FakeMailchimp
from tests.fakes.server import LiveServer
from tests.fakes.webhook_receiver import FakeWebhookReceiver
from tests.sync.keys import BREVO_KEY, MC_KEY

pytestmark = pytest.mark.committing

MANAGER = bearer(Role.MANAGER, subject="manager@shop.example")


async def _drain(worker: Worker) -> None:
    async with asyncio.timeout(60):
        await worker.drain()


async def _vendor_destination(client: httpx.AsyncClient, kind: str, key: str, base_url: str) -> dict[str, Any]:
    news = await make_list(client)
    response = await client.post("/v1/destinations", headers=ADMIN, json={
        "name": f"{kind}-{uuid.uuid4().hex[:6]}", "kind": kind, "config": {"api_key": key, "base_url": base_url},
        "list_mappings": [{"list_id": news["id"], "remote_list_id": "7" if kind == "brevo" else "mc-news"}]})
    assert response.status_code == 201, response.text
    person = await make_contact(client)
    subscribed = await client.put(f"/v1/lists/{news['id']}/members/{person['id']}", headers=ADMIN,
                                  json={"consent": {"proof": PROOF}})
    assert subscribed.status_code in (200, 201), subscribed.text
    return response.json()  # type: ignore[no-any-return]


def _refused_for(response: httpx.Response, *fields: str) -> None:
    assert response.status_code == 422, response.text
    errors = {e["field"]: e["code"] for e in response.json()["errors"]}
    assert errors == dict.fromkeys(fields, "secret_bound_to_target"), errors


@pytest.mark.parametrize("kind", ["brevo", "mailchimp"])
async def test_a_manager_cannot_send_the_admins_api_key_to_their_host(
    committing_client: httpx.AsyncClient, worker: Worker, kind: str,
) -> None:
    client = committing_client
    key = BREVO_KEY if kind == "brevo" else MC_KEY
    honest: Any = FakeBrevo(api_key=key, lists={7}) if kind == "brevo" else FakeMailchimp(api_key=key,
                                                                                              lists={"mc-news"})
    thief: Any = FakeBrevo(api_key="xkeysib-thief", lists={7}) if kind == "brevo" else FakeMailchimp(
        api_key="thief-us6", lists={"mc-news"})
    with LiveServer(honest) as honest_live, LiveServer(thief) as thief_live:
        hook = await _vendor_destination(client, kind, key, honest_live.url)
        url = f"/v1/destinations/{hook['id']}"

        # Every way of moving the key's target without giving the key again is refused, and changes nothing.
        _refused_for(await client.patch(url, headers=MANAGER, json={"config": {"base_url": thief_live.url}}),
                     "config.api_key")
        _refused_for(await client.patch(url, headers=MANAGER, json={"config": {"base_url": thief_live.url + "/"}}),
                     "config.api_key")
        # Mailchimp without base_url: the key's data center (us6.api.mailchimp.com) is a new target too.
        _refused_for(await client.patch(url, headers=MANAGER, json={"config": {"base_url": None}}), "config.api_key")
        # `kind` is not writable: a webhook's URL can never become a vendor's host for this key, nor the reverse.
        assert (await client.patch(url, headers=MANAGER, json={"kind": "webhook"})).status_code == 422
        assert (await client.get(url, headers=MANAGER)).json()["config"]["base_url"].rstrip("/") == honest_live.url

        resync = await client.post(f"{url}/resync", headers=MANAGER)
        assert resync.status_code == 202, resync.text
        await _drain(worker)
        assert thief.seen == []
        assert {s.account for s in honest.seen} == {key}

        # Moving it with a key of one's own is allowed: the thief's host then only ever sees that key.
        moved = await client.patch(url, headers=MANAGER, json={"config": {"base_url": thief_live.url,
                                                                          "api_key": thief.api_key}})
        assert moved.status_code == 200, moved.text
        assert (await client.post(f"{url}/resync", headers=MANAGER)).status_code == 202
        await _drain(worker)
        assert thief.seen and {s.account for s in thief.seen} == {thief.api_key}
    assert honest.violations == [] and thief.violations == []


async def test_a_manager_cannot_have_the_admins_webhook_secret_sign_for_their_receiver(
    committing_client: httpx.AsyncClient, worker: Worker,
) -> None:
    client = committing_client
    created = await client.post("/v1/destinations", headers=ADMIN, json={
        "name": f"hook-{uuid.uuid4().hex[:6]}", "kind": "webhook", "config": {"url": "http://placeholder.invalid/"}})
    assert created.status_code == 201, created.text
    secret = created.json()["generated_secrets"]["secret"]
    url = f"/v1/destinations/{created.json()['id']}"
    honest, thief = FakeWebhookReceiver(secret), FakeWebhookReceiver(secret)  # the thief checks with the secret
    with LiveServer(honest) as honest_live, LiveServer(thief) as thief_live:
        # The admin moves it with the secret (they know it): allowed.
        admin_move = await client.patch(url, headers=ADMIN, json={"config": {"url": honest_live.url + "/carnet",
                                                                             "secret": secret}})
        assert admin_move.status_code == 200, admin_move.text
        _refused_for(await client.patch(url, headers=MANAGER, json={"config": {"url": thief_live.url + "/x"}}),
                     "config.secret")
        # The same host with another path or query is another receiver (a shared host: Zapier, a proxy).
        _refused_for(await client.patch(url, headers=MANAGER,
                                        json={"config": {"url": honest_live.url + "/carnet?tenant=thief"}}),
                     "config.secret")
        # Nor by dropping the secret with the move: a webhook cannot be left without one.
        dropped = await client.patch(url, headers=MANAGER, json={"config": {"url": thief_live.url, "secret": None}})
        assert dropped.status_code == 422 and [e["field"] for e in dropped.json()["errors"]] == ["config.secret"]
        await make_contact(client)
        await _drain(worker)
    assert thief.deliveries == []
    assert honest.deliveries and all(d.valid for d in honest.deliveries)


async def test_a_target_changed_behind_the_api_disables_the_destination_instead_of_leaking(
    committing_client: httpx.AsyncClient, worker: Worker, engine: AsyncEngine,
) -> None:
    """Defence in depth: the sealed secrets carry the target they were given for, and the worker checks it,
    so a config changed by any path other than the API (a script, a restored row) never leaks them either."""
    client = committing_client
    honest, thief = FakeBrevo(api_key=BREVO_KEY, lists={7}), FakeBrevo(api_key="xkeysib-thief", lists={7})
    with LiveServer(honest) as honest_live, LiveServer(thief) as thief_live:
        hook = await _vendor_destination(client, "brevo", BREVO_KEY, honest_live.url)
        async with engine.begin() as connection:
            await connection.execute(text(
                "UPDATE destination SET config = jsonb_set(config, '{base_url}', to_jsonb(CAST(:url AS text))) "
                "WHERE id = :id"), {"url": thief_live.url, "id": hook["id"]})
        await _drain(worker)
        assert thief.seen == []
        health = (await client.get(f"/v1/destinations/{hook['id']}", headers=ADMIN)).json()
        assert health["enabled"] is False
        assert "api_key" in health["health"]["disabled_reason"]
        deliveries = (await client.get(f"/v1/destinations/{hook['id']}/deliveries", headers=ADMIN)).json()["data"]
        assert deliveries and {d["status"] for d in deliveries} == {"pending"}  # kept for when it is fixed


def test_without_base_url_the_key_goes_to_the_vendor_it_is_for() -> None:
    """The vendors' own addresses are the targets a key is bound to when no base_url is set (and the adapters
    are built with exactly those: before this change a Brevo destination without base_url could not be built)."""
    assert api_url("brevo", {"api_key": BREVO_KEY}) == "https://api.brevo.com/v3"
    assert api_url("mailchimp", {"api_key": "0123456789abcdef-us6"}) == "https://us6.api.mailchimp.com/3.0"
    assert target("https://US6.api.mailchimp.com:443/3.0/") == target("https://us6.api.mailchimp.com/3.0")
    row = {"id": uuid.uuid4(), "kind": "brevo", "config": {}, "list_mappings": []}
    adapter = build_adapter(Loaded(row, {"api_key": BREVO_KEY}), httpx.AsyncClient(), Settings(
        jwt_secret="x" * 32, _env_file=None))  # type: ignore[arg-type, call-arg]
    assert adapter.config.base_url == "https://api.brevo.com/v3"
