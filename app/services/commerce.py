"""What each pushed contact owes a vendor's e-commerce side, and what the vendor is known to hold (sync_commerce).

The rules (docs/sync.md, "Commerce"):
- orders (`push_orders`): every order of the contact not yet sent in its current form, oldest first; a status
  change is a new form, so the vendor follows paid → shipped → refunded in Carnet's order (per contact, pushes
  never overlap: the head-of-line rule of `delivery`).
- carts (`push_carts`) and events (`push_events`): only for a person with a current email_marketing grant and a
  deliverable address. Without it no cart goes, and a cart the vendor holds is removed (no abandoned-cart email);
  events of a time without a grant are skipped for good (never sent later).
- products: those the lines of the orders and carts above name, new or changed since last sent, before them.
- Mailchimp customer: the contact, written before its first order or cart, again when its address or
  `opt_in_status` (its membership of the store's audience, never a subscription) changed.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping, Sequence
from datetime import timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.models.base import utc_now
from app.sync.base import ContactState
from app.sync.commerce import CartPush, CommerceState, EventPush, OrderPush, Product, Record, digest, lines_of

__all__ = ["EVENTS_PER_PUSH", "EVENT_MAX_AGE", "Held", "attach", "enabled", "forget_people", "held", "remember",
           "store_list_id"]

EVENTS_PER_PUSH = 100                 # the newest; older ones of the same push are skipped
EVENT_MAX_AGE = timedelta(days=30)    # a first push does not replay a person's whole history as automations
Row = Mapping[str, Any]


def enabled(config: Mapping[str, Any]) -> bool:
    return bool(config.get("push_orders") or config.get("push_carts") or config.get("push_events"))


def store_list_id(destination: Row) -> str | None:
    """The audience of the Mailchimp store: `store_list_id`, else the first mapped list."""
    config, mappings = destination["config"], destination["list_mappings"]
    return config.get("store_list_id") or (mappings[0]["remote_list_id"] if mappings else None)


async def attach(session: AsyncSession, destination: Row, states: Sequence[ContactState],
                 may_market: Mapping[uuid.UUID, bool]) -> list[ContactState]:
    """The states with their commerce part (None where nothing is owed)."""
    config = destination["config"]
    if not states or not enabled(config):
        return list(states)
    ids = [s.contact_id for s in states]
    known = await _known(session, destination["id"], ids)
    orders = await _rows(session, 'SELECT * FROM "order" WHERE contact_id = ANY(:ids) ORDER BY placed_at, external_id',
                         ids) if config.get("push_orders") else {}
    carts = await _rows(session, "SELECT * FROM cart WHERE contact_id = ANY(:ids) ORDER BY opened_at, external_id",
                        ids) if config.get("push_carts") else {}
    events = await _events(session, ids, config.get("push_events") or [], known)
    products = await _products(session, destination["id"], [*_flatten(orders), *_flatten(carts)])
    store_list = store_list_id(destination) if destination["kind"] == "mailchimp" else None
    out = []
    for state in states:
        commerce = _owed(state, may_market.get(state.contact_id, False), orders.get(state.contact_id, []),
                         carts.get(state.contact_id, []), events.get(state.contact_id, []), known, products,
                         store_list)
        out.append(dataclasses.replace(state, commerce=commerce) if commerce is not None else state)
    return out


def _owed(state: ContactState, may_market: bool, orders: list[Row], carts: list[Row], events: list[Row],
          known: Mapping[tuple[str, str], str], products: Mapping[str, tuple[Product, str]],
          store_list: str | None) -> CommerceState | None:
    records: list[Record] = []
    order_pushes = []
    for row in orders:
        record = Record("order", row["external_id"], state.contact_id, digest(
            [row["status"], row["currency"], row["total_amount"], row["items"], row["placed_at"]]))
        if known.get(("order", record.ref)) != record.digest:
            records.append(record)
            order_pushes.append(OrderPush(row["external_id"], row["status"], row["currency"], row["total_amount"],
                                          row["placed_at"], row["updated_at"], lines_of(row["items"]),
                                          known=("order", record.ref) in known))
    cart_pushes = []
    for row in carts:
        # Without a grant a cart is only ever removed at the vendor; a converted one too (the order replaces it).
        keep = may_market and row["status"] != "converted"
        record = Record("cart", row["external_id"], state.contact_id, digest(
            [row["status"] if keep else "removed", row["currency"], row["total_amount"], row["items"],
             row["checkout_url"]]))
        was = known.get(("cart", record.ref))
        if was == record.digest or (was is None and not keep):
            continue
        records.append(record)
        cart_pushes.append(CartPush(row["external_id"], row["status"] if keep else "removed", row["currency"],
                                    row["total_amount"], row["checkout_url"], lines_of(row["items"]),
                                    known=was is not None))
    event_pushes = []
    if events:
        records.append(Record("event", str(state.contact_id), state.contact_id, str(max(e["id"] for e in events))))
        if may_market:
            oldest = utc_now() - EVENT_MAX_AGE
            event_pushes = [EventPush(e["id"], e["type"], e["occurred_at"], e["properties"])
                            for e in events[-EVENTS_PER_PUSH:] if e["occurred_at"] >= oldest]
    named = {line.sku for push in (*order_pushes, *cart_pushes) if push.status != "removed" for line in push.lines}
    needed = tuple(products[sku][0] for sku in sorted(named) if sku in products)
    records += [Record("product", p.sku, None, products[p.sku][1]) for p in needed]
    customer = None
    if store_list is not None and (order_pushes or any(c.status != "removed" for c in cart_pushes)):
        opt_in = not state.marketing_blocked and state.lists.get(store_list) == "subscribed"
        wanted = Record("customer", str(state.contact_id), state.contact_id, digest([state.email, opt_in]))
        if known.get(("customer", wanted.ref)) != wanted.digest:
            customer = wanted
            records.append(customer)
    if not (order_pushes or cart_pushes or event_pushes or records):
        return None
    return CommerceState(may_market=may_market, products=needed, orders=tuple(order_pushes),
                         carts=tuple(cart_pushes), events=tuple(event_pushes), customer=customer,
                         records=tuple(records))


async def _known(session: AsyncSession, destination_id: uuid.UUID, ids: list[uuid.UUID]
                 ) -> dict[tuple[str, str], str]:
    """(kind, ref) -> digest of what the vendor holds of these contacts."""
    rows = await session.execute(text(
        "SELECT kind, ref, digest FROM sync_commerce WHERE destination_id = :d AND contact_id = ANY(:ids)"),
        {"d": destination_id, "ids": ids})
    return {(kind, ref): value for kind, ref, value in rows.all()}


async def _rows(session: AsyncSession, query: str, ids: list[uuid.UUID]) -> dict[uuid.UUID, list[Row]]:
    found: dict[uuid.UUID, list[Row]] = {}
    for row in (await session.execute(text(query), {"ids": ids})).mappings():
        found.setdefault(row["contact_id"], []).append(row)
    return found


async def _events(session: AsyncSession, ids: list[uuid.UUID], types: list[str],
                  known: Mapping[tuple[str, str], str]) -> dict[uuid.UUID, list[Row]]:
    """Events of these types after the last one each contact's pushes covered."""
    if not types:
        return {}
    after = [int(known.get(("event", str(i)), "0")) for i in ids]
    rows = await session.execute(text("""
        SELECT e.id, e.contact_id, e.type, e.occurred_at, e.properties
        FROM event e JOIN unnest(CAST(:ids AS uuid[]), CAST(:after AS bigint[])) AS f(contact_id, after_id)
             ON e.contact_id = f.contact_id AND e.id > f.after_id
        WHERE e.type = ANY(:types) ORDER BY e.id
    """), {"ids": ids, "after": after, "types": list(types)})
    found: dict[uuid.UUID, list[Row]] = {}
    for row in rows.mappings():
        found.setdefault(row["contact_id"], []).append(row)
    return found


def _flatten(rows: Mapping[uuid.UUID, list[Row]]) -> list[Row]:
    return [row for group in rows.values() for row in group]


async def _products(session: AsyncSession, destination_id: uuid.UUID, rows: Sequence[Row]
                    ) -> dict[str, tuple[Product, str]]:
    """sku -> (product as the latest line naming it says, its digest), for the skus the vendor lacks in that form."""
    latest: dict[str, Product] = {}
    for row in sorted(rows, key=lambda r: r.get("placed_at") or r["opened_at"]):
        for item in row["items"]:
            sku = str(item["sku"])
            latest[sku] = Product(sku, item.get("name"), item.get("category"), Decimal(str(item["unit_price"])))
    if not latest:
        return {}
    sent = dict((await session.execute(text(
        "SELECT ref, digest FROM sync_commerce WHERE destination_id = :d AND kind = 'product' AND ref = ANY(:skus)"),
        {"d": destination_id, "skus": list(latest)})).all())
    out = {}
    for sku, product in latest.items():
        value = digest([product.name, product.category, product.price])
        if sent.get(sku) != value:
            out[sku] = (dataclasses.replace(product, known=sku in sent), value)
    return out


async def remember(session: AsyncSession, destination_id: uuid.UUID, records: Sequence[Record]) -> None:
    """What the vendor took: the next push sends only what changed since."""
    if not records:
        return
    latest = {(r.kind, r.ref): r for r in records}  # one row per key (two lanes may name one product)
    await session.execute(text("""
        INSERT INTO sync_commerce (destination_id, kind, ref, contact_id, digest, synced_at)
        SELECT :d, k, r, c, g, :now
        FROM unnest(CAST(:kinds AS text[]), CAST(:refs AS text[]), CAST(:contacts AS uuid[]), CAST(:digests AS text[]))
             AS u(k, r, c, g)
        ON CONFLICT (destination_id, kind, ref) DO UPDATE SET contact_id = excluded.contact_id,
                                                             digest = excluded.digest, synced_at = excluded.synced_at
    """), {"d": destination_id, "now": utc_now(), "kinds": [k for k, _ in latest], "refs": [r for _, r in latest],
           "contacts": [r.contact_id for r in latest.values()], "digests": [r.digest for r in latest.values()]})


# Each merged-away contact of :ids (`start`) with every contact its merges lead to, `depth` steps on: the person is
# the one at the greatest depth (merges of merges; 100 steps at most). Read by delivery._FATES too.
MERGE_CHAINS = """
WITH RECURSIVE chain(start, id, depth) AS (
    SELECT merged_id, survivor_id, 1 FROM contact_merge WHERE merged_id = ANY(:ids)
    UNION ALL
    SELECT chain.start, m.survivor_id, chain.depth + 1 FROM contact_merge m JOIN chain ON m.merged_id = chain.id
    WHERE chain.depth < 100
)"""

# The other way: each of `:ids` (a root) and every record merged into it, merges of merges too, as people(root, id)
# (the root's own row included).
MERGED_PEOPLE = """
WITH RECURSIVE people(root, id) AS (
    SELECT r, r FROM unnest(CAST(:ids AS uuid[])) AS r
    UNION
    SELECT p.root, m.merged_id FROM contact_merge m JOIN people p ON m.survivor_id = p.id
)"""

# The rows of a contact merged into someone still in Carnet (the end of its chain of merges) go to that person.
_HAND_OVER = text(MERGE_CHAINS + """, person AS (
    SELECT DISTINCT ON (start) start, id FROM chain ORDER BY start, depth DESC
)
UPDATE sync_commerce s SET contact_id = person.id
FROM person JOIN contact c ON c.id = person.id
WHERE s.destination_id = :d AND s.contact_id = person.start
""")  # noqa: S608 (constant SQL: no value is formatted in)


async def forget_people(session: AsyncSession, destination_id: uuid.UUID, contact_ids: Sequence[uuid.UUID]) -> None:
    """After a confirmed erasure, or a merge's: nothing of these people is known to be at the vendor any more under
    their own id. A contact merged into someone still in Carnet hands its records (its Mailchimp customer, carts,
    orders) over to that person rather than forgetting them: the vendor keeps them, and only the person's erasure
    can find them to delete them."""
    if contact_ids:
        values = {"d": destination_id, "ids": list(contact_ids)}
        await session.execute(_HAND_OVER, values)
        # A contact still in Carnet (its address removed: its member archived) keeps its store records, at the vendor
        # and here, for its next push or its erasure.
        await session.execute(text(
            "DELETE FROM sync_commerce s WHERE s.destination_id = :d AND s.contact_id = ANY(:ids) "
            "AND NOT EXISTS (SELECT 1 FROM contact c WHERE c.id = s.contact_id)"), values)


@dataclasses.dataclass(frozen=True, slots=True)
class Held:
    """What a vendor holds of one erased person's commerce: the records an erasure deletes, and the contacts (they and
    those merged into them) whose `sync_commerce` rows go once the vendor confirmed."""

    records: tuple[tuple[str, str], ...]
    owners: tuple[uuid.UUID, ...]


async def held(session: AsyncSession, destination_id: uuid.UUID, contact_ids: Sequence[uuid.UUID]
               ) -> dict[uuid.UUID, Held]:
    """Per (erased) person, (kind, ref) of the carts, orders and customers the vendor holds of them and of every
    contact merged into them (merges of merges too), whether or not a member of theirs is left to delete: in that
    order (the customers last: their orders and carts name them)."""
    records: dict[uuid.UUID, list[tuple[str, str]]] = {}
    owners: dict[uuid.UUID, dict[uuid.UUID, None]] = {}
    if contact_ids:
        for root, owner, kind, ref in (await session.execute(_HELD, {"d": destination_id,
                                                                      "ids": list(contact_ids)})).all():
            records.setdefault(root, []).append((kind, ref))
            owners.setdefault(root, {})[owner] = None
    return {c: Held(tuple(refs), tuple(owners[c])) for c, refs in records.items()}


_HELD = text(MERGED_PEOPLE + """
SELECT p.root, p.id, s.kind, s.ref FROM people p
JOIN sync_commerce s ON s.destination_id = :d AND s.contact_id = p.id AND s.kind IN ('cart', 'order', 'customer')
ORDER BY p.root, array_position(ARRAY['cart', 'order', 'customer'], s.kind), s.ref
""")
