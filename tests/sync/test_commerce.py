"""Commerce to the vendors (issue 20): API → outbox → worker → real adapters → spec-checking fakes.

Products before orders, status changes in order, carts opened/converted/abandoned, the consent rule for carts and
events, erasure of commerce records, and an outage that loses nothing; zero spec violations (the fixtures check).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import make_sessionmaker
from app.settings import Settings
from app.worker import Worker, create_worker
from tests.factories import ADMIN, make_contact, make_list
from tests.fakes.brevo import FakeBrevo
from tests.fakes.mailchimp import FakeMailchimp
from tests.fakes.server import LiveServer
from tests.fakes.webhook_receiver import FakeWebhookReceiver
from tests.sync.keys import BREVO_KEY, MC_KEY
from tests.sync.test_end_to_end import destination, drain, subscribe

pytestmark = pytest.mark.committing


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def items(*skus: tuple[str, str, str]) -> list[dict[str, Any]]:
    return [{"sku": sku, "name": name, "category": "kitchen", "quantity": 1, "unit_price": price}
            for sku, name, price in skus]


async def put_order(client: httpx.AsyncClient, external_id: str, contact_id: str, status: str,
                    lines: list[dict[str, Any]], **extra: Any) -> None:
    total = str(sum(float(i["unit_price"]) * i["quantity"] for i in lines))
    response = await client.put(f"/v1/orders/{external_id}", headers=ADMIN, json={
        "contact": {"id": contact_id}, "placed_at": (datetime.now(UTC) - timedelta(hours=1)).isoformat(),
        "status": status, "currency": "EUR", "total_amount": f"{float(total):.2f}", "items": lines, **extra})
    assert response.status_code in (200, 201), response.text


async def put_cart(client: httpx.AsyncClient, external_id: str, contact_id: str, status: str,
                   lines: list[dict[str, Any]]) -> None:
    response = await client.put(f"/v1/carts/{external_id}", headers=ADMIN, json={
        "contact": {"id": contact_id}, "status": status, "currency": "EUR", "items": lines,
        "opened_at": (datetime.now(UTC) - timedelta(hours=2)).isoformat(),
        "checkout_url": f"https://shop.example/cart/{external_id}"})
    assert response.status_code in (200, 201), response.text


async def withdraw(client: httpx.AsyncClient, contact_id: str) -> None:
    response = await client.post(f"/v1/contacts/{contact_id}/consents", headers=ADMIN, json={
        "purpose": "email_marketing", "action": "withdrawn", "source": "preference_center"})
    assert response.status_code in (200, 201), response.text


async def event(client: httpx.AsyncClient, contact_id: str, type_: str) -> None:
    response = await client.post("/v1/events", headers=ADMIN, json={
        "contact": {"id": contact_id}, "type": type_, "occurred_at": datetime.now(UTC).isoformat(),
        "properties": {"product": "MUG", "price": 12.5, "gift": False}})
    assert response.status_code == 201, response.text


@pytest_asyncio.fixture(loop_scope="session")
async def quick_worker(engine: AsyncEngine, settings: Settings, app: FastAPI) -> AsyncIterator[Worker]:
    """A worker that retries within a tenth of a second (the outage test waits for its retries)."""
    local = settings.model_copy(update={"sync_allow_private_networks": True, "sync_call_deadline_seconds": 5.0,
                                        "delivery_backoff_base_seconds": 0.05, "delivery_backoff_cap_seconds": 0.1})
    w = create_worker(make_sessionmaker(engine), local, box=app.state.secret_box)
    yield w
    await w.aclose()


async def store_destination(client: httpx.AsyncClient, live: LiveServer, **config: Any) -> tuple[str, dict[str, Any]]:
    """A Mailchimp destination with a fresh store on `mc-news`, mapped from a new Carnet list: (store id, list)."""
    news, store = await make_list(client), uid("store")
    await destination(client, kind="mailchimp", list_mappings=[{"list_id": news["id"], "remote_list_id": "mc-news"}],
                      config={"api_key": MC_KEY, "base_url": live.url, "store_id": store, "push_orders": True,
                              **config})
    return store, news


async def subscribed(client: httpx.AsyncClient, news: dict[str, Any], n: int) -> list[dict[str, Any]]:
    people = [await make_contact(client) for _ in range(n)]
    for person in people:
        await subscribe(client, news["id"], person["id"])
    return people


async def test_mailchimp_store_products_orders_carts_and_erasure(
    committing_client: httpx.AsyncClient, worker: Worker, mailchimp: tuple[FakeMailchimp, LiveServer],
) -> None:
    fake, live = mailchimp
    client = committing_client
    store, news = await store_destination(client, live, push_carts=True, push_events=["wishlist_added"])
    [buyer], cold = await subscribed(client, news, 1), await make_contact(client)
    order_id, cart_id, lost_id = uid("O"), uid("C"), uid("C")
    await put_cart(client, cart_id, buyer["id"], "open", items(("MUG", "Mug", "12.50")))
    await put_cart(client, lost_id, buyer["id"], "open", items(("TEA", "Tea", "4.90")))
    await event(client, buyer["id"], "wishlist_added")
    await drain(worker)

    remote = fake.stores[store]                      # created on the mapped audience, in the orders' currency
    assert remote.list_id == "mc-news" and remote.currency == "EUR"
    assert remote.customers[buyer["id"]]["opt_in_status"] is True
    assert set(remote.carts) == {cart_id, lost_id} and remote.carts[cart_id]["checkout_url"].endswith(cart_id)
    assert {"MUG", "TEA"} <= set(remote.products)
    assert [(e[1], e[2]["name"]) for e in fake.events] == [(buyer["email"], "wishlist_added")]

    # The order converts the first cart (removed remotely); a status change follows; the other cart is abandoned.
    await put_order(client, order_id, buyer["id"], "paid", items(("MUG", "Mug", "12.50"), ("PAN", "Pan", "30.00")),
                    cart_external_id=cart_id)
    await put_cart(client, lost_id, buyer["id"], "abandoned", items(("TEA", "Tea", "4.90")))
    await drain(worker)
    await put_order(client, order_id, buyer["id"], "shipped", items(("MUG", "Mug", "12.50"), ("PAN", "Pan", "30.00")))
    await drain(worker)
    await put_order(client, order_id, buyer["id"], "refunded", items(("MUG", "Mug", "12.50"), ("PAN", "Pan", "30.00")))
    await drain(worker)
    assert cart_id not in remote.carts and lost_id in remote.carts
    assert remote.order_statuses[order_id] == [("paid", None), ("paid", "shipped"), ("refunded", "shipped")]
    assert remote.orders[order_id]["order_total"] == 42.5 and "PAN" in remote.products

    # A contact on no mapped list is not sent at all (no customer made for them), even with an order.
    await put_order(client, uid("O"), cold["id"], "paid", items(("MUG", "Mug", "12.50")))
    await drain(worker)
    assert cold["id"] not in remote.customers

    # Consent withdrawn: the open cart goes, no new cart or event is sent; the order data still does.
    await withdraw(client, buyer["id"])
    await put_cart(client, uid("C"), buyer["id"], "open", items(("MUG", "Mug", "12.50")))
    await event(client, buyer["id"], "wishlist_added")
    await drain(worker)
    assert remote.carts == {} and len(fake.events) == 1

    # Erasure: the customer leaves the store too, and so do its orders (their lines are what the person bought).
    assert (await client.delete(f"/v1/contacts/{buyer['id']}", headers=ADMIN)).status_code == 204
    await drain(worker)
    assert buyer["id"] not in remote.customers
    assert order_id not in remote.orders


async def test_mailchimp_product_changes_are_pushed_before_the_order_naming_them(
    committing_client: httpx.AsyncClient, worker: Worker, mailchimp: tuple[FakeMailchimp, LiveServer],
) -> None:
    fake, live = mailchimp
    client = committing_client
    store, news = await store_destination(client, live, store_currency="CHF")
    people = await subscribed(client, news, 3)
    sku = uid("SKU")
    for person in people:
        await put_order(client, uid("O"), person["id"], "paid", items((sku, "Bowl", "9.00")))
    await drain(worker)
    remote = fake.stores[store]
    assert remote.currency == "CHF" and len(remote.orders) == 3
    await put_order(client, uid("O"), people[0]["id"], "paid", items((sku, "Big bowl", "11.00")))
    await drain(worker)
    assert remote.products[sku]["title"] == "Big bowl" and remote.products[sku]["variants"][sku]["price"] == 11.0
    creations = [s for s in fake.calls("postEcommerceStoresIdProducts") if s.body["id"] == sku]
    assert len(creations) == 1  # created once, then updated


async def test_brevo_catalogue_orders_carts_events_and_consent(
    committing_client: httpx.AsyncClient, worker: Worker, brevo: tuple[FakeBrevo, LiveServer],
) -> None:
    fake, live = brevo
    client = committing_client
    news = await make_list(client)
    await destination(client, kind="brevo", list_mappings=[{"list_id": news["id"], "remote_list_id": "7"}],
                      config={"api_key": BREVO_KEY, "base_url": live.url, "push_orders": True, "push_carts": True,
                              "push_events": ["product.viewed"]})
    buyer = await make_contact(client)
    await subscribe(client, news["id"], buyer["id"])
    order_id, cart_id = uid("O"), uid("C")
    await put_cart(client, cart_id, buyer["id"], "open", items(("LAMP", "Lamp", "40.00")))
    await put_order(client, order_id, buyer["id"], "placed", items(("LAMP", "Lamp", "40.00")))
    await event(client, buyer["id"], "product.viewed")
    await event(client, buyer["id"], "page.viewed")          # not a pushed type
    await drain(worker)
    assert fake.ecommerce_active and fake.categories["kitchen"]["name"] == "kitchen"
    assert fake.products["LAMP"]["price"] == 40.0 and fake.orders_before_products == []
    assert fake.order_statuses[order_id] == [("placed", False)]            # live data: automations may run
    assert [e["event_properties"]["cart_id"] for e in fake.events_of(buyer["email"], "cart_updated")] == [cart_id]
    viewed = fake.events_of(buyer["email"], "product_viewed")
    assert len(viewed) == 1 and viewed[0]["event_properties"] == {"product": "MUG", "price": 12.5, "gift": False}
    assert fake.events_of(buyer["email"], "page_viewed") == []

    await put_order(client, order_id, buyer["id"], "paid", items(("LAMP", "Lamp", "40.00")), cart_external_id=cart_id)
    await drain(worker)
    await put_order(client, order_id, buyer["id"], "shipped", items(("LAMP", "Lamp", "40.00")))
    await drain(worker)
    assert [s for s, _ in fake.order_statuses[order_id]] == ["placed", "paid", "shipped"]
    assert [e["event_properties"]["cart_id"] for e in fake.events_of(buyer["email"], "cart_deleted")] == [cart_id]

    # Withdrawn: no cart, no event; orders still go, as historical (no automation on them).
    await withdraw(client, buyer["id"])
    await put_cart(client, uid("C"), buyer["id"], "abandoned", items(("LAMP", "Lamp", "40.00")))
    await event(client, buyer["id"], "product.viewed")
    await put_order(client, order_id, buyer["id"], "delivered", items(("LAMP", "Lamp", "40.00")))
    await drain(worker)
    assert len(fake.events_of(buyer["email"], "cart_updated")) == 1
    assert len(fake.events_of(buyer["email"], "product_viewed")) == 1
    assert fake.order_statuses[order_id][-1] == ("delivered", True)


async def test_brevo_events_carry_only_the_property_keys_brevo_takes_at_every_depth(
    committing_client: httpx.AsyncClient, worker: Worker, brevo: tuple[FakeBrevo, LiveServer],
) -> None:
    """Brevo limits event property keys, "top level properties and nested properties", to letters, digits, - and _.
    Only top-level keys were filtered: a nested "sku.code" made Brevo refuse the event (400), the contact's push
    ended dead, and every later push of that contact carried the same event again and died too."""
    fake, live = brevo
    client = committing_client
    news = await make_list(client)
    await destination(client, kind="brevo", list_mappings=[{"list_id": news["id"], "remote_list_id": "7"}],
                      config={"api_key": BREVO_KEY, "base_url": live.url, "push_events": ["product.viewed"]})
    buyer = await make_contact(client)
    await subscribe(client, news["id"], buyer["id"])
    response = await client.post("/v1/events", headers=ADMIN, json={
        "contact": {"id": buyer["id"]}, "type": "product.viewed", "occurred_at": datetime.now(UTC).isoformat(),
        "properties": {"product": {"sku.code": "MUG-1", "name": "Mug"}, "tags": [{"a b": 1, "ok": 2}], "n": 3}})
    assert response.status_code == 201, response.text
    await drain(worker)
    [viewed] = fake.events_of(buyer["email"], "product_viewed")
    assert viewed["event_properties"] == {"product": {"name": "Mug"}, "tags": [{"ok": 2}], "n": 3}


async def test_brevo_gets_money_stats_as_numbers(
    committing_client: httpx.AsyncClient, worker: Worker, brevo: tuple[FakeBrevo, LiveServer],
) -> None:
    """A money stat mapped to a Brevo attribute (a number attribute at Brevo) went as the text "40.00": Brevo ignores
    "values that don't match the attribute type" (createContact/updateContact `attributes`), so the total spent
    never reached Brevo's segments. docs/sync.md: attribute values are numbers, strings, booleans or lists."""
    fake, live = brevo
    client = committing_client
    news = await make_list(client)
    await destination(client, kind="brevo", list_mappings=[{"list_id": news["id"], "remote_list_id": "7"}],
                      field_mappings={"stats.total_spent": "TOTAL_SPENT", "stats.orders_count": "ORDERS"},
                      config={"api_key": BREVO_KEY, "base_url": live.url})
    buyer = await make_contact(client)
    await subscribe(client, news["id"], buyer["id"])
    await put_order(client, uid("O"), buyer["id"], "paid", items(("LAMP", "Lamp", "40.00")))
    await drain(worker)
    attributes = fake.by_email(buyer["email"]).attributes  # type: ignore[union-attr]
    assert attributes["TOTAL_SPENT"] == 40.0 and attributes["ORDERS"] == 1


async def test_a_vendor_outage_loses_no_order(
    committing_client: httpx.AsyncClient, quick_worker: Worker, mailchimp: tuple[FakeMailchimp, LiveServer],
) -> None:
    fake, live = mailchimp
    client = committing_client
    store, news = await store_destination(client, live)
    people = await subscribed(client, news, 5)
    fake.down = True
    orders = {}
    for person in people:
        for status in ("placed", "paid"):
            orders.setdefault(person["id"], uid("O"))
            await put_order(client, orders[person["id"]], person["id"], status, items(("CUP", "Cup", "3.00")))
    async with asyncio.timeout(10):
        await quick_worker.deliver_once()        # everything refused (503), put back for later
    assert store not in fake.stores
    fake.down = False
    async with asyncio.timeout(60):
        while len(fake.stores.get(store, None).orders if store in fake.stores else ()) < len(people):
            await quick_worker.deliver_once()
            await asyncio.sleep(0.05)
    remote = fake.stores[store]
    assert {o["id"] for o in remote.orders.values()} == set(orders.values())
    assert all(o["financial_status"] == "paid" for o in remote.orders.values())


async def test_mailchimp_erasure_deletes_the_customer_and_open_carts(
    committing_client: httpx.AsyncClient, worker: Worker, mailchimp: tuple[FakeMailchimp, LiveServer],
) -> None:
    fake, live = mailchimp
    client = committing_client
    store, news = await store_destination(client, live, push_carts=True)
    person, other = await subscribed(client, news, 2)
    carts = {c["id"]: uid("C") for c in (person, other)}
    for contact in (person, other):
        await put_cart(client, carts[contact["id"]], contact["id"], "open", items(("JAR", "Jar", "2.00")))
        await put_order(client, uid("O"), contact["id"], "paid", items(("JAR", "Jar", "2.00")))
    await drain(worker)
    remote = fake.stores[store]
    assert set(remote.carts) == set(carts.values()) and {person["id"], other["id"]} <= set(remote.customers)
    assert (await client.delete(f"/v1/contacts/{person['id']}", headers=ADMIN)).status_code == 204
    await drain(worker)
    assert set(remote.carts) == {carts[other["id"]]} and person["id"] not in remote.customers
    assert other["id"] in remote.customers and fake.member("mc-news", person["email"]) is None


async def test_mailchimp_erasure_deletes_the_customer_carts_and_orders_of_a_contact_merged_into_the_person(
    committing_client: httpx.AsyncClient, worker: Worker, mailchimp: tuple[FakeMailchimp, LiveServer],
) -> None:
    """A duplicate that bought (its own Mailchimp customer, under its address, and its cart) is merged into the
    person, then the person is erased: every customer and cart of theirs leaves the store. The merge's delivery
    used to forget the duplicate's commerce records without deleting them, so the erasure no longer knew them."""
    fake, live = mailchimp
    client = committing_client
    store, news = await store_destination(client, live, push_carts=True)
    person, duplicate = await subscribed(client, news, 2)
    cart, order, own_order = uid("C"), uid("O"), uid("O")
    await put_order(client, order, duplicate["id"], "paid", items(("JAR", "Jar", "2.00")))
    await put_order(client, own_order, person["id"], "paid", items(("JAR", "Jar", "2.00")))
    await put_cart(client, cart, duplicate["id"], "open", items(("JAR", "Jar", "2.00")))
    await drain(worker)
    remote = fake.stores[store]
    assert duplicate["id"] in remote.customers and cart in remote.carts and {order, own_order} <= set(remote.orders)
    response = await client.post(f"/v1/contacts/{person['id']}/merge", json={"duplicate_id": duplicate["id"]},
                                 headers=ADMIN)
    assert response.status_code == 200, response.text
    await drain(worker)
    assert (await client.delete(f"/v1/contacts/{person['id']}", headers=ADMIN)).status_code == 204
    await drain(worker)
    assert {person["id"], duplicate["id"]} & set(remote.customers) == set()
    assert cart not in remote.carts
    assert {order, own_order} & set(remote.orders) == set()  # the orders too, the duplicate's included


async def test_mailchimp_erasure_deletes_the_store_records_of_a_person_with_no_member_left_to_delete(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, worker: Worker,
    mailchimp: tuple[FakeMailchimp, LiveServer],
) -> None:
    """The person's member is no longer theirs (their address was removed in Carnet, then given to a newcomer whose
    push restored the member) and the deliveries that once pushed them were purged: the store's customer and order
    of the person are still at Mailchimp, and the erasure must reach them all the same. It used to send nothing
    (no member to delete: no erasure at all, and the commerce rows forgotten)."""
    fake, live = mailchimp
    client = committing_client
    store, news = await store_destination(client, live)
    [person] = await subscribed(client, news, 1)
    order = uid("O")
    await put_order(client, order, person["id"], "paid", items(("JAR", "Jar", "2.00")))
    await drain(worker)
    remote = fake.stores[store]
    assert person["id"] in remote.customers and order in remote.orders
    response = await client.patch(f"/v1/contacts/{person['id']}", headers=ADMIN,
                                  json={"email": None, "phone": "+33612345678"})
    assert response.status_code == 200, response.text
    await drain(worker)                              # the member archived (a retired record of the person)
    newcomer = await make_contact(client, email=person["email"])
    await subscribe(client, news["id"], newcomer["id"])
    await drain(worker)                              # the newcomer's push restores it: no longer the person's
    assert fake.member("mc-news", person["email"]) is not None
    async with make_sessionmaker(engine)() as session, session.begin():  # as the outbox retention purges them
        await session.execute(text("DELETE FROM delivery WHERE contact_id = :c AND status = 'delivered'"),
                              {"c": person["id"]})

    assert (await client.delete(f"/v1/contacts/{person['id']}", headers=ADMIN)).status_code == 204
    await drain(worker)

    assert person["id"] not in remote.customers and order not in remote.orders
    assert fake.member("mc-news", person["email"]) is not None   # the newcomer's member stays
    async with make_sessionmaker(engine)() as session:
        assert await session.scalar(text("SELECT count(*) FROM sync_commerce WHERE contact_id = :c"),
                                    {"c": person["id"]}) == 0


async def test_mailchimp_erasure_deletes_the_store_records_of_a_merged_record_with_no_member(
    committing_client: httpx.AsyncClient, worker: Worker, mailchimp: tuple[FakeMailchimp, LiveServer],
) -> None:
    """A duplicate whose member went to someone else (its address removed, then taken by a newcomer) but whose
    customer and order stay in the store is merged into the person; the person is erased: the duplicate's store
    records go too, though no member of the duplicate is left to delete."""
    fake, live = mailchimp
    client = committing_client
    store, news = await store_destination(client, live)
    person, duplicate = await subscribed(client, news, 2)
    order = uid("O")
    await put_order(client, order, duplicate["id"], "paid", items(("JAR", "Jar", "2.00")))
    await drain(worker)
    response = await client.patch(f"/v1/contacts/{duplicate['id']}", headers=ADMIN,
                                  json={"email": None, "phone": "+33612345679"})
    assert response.status_code == 200, response.text
    await drain(worker)
    newcomer = await make_contact(client, email=duplicate["email"])
    await subscribe(client, news["id"], newcomer["id"])
    await drain(worker)
    response = await client.post(f"/v1/contacts/{person['id']}/merge", json={"duplicate_id": duplicate["id"]},
                                 headers=ADMIN)
    assert response.status_code == 200, response.text
    await drain(worker)
    remote = fake.stores[store]
    assert duplicate["id"] in remote.customers and order in remote.orders

    assert (await client.delete(f"/v1/contacts/{person['id']}", headers=ADMIN)).status_code == 204
    await drain(worker)

    assert duplicate["id"] not in remote.customers and order not in remote.orders
    assert fake.member("mc-news", duplicate["email"]) is not None   # the newcomer's


async def test_mailchimp_erasure_deletes_the_member_the_store_made_on_its_own_audience(
    committing_client: httpx.AsyncClient, worker: Worker, mailchimp: tuple[FakeMailchimp, LiveServer],
) -> None:
    """The store's audience (`store_list_id`) is not a mapped list: writing the customer added the person there
    (Mailchimp's rule: a `transactional` member). Only the mapped lists' members used to be deleted: the store's
    audience kept the person's address."""
    fake, live = mailchimp
    client = committing_client
    store, news = await store_destination(client, live, store_list_id="mc-vip")
    [person] = await subscribed(client, news, 1)
    await put_order(client, uid("O"), person["id"], "paid", items(("JAR", "Jar", "2.00")))
    await drain(worker)
    assert fake.member("mc-vip", person["email"]) is not None and person["id"] in fake.stores[store].customers

    assert (await client.delete(f"/v1/contacts/{person['id']}", headers=ADMIN)).status_code == 204
    await drain(worker)

    assert fake.member("mc-vip", person["email"]) is None and fake.member("mc-news", person["email"]) is None
    assert person["id"] not in fake.stores[store].customers


async def test_webhooks_get_commerce_topics_only_when_named(committing_client: httpx.AsyncClient,
                                                             worker: Worker) -> None:
    client = committing_client
    named = await destination(client, kind="webhook", config={
        "url": "http://placeholder.invalid/", "topics": ["commerce.order_changed", "commerce.cart_changed"]})
    every = await destination(client, kind="webhook", config={"url": "http://placeholder.invalid/"})
    receivers = {d["id"]: FakeWebhookReceiver(d["generated_secrets"]["secret"]) for d in (named, every)}
    with LiveServer(receivers[named["id"]]) as first, LiveServer(receivers[every["id"]]) as second:
        for hook, live in ((named, first), (every, second)):
            response = await client.patch(f"/v1/destinations/{hook['id']}", headers=ADMIN, json={"config": {
                "url": live.url + "/carnet", "secret": hook["generated_secrets"]["secret"]}})
            assert response.status_code == 200, response.text
        person = await make_contact(client)
        order_id, cart_id = uid("O"), uid("C")
        await put_cart(client, cart_id, person["id"], "open", items(("MUG", "Mug", "12.50")))
        await put_order(client, order_id, person["id"], "paid", items(("MUG", "Mug", "12.50")),
                        cart_external_id=cart_id)
        await drain(worker)
    got = [(d.payload["type"], d.payload["data"].get("external_id")) for d in receivers[named["id"]].deliveries]
    # The cart opened, the order, and the cart converted by it (ids only), in the order they were written.
    assert got == [("commerce.cart_changed", cart_id), ("commerce.order_changed", order_id),
                   ("commerce.cart_changed", cart_id)]
    assert [d.payload["type"] for d in receivers[every["id"]].deliveries] == ["contact.created"]


async def test_mailchimp_customer_opt_in_follows_the_membership_and_subscribes_no_one(
    committing_client: httpx.AsyncClient, worker: Worker, mailchimp: tuple[FakeMailchimp, LiveServer],
) -> None:
    """A buyer synced through another audience (mc-vip) is a customer with opt_in_status false on the store's
    audience (mc-news): Mailchimp makes them a transactional member there, never a subscribed one."""
    fake, live = mailchimp
    client = committing_client
    news, vip = await make_list(client), await make_list(client)
    store = uid("store")
    await destination(client, kind="mailchimp", list_mappings=[
        {"list_id": news["id"], "remote_list_id": "mc-news"}, {"list_id": vip["id"], "remote_list_id": "mc-vip"}],
        config={"api_key": MC_KEY, "base_url": live.url, "store_id": store, "push_orders": True})
    buyer = await make_contact(client)
    await subscribe(client, vip["id"], buyer["id"])
    await put_order(client, uid("O"), buyer["id"], "paid", items(("MUG", "Mug", "12.50")))
    await drain(worker)
    remote = fake.stores[store]
    assert remote.list_id == "mc-news" and remote.customers[buyer["id"]]["opt_in_status"] is False
    assert fake.member("mc-news", buyer["email"]).status == "transactional"  # type: ignore[union-attr]
    assert fake.member("mc-vip", buyer["email"]).status == "subscribed"  # type: ignore[union-attr]
