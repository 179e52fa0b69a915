"""`/v1/destinations`: kinds and their config, write-only encrypted secrets, mappings, scopes."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.security import Role
from tests.auth import bearer
from tests.factories import ADMIN, make_list
from tests.routers.test_contacts import assert_problem

MANAGER = bearer(Role.MANAGER, subject="lead@shop.example")
API_KEY = "xkeysib-0123456789abcdef0123456789abcdef"


async def create(client: httpx.AsyncClient, headers: dict[str, str] = ADMIN, **body: Any) -> httpx.Response:
    return await client.post("/v1/destinations", json={"name": f"d-{uuid.uuid4().hex[:6]}", **body}, headers=headers)


async def test_secrets_are_write_only_and_encrypted_at_rest(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]
) -> None:
    the_list = await make_list(client)
    response = await create(client, kind="brevo", config={"api_key": API_KEY, "double_opt_in_template_id": 12},
                            list_mappings=[{"list_id": the_list["id"], "remote_list_id": "7"}],
                            field_mappings={"first_name": "FIRSTNAME", "attributes.size": "SIZE"})
    assert response.status_code == 201, response.text
    created = response.json()
    assert API_KEY not in response.text
    assert created["config"] == {"double_opt_in_template_id": 12}
    assert created["secrets_set"] == ["api_key", "inbound_secret"]
    assert set(created["generated_secrets"]) == {"inbound_secret"}
    assert created["inbound_url"].endswith(f"/v1/inbound/brevo/{created['id']}")
    assert response.headers["ETag"] == '"v1"'
    shown = await client.get(f"/v1/destinations/{created['id']}", headers=ADMIN)
    assert API_KEY not in shown.text and created["generated_secrets"]["inbound_secret"] not in shown.text
    assert "generated_secrets" not in shown.json()
    listed = await client.get("/v1/destinations", headers=MANAGER)
    assert API_KEY not in listed.text and listed.json()["data"][0]["secrets_set"]
    async with sessions() as session:
        stored = (await session.execute(text("SELECT config::text, secrets FROM destination WHERE id = :i"),
                                        {"i": created["id"]})).one()
    assert API_KEY not in stored.config and API_KEY not in stored.secrets
    assert stored.secrets.startswith("gAAAA")  # a Fernet token


async def test_config_is_checked_per_kind_and_names_the_field(client: httpx.AsyncClient) -> None:
    assert_problem(await create(client, kind="brevo", config={}), 422, "config.api_key")
    assert_problem(await create(client, kind="brevo", config={"api_key": API_KEY, "apikey": "typo"}), 422,
                   "config.apikey")
    assert_problem(await create(client, kind="webhook", config={"url": "ftp://x.example"}), 422, "config.url")
    assert_problem(await create(client, kind="webhook", config={"url": "https://h.example", "secret": "nope"}), 422,
                   "config.secret")
    assert_problem(await create(client, kind="carrier-pigeon"), 422, "kind")
    assert_problem(await create(client, kind="mailchimp", config={"api_key": "k" * 20 + "-us6"},
                                list_mappings=[{"list_id": str(uuid.uuid4()), "remote_list_id": "x"}]), 422,
                   "list_mappings[0].list_id")
    assert_problem(await create(client, kind="mailchimp", config={"api_key": "k" * 20 + "-us6"},
                                field_mappings={"password": "PWD"}), 422, "field_mappings")
    made = await create(client, kind="brevo", config={"api_key": API_KEY})
    nulled = await client.patch(f"/v1/destinations/{made.json()['id']}", json={"name": None, "enabled": None},
                                headers=ADMIN)
    assert_problem(nulled, 422, "name", "enabled")  # each null named, all at once (docs/api.md, Errors)


async def test_a_mailchimp_key_names_its_data_center_unless_base_url_is_given(client: httpx.AsyncClient) -> None:
    """The API's address comes from the key's `-usN` suffix (docs/sync.md). A key without one was stored, and the
    worker's adapter then raised at every claim: its deliveries sat in flight until the lease ran out, were claimed
    again, forever, with nothing in the destination's health."""
    assert_problem(await create(client, kind="mailchimp", config={"api_key": "0123456789abcdef0123"}), 422,
                   "config.api_key")
    proxied = await create(client, kind="mailchimp", config={"api_key": "0123456789abcdef0123",
                                                             "base_url": "https://mc-proxy.shop.example/3.0"})
    assert proxied.status_code == 201, proxied.text
    assert_problem(await client.patch(f"/v1/destinations/{proxied.json()['id']}", headers=ADMIN,
                                      json={"config": {"base_url": None, "api_key": "0123456789abcdef0123"}}),
                   422, "config.api_key")


async def test_webhook_secret_is_generated_once_and_rotation_keeps_two(client: httpx.AsyncClient) -> None:
    response = await create(client, kind="webhook", config={"url": "https://hooks.shop.example/carnet"})
    created = response.json()
    secret = created["generated_secrets"]["secret"]
    assert secret.startswith("whsec_") and created["inbound_url"] is None
    assert created["secrets_set"] == ["inbound_secret", "secret"]
    rotated = await client.patch(f"/v1/destinations/{created['id']}", headers={**ADMIN, "If-Match": '"v1"'},
                                 json={"config": {"previous_secret": secret,
                                                  "secret": "whsec_" + "QUJD" * 8}})
    assert rotated.status_code == 200, rotated.text
    assert rotated.json()["secrets_set"] == ["inbound_secret", "previous_secret", "secret"]
    assert rotated.headers["ETag"] == '"v2"'
    stale = await client.patch(f"/v1/destinations/{created['id']}", json={"enabled": False},
                               headers={**ADMIN, "If-Match": '"v1"'})
    assert_problem(stale, 412)
    dropped = await client.patch(f"/v1/destinations/{created['id']}", json={"config": {"previous_secret": None}},
                                 headers=ADMIN)
    assert dropped.json()["secrets_set"] == ["inbound_secret", "secret"]


async def test_duplicate_name_delete_and_not_found(client: httpx.AsyncClient) -> None:
    first = (await create(client, kind="webhook", name="same", config={"url": "https://a.example"})).json()
    assert_problem(await create(client, kind="webhook", name="same", config={"url": "https://b.example"}), 409)
    assert (await client.delete(f"/v1/destinations/{first['id']}", headers=ADMIN)).status_code == 204
    assert_problem(await client.get(f"/v1/destinations/{first['id']}", headers=ADMIN), 404)
    assert_problem(await client.post(f"/v1/deliveries/{2**40}/retry", headers=ADMIN), 404)


async def test_resync_queues_every_member_of_the_mapped_lists(client: httpx.AsyncClient) -> None:
    the_list = await make_list(client)
    created = (await create(client, kind="mailchimp", config={"api_key": "k" * 20 + "-us6"},
                            list_mappings=[{"list_id": the_list["id"], "remote_list_id": "x"}])).json()
    assert (await client.post(f"/v1/destinations/{created['id']}/resync", headers=ADMIN)).json() == {"queued": 0}
    hook = (await create(client, kind="webhook", config={"url": "https://a.example"})).json()
    assert_problem(await client.post(f"/v1/destinations/{hook['id']}/resync", headers=ADMIN), 422, "kind")


async def test_roles(client: httpx.AsyncClient) -> None:
    for role in (Role.VIEWER, Role.EDITOR, Role.INTEGRATION):
        assert_problem(await client.get("/v1/destinations", headers=bearer(role)), 403)
    assert (await create(client, MANAGER, kind="webhook", config={"url": "https://m.example"})).status_code == 201


async def test_a_manager_never_sees_secrets_and_urls_carry_none(client: httpx.AsyncClient) -> None:
    """API.md: a manager writes destinations but never sees secrets, not even the ones Carnet generates; and a
    URL with credentials is refused, since `config` is shown to every reader."""
    made = await create(client, MANAGER, kind="webhook", config={"url": "https://m2.example"})
    assert made.status_code == 201, made.text
    assert made.json()["generated_secrets"] == {}
    assert set(made.json()["secrets_set"]) >= {"inbound_secret", "secret"}  # generated all the same
    admin_made = (await create(client, kind="webhook", config={"url": "https://a2.example"})).json()
    assert set(admin_made["generated_secrets"]) == {"inbound_secret", "secret"}
    for config in ({"url": "https://user:pw@h.example"}, {"url": "https://h.example", "base_url": "https://u:p@h.example"}):
        assert_problem(await create(client, kind="webhook", config=config), 422)


async def test_commerce_options_are_off_by_default_and_checked(client: httpx.AsyncClient) -> None:
    """push_orders, push_carts, push_events (bounded), Mailchimp's store_id (docs/sync.md, "Commerce")."""
    plain = (await create(client, kind="brevo", config={"api_key": API_KEY})).json()
    assert not {"push_orders", "push_carts", "push_events"} & set(plain["config"])
    on = await create(client, kind="brevo", config={"api_key": API_KEY, "push_orders": True, "push_carts": True,
                                                    "push_events": ["product_viewed", "wishlist.added"]})
    assert on.status_code == 201 and on.json()["config"]["push_events"] == ["product_viewed", "wishlist.added"]
    mailchimp = {"api_key": "0123456789abcdef-us6"}
    assert_problem(await create(client, kind="mailchimp", config={**mailchimp, "push_orders": True}), 422,
                   "config.store_id")
    store = await create(client, kind="mailchimp", config={**mailchimp, "push_carts": True, "store_id": "shop-1",
                                                           "store_currency": "EUR"})
    assert store.status_code == 201, store.text
    bad = {"push_orders": "yes please", "push_events": ["Not A Type"], "store_id": "a/b", "store_currency": "EURO"}
    for key, value in bad.items():
        assert_problem(await create(client, kind="mailchimp", config={**mailchimp, key: value}), 422)
    assert_problem(await create(client, kind="brevo", config={"api_key": API_KEY, "push_events": ["a"] * 2}), 422,
                   "config.push_events")
    assert_problem(await create(client, kind="brevo", config={"api_key": API_KEY,
                                                              "push_events": [f"e{i}" for i in range(21)]}), 422,
                   "config.push_events")
    assert_problem(await create(client, kind="brevo", config={"api_key": API_KEY, "store_id": "s"}), 422,
                   "config.store_id")  # a Mailchimp option
    # Mailchimp's member events take names of 2 to 30 characters (the spec's `Events.name`), "." read as "_": a
    # type outside that is refused here, not by Mailchimp at every push of every buyer (each a dead letter).
    for name in ("a", "product.viewed_in_the_catalogue"):
        assert_problem(await create(client, kind="mailchimp", config={**mailchimp, "push_events": [name]}), 422,
                       "config.push_events")
        assert (await create(client, kind="brevo", config={"api_key": API_KEY, "push_events": [name]})).status_code \
            == 201  # Brevo takes up to 255
    fits = await create(client, kind="mailchimp", config={**mailchimp, "push_events": ["ab", "e" * 30]})
    assert fits.status_code == 201, fits.text
    # A PATCH that turns orders on without a store is refused; with one it passes.
    created = store.json()
    patched = await client.patch(f"/v1/destinations/{created['id']}", json={"config": {"store_id": None}},
                                 headers=ADMIN)
    assert_problem(patched, 422, "config.store_id")


async def test_config_urls_are_bounded_and_the_bound_is_declared(client: httpx.AsyncClient) -> None:
    """Every config URL (`url`, `base_url`, `double_opt_in_redirect_url`) is at most 2,000 characters, as a cart's
    `checkout_url`: an unbounded one was stored and shown back whole to every reader (300 kB a destination)."""
    long_url = "https://hooks.shop.example/" + "a" * 300_000
    for kind, config, field in (
        ("webhook", {"url": long_url}, "config.url"),
        ("webhook", {"url": "https://h.example", "base_url": long_url}, "config.base_url"),
        ("brevo", {"api_key": API_KEY, "double_opt_in_redirect_url": long_url}, "config.double_opt_in_redirect_url"),
    ):
        answer = await create(client, kind=kind, config=config)
        assert_problem(answer, 422, field)
        assert len(answer.content) < 4096
    made = (await create(client, kind="webhook", config={"url": "https://h.example"})).json()
    patched = await client.patch(f"/v1/destinations/{made['id']}", headers=ADMIN,
                                 json={"config": {"url": long_url, "secret": "whsec_" + "QUJD" * 8}})
    assert_problem(patched, 422, "config.url")
    ok = "https://hooks.shop.example/" + "a" * (2000 - len("https://hooks.shop.example/"))
    assert (await create(client, kind="webhook", config={"url": ok})).status_code == 201
    schemas = (await client.get("/openapi.json")).json()["components"]["schemas"]
    for component, name in (("WebhookConfig", "url"), ("WebhookConfig", "base_url"), ("BrevoConfig", "base_url"),
                            ("BrevoConfig", "double_opt_in_redirect_url"), ("MailchimpConfig", "base_url")):
        declared = schemas[component]["properties"][name]
        branches = declared.get("anyOf", [declared])
        assert all(b.get("maxLength") == 2000 for b in branches if b.get("type") == "string"), (component, declared)
