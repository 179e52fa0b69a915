"""Fake Mailchimp Marketing API 3.0 (list members, e-commerce stores, member events): spec-checked requests,
problem+json errors, state.

E-commerce (`Store`): a store needs an existing audience; a customer written for an address not on the store's
audience adds it as `subscribed` when `opt_in_status` is true, else `transactional` (Mailchimp's documented rule),
and never changes an existing member's status. Orders and carts name an existing customer and existing product
variants (400 otherwise, like Mailchimp: products first). Orders keep every status they were sent with.

Members are keyed by subscriber hash (md5 of the lower-case address; a PUT whose hash does not match its
`email_address` is a violation). `Member Exists` on POST /members and on a PATCH to an address already on
the list; `Resource Not Found` for unknown lists/members; `Forgotten Email Not Subscribed` when a
permanently deleted address is re-added by the API. More than `max_connections` simultaneous requests
per account (basic-auth password) → 429 "Too Many Requests", counted in `over_limit`. Batch subscribe
takes at most 500 members (Mailchimp's documented cap; the spec file has no maxItems).
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import JSONResponse, Response

from tests.fakes.server import FakeVendor, Seen
from tests.fakes.spec import Operation, mailchimp_spec

__all__ = ["FakeMailchimp", "Member"]

BATCH_MAX = 500


def subscriber_hash(email: str) -> str:
    return hashlib.md5(email.lower().encode(), usedforsecurity=False).hexdigest()


@dataclass
class Member:
    email_address: str
    status: str
    merge_fields: dict[str, Any] = field(default_factory=dict)
    tags: set[str] = field(default_factory=set)
    status_writes: int = 0          # requests that set `status` explicitly on an existing member

    def wire(self, list_id: str) -> dict[str, Any]:
        return {
            "id": subscriber_hash(self.email_address), "email_address": self.email_address,
            "unique_email_id": subscriber_hash(self.email_address)[:10], "status": self.status,
            "merge_fields": self.merge_fields, "list_id": list_id,
            "tags": [{"id": i, "name": t} for i, t in enumerate(sorted(self.tags))], "tags_count": len(self.tags),
        }


@dataclass
class Store:
    list_id: str
    currency: str
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    products: dict[str, dict[str, Any]] = field(default_factory=dict)     # id -> body, `variants` by id
    orders: dict[str, dict[str, Any]] = field(default_factory=dict)
    order_statuses: dict[str, list[tuple[str | None, str | None]]] = field(default_factory=dict)
    carts: dict[str, dict[str, Any]] = field(default_factory=dict)


class FakeMailchimp(FakeVendor):
    def __init__(self, *, api_key: str = "0123456789abcdef-us6", lists: set[str] | None = None,
                 max_connections: int | None = 10) -> None:
        super().__init__()
        self.spec = mailchimp_spec()
        self.api_key = api_key
        self.lists: dict[str, dict[str, Member]] = {name: {} for name in (lists or {"list1", "list2"})}
        self.max_connections = max_connections
        self.forgotten: set[tuple[str, str]] = set()
        self.archived: set[tuple[str, str]] = set()
        self.archived_members: dict[tuple[str, str], Member] = {}   # kept by Mailchimp: restorable, deletable
        self.batch_sizes: list[int] = []
        self.stores: dict[str, Store] = {}
        self.events: list[tuple[str, str, dict[str, Any]]] = []    # (list id, email, body)

    def member(self, list_id: str, email: str) -> Member | None:
        return self.lists[list_id].get(subscriber_hash(email))

    # -- FakeVendor hooks ---------------------------------------------------------------------------
    def account(self, headers: Mapping[str, str]) -> str:
        kind, _, credentials = headers.get("authorization", "").partition(" ")
        if kind.lower() == "basic":
            try:
                return base64.b64decode(credentials).decode().partition(":")[2]
            except ValueError:
                return ""
        return credentials if kind.lower() == "bearer" else ""

    def authorized(self, account: str) -> bool:
        return account == self.api_key

    def limit(self, account: str, now: float) -> Response | None:
        if self.max_connections is not None and self._in_flight[account] > self.max_connections:
            return self.error(429, "Too Many Requests", "You have exceeded the limit of 10 simultaneous connections.")
        return None

    def error(self, status: int, title: str, detail: str, headers: Mapping[str, str] | None = None) -> Response:
        return JSONResponse(
            {"type": "https://mailchimp.com/developer/marketing/docs/errors/", "title": title, "status": status,
             "detail": detail, "instance": str(uuid.uuid4())},
            status, headers=dict(headers or {}), media_type="application/problem+json",
        )

    async def handle(self, op: Operation, params: dict[str, str], query: dict[str, str], body: Any,
                     seen: Seen) -> Response:
        if op.template.startswith("/ecommerce/stores"):
            return self._store_operation(op, params, body or {}, seen)
        members = self.lists.get(params.get("list_id", ""))
        if members is None:
            return self.error(404, "Resource Not Found", "The requested resource could not be found.")
        return getattr(self, "_" + op.operation_id)(params["list_id"], members, params, body or {}, seen)

    # -- e-commerce ---------------------------------------------------------------------------------
    def _store_operation(self, op: Operation, params: dict[str, str], body: dict[str, Any], seen: Seen) -> Response:
        if op.operation_id == "postEcommerceStores":
            if body["list_id"] not in self.lists:
                return self.error(400, "Invalid Resource", "The list_id does not exist.")
            if body["id"] in self.stores:
                return self.error(400, "Invalid Resource", "A store with the provided ID already exists.")
            self.stores[body["id"]] = Store(body["list_id"], body["currency_code"])
            return JSONResponse(self._store_wire(body["id"]))
        store = self.stores.get(params["store_id"])
        if store is None:
            return self._not_found()
        if op.operation_id == "getEcommerceStoresId":
            return JSONResponse(self._store_wire(params["store_id"]))
        return getattr(self, "_" + op.operation_id)(store, params, body, seen)  # type: ignore[no-any-return]

    def _store_wire(self, store_id: str) -> dict[str, Any]:
        store = self.stores[store_id]
        return {"id": store_id, "list_id": store.list_id, "name": store_id, "currency_code": store.currency}

    def _putEcommerceStoresIdCustomersId(self, store: Store, params: dict[str, str], body: dict[str, Any],
                                         seen: Seen) -> Response:
        if body["id"] != params["customer_id"]:
            self.violation(seen, "the customer id in the path differs from the body's")
        self._upsert_customer(store, body)
        return JSONResponse(body)

    def _upsert_customer(self, store: Store, body: dict[str, Any]) -> None:
        """A customer written (by PUT, or inside an order or cart): its address joins the store's audience as
        `subscribed` with opt_in_status, else `transactional`; an existing member keeps its status."""
        key = subscriber_hash(body["email_address"])
        members = self.lists[store.list_id]
        if key not in members and (store.list_id, key) not in self.forgotten:
            status = "subscribed" if body.get("opt_in_status") else "transactional"
            members[key] = Member(body["email_address"].lower(), status)
        store.customers[body["id"]] = body

    def _deleteEcommerceStoresIdCustomersId(self, store: Store, params: dict[str, str], body: dict[str, Any],
                                            seen: Seen) -> Response:
        return self._delete(store.customers, params["customer_id"])

    def _postEcommerceStoresIdProducts(self, store: Store, params: dict[str, str], body: dict[str, Any],
                                       seen: Seen) -> Response:
        if body["id"] in store.products:
            return self.error(400, "Invalid Resource", "A product with the provided ID already exists.")
        store.products[body["id"]] = {**body, "variants": {v["id"]: v for v in body["variants"]}}
        return JSONResponse(body)

    def _patchEcommerceStoresIdProductsId(self, store: Store, params: dict[str, str], body: dict[str, Any],
                                          seen: Seen) -> Response:
        product = store.products.get(params["product_id"])
        if product is None:
            return self._not_found()
        product.update({k: v for k, v in body.items() if k != "variants"})
        return JSONResponse({**product, "variants": list(product["variants"].values())})

    def _putEcommerceStoresIdProductsIdVariantsId(self, store: Store, params: dict[str, str], body: dict[str, Any],
                                                  seen: Seen) -> Response:
        product = store.products.get(params["product_id"])
        if product is None:
            return self._not_found()
        product["variants"][params["variant_id"]] = body
        return JSONResponse(body)

    def _postEcommerceStoresIdOrders(self, store: Store, params: dict[str, str], body: dict[str, Any],
                                     seen: Seen) -> Response:
        if body["id"] in store.orders:
            return self.error(400, "Invalid Resource", "An order with the provided ID already exists.")
        problem = self._check_refs(store, body)
        if problem:
            return problem
        if "email_address" in body["customer"]:
            self._upsert_customer(store, body["customer"])
        store.orders[body["id"]] = body
        store.order_statuses.setdefault(body["id"], []).append(
            (body.get("financial_status"), body.get("fulfillment_status")))
        return JSONResponse(body)

    def _patchEcommerceStoresIdOrdersId(self, store: Store, params: dict[str, str], body: dict[str, Any],
                                        seen: Seen) -> Response:
        order = store.orders.get(params["order_id"])
        if order is None:
            return self._not_found()
        problem = self._check_refs(store, body)
        if problem:
            return problem
        order.update(body)
        store.order_statuses[params["order_id"]].append((order.get("financial_status"),
                                                         order.get("fulfillment_status")))
        return JSONResponse(order)

    def _deleteEcommerceStoresIdOrdersId(self, store: Store, params: dict[str, str], body: dict[str, Any],
                                         seen: Seen) -> Response:
        return self._delete(store.orders, params["order_id"])

    def _postEcommerceStoresIdCarts(self, store: Store, params: dict[str, str], body: dict[str, Any],
                                    seen: Seen) -> Response:
        if body["id"] in store.carts:
            return self.error(400, "Invalid Resource", "A cart with the provided ID already exists.")
        problem = self._check_refs(store, body)
        if problem:
            return problem
        if "email_address" in body["customer"]:
            self._upsert_customer(store, body["customer"])
        store.carts[body["id"]] = body
        return JSONResponse(body)

    def _patchEcommerceStoresIdCartsId(self, store: Store, params: dict[str, str], body: dict[str, Any],
                                       seen: Seen) -> Response:
        cart = store.carts.get(params["cart_id"])
        if cart is None:
            return self._not_found()
        problem = self._check_refs(store, body)
        if problem:
            return problem
        cart.update(body)
        return JSONResponse(cart)

    def _deleteEcommerceStoresIdCartsId(self, store: Store, params: dict[str, str], body: dict[str, Any],
                                        seen: Seen) -> Response:
        return self._delete(store.carts, params["cart_id"])

    def _check_refs(self, store: Store, body: dict[str, Any]) -> Response | None:
        customer = body.get("customer", {})
        if "id" in customer and customer["id"] not in store.customers and "email_address" not in customer:
            return self.error(400, "Invalid Resource", "The customer does not exist: give its email_address.")
        for line in body.get("lines", ()):
            variants = store.products.get(line["product_id"], {}).get("variants", {})
            if line["product_variant_id"] not in variants:
                return self.error(400, "Invalid Resource", "A product variant with the provided ID does not exist.")
        return None

    def _delete(self, records: dict[str, Any], key: str) -> Response:
        if records.pop(key, None) is None:
            return self._not_found()
        return Response(status_code=204)

    def _not_found(self) -> Response:
        return self.error(404, "Resource Not Found", "The requested resource could not be found.")

    # -- operations ---------------------------------------------------------------------------------
    def _postListMemberEvents(self, list_id: str, members: dict[str, Member], params: dict[str, str],
                              body: dict[str, Any], seen: Seen) -> Response:
        member = members.get(params["subscriber_hash"])
        if member is None:
            return self._not_found()
        if not 2 <= len(body["name"]) <= 30:
            self.violation(seen, "an event name has 2 to 30 characters (the spec's description)")
        self.events.append((list_id, member.email_address, body))
        return Response(status_code=204)

    def _putListsIdMembersId(self, list_id: str, members: dict[str, Member], params: dict[str, str],
                             body: dict[str, Any], seen: Seen) -> Response:
        key = params["subscriber_hash"]
        if key != subscriber_hash(body["email_address"]):
            self.violation(seen, "subscriber_hash is not md5(lower-case email_address)")
            return self.error(400, "Invalid Resource", "The subscriber hash does not match the email address.")
        member = members.get(key) or self._restore(list_id, members, key)
        if member is None:
            if (list_id, key) in self.forgotten:
                return self._forgotten(body["email_address"])
            member = members[key] = Member(body["email_address"].lower(), body.get("status") or body["status_if_new"])
        elif "status" in body:
            member.status = body["status"]
            member.status_writes += 1
        member.merge_fields.update(body.get("merge_fields", {}))
        return JSONResponse(member.wire(list_id))

    def _postListsIdMembers(self, list_id: str, members: dict[str, Member], params: dict[str, str],
                            body: dict[str, Any], seen: Seen) -> Response:
        key = subscriber_hash(body["email_address"])
        if key in members:
            return self._member_exists(body["email_address"])
        member = Member(body["email_address"].lower(), body["status"], dict(body.get("merge_fields", {})))
        members[key] = member
        return JSONResponse(member.wire(list_id))

    def _patchListsIdMembersId(self, list_id: str, members: dict[str, Member], params: dict[str, str],
                               body: dict[str, Any], seen: Seen) -> Response:
        member = members.get(params["subscriber_hash"])
        if member is None:
            return self.error(404, "Resource Not Found", "The requested resource could not be found.")
        new_email = body.get("email_address")
        if new_email and new_email.lower() != member.email_address:
            new_key = subscriber_hash(new_email)
            if new_key in members:
                return self._member_exists(new_email)
            del members[params["subscriber_hash"]]
            member.email_address = new_email.lower()
            members[new_key] = member
        if "status" in body:
            member.status = body["status"]
            member.status_writes += 1
        member.merge_fields.update(body.get("merge_fields", {}))
        return JSONResponse(member.wire(list_id))

    def _getListsIdMembersId(self, list_id: str, members: dict[str, Member], params: dict[str, str],
                             body: dict[str, Any], seen: Seen) -> Response:
        member = members.get(params["subscriber_hash"])
        if member is None:
            return self.error(404, "Resource Not Found", "The requested resource could not be found.")
        return JSONResponse(member.wire(list_id))

    def _postListMemberTags(self, list_id: str, members: dict[str, Member], params: dict[str, str],
                            body: dict[str, Any], seen: Seen) -> Response:
        member = members.get(params["subscriber_hash"])
        if member is None:
            return self.error(404, "Resource Not Found", "The requested resource could not be found.")
        for tag in body["tags"]:
            (member.tags.add if tag["status"] == "active" else member.tags.discard)(tag["name"])
        return Response(status_code=204)

    def _deleteListsIdMembersId(self, list_id: str, members: dict[str, Member], params: dict[str, str],
                                body: dict[str, Any], seen: Seen) -> Response:
        """Archive: the member leaves the audience; unlike a permanent deletion the address can be added again.
        Mailchimp keeps it (status `archived`): a PUT restores it, delete-permanent deletes it."""
        member = members.pop(params["subscriber_hash"], None)
        if member is None:
            return self.error(404, "Resource Not Found", "The requested resource could not be found.")
        self.archived.add((list_id, params["subscriber_hash"]))
        self.archived_members[(list_id, params["subscriber_hash"])] = member
        return Response(status_code=204)

    def _postListsIdMembersHashActionsDeletePermanent(self, list_id: str, members: dict[str, Member],
                                                      params: dict[str, str], body: dict[str, Any],
                                                      seen: Seen) -> Response:
        key = params["subscriber_hash"]
        if members.pop(key, None) is None and self._restore(list_id, members, key, keep=False) is None:
            return self.error(404, "Resource Not Found", "The requested resource could not be found.")
        self.forgotten.add((list_id, key))
        return Response(status_code=204)

    def _postListsId(self, list_id: str, members: dict[str, Member], params: dict[str, str],
                     body: dict[str, Any], seen: Seen) -> Response:
        batch = body["members"]
        self.batch_sizes.append(len(batch))
        if len(batch) > BATCH_MAX:
            self.violation(seen, f"batch subscribe takes at most {BATCH_MAX} members, got {len(batch)}")
            return self.error(400, "Invalid Resource", f"You may only subscribe {BATCH_MAX} members at a time.")
        created, updated, errors = [], [], []
        for item in batch:
            email = item.get("email_address", "")
            key = subscriber_hash(email)
            member = members.get(key)
            if "status" not in item or not email:
                errors.append({"email_address": email, "error": "status and email_address are required",
                               "error_code": "ERROR_GENERIC"})
            elif member is None and (list_id, key) in self.forgotten:
                errors.append({"email_address": email, "error": f"{email} was permanently deleted and cannot be "
                               "re-imported. The contact must re-subscribe to get back on the list.",
                               "error_code": "ERROR_GENERIC"})
            elif member is None:
                member = members[key] = Member(email.lower(), item["status"], dict(item.get("merge_fields", {})))
                created.append(member.wire(list_id))
            elif body.get("update_existing"):
                if member.status != item["status"]:
                    member.status_writes += 1
                member.status = item["status"]
                member.merge_fields.update(item.get("merge_fields", {}))
                updated.append(member.wire(list_id))
            else:
                errors.append({"email_address": email, "error": f"{email} is already a list member, do you want to "
                               "update? please provide update_existing:true in the request body",
                               "error_code": "ERROR_CONTACT_EXISTS"})
        return JSONResponse({"new_members": created, "updated_members": updated, "errors": errors,
                             "total_created": len(created), "total_updated": len(updated),
                             "error_count": len(errors)})

    def _restore(self, list_id: str, members: dict[str, Member], key: str, *, keep: bool = True) -> Member | None:
        """An archived member back in the audience (`keep`), or just out of the archive (deleted permanently)."""
        member = self.archived_members.pop((list_id, key), None)
        if member is not None:
            self.archived.discard((list_id, key))
            if keep:
                members[key] = member
        return member

    def _member_exists(self, email: str) -> Response:
        return self.error(400, "Member Exists", f"{email} is already a list member. Use PUT to insert or update "
                          "list members.")

    def _forgotten(self, email: str) -> Response:
        return self.error(400, "Forgotten Email Not Subscribed", f"{email} was permanently deleted and cannot be "
                          "re-imported. The contact must re-subscribe to get back on the list.")
