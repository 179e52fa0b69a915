"""Fake Brevo API v3 (contacts, e-commerce, events): spec-checked requests, vendor-like answers, state, 10 req/s.

E-commerce: products and categories need `POST /ecommerce/activate` first (400 before, as Brevo answers an
account without the app); an order naming a product the fake does not hold is recorded in
`orders_before_products` (Carnet's rule: products first). Orders keep every status they were sent with, in order.

Answers follow the spec: 201 `{id}` / 204 for createContact, 204 for update/delete, 201 `{contacts: {success,
failure}}` for list add/remove, 400/404 `{code, message}`. Like Brevo, a list add/remove where no address
changes anything is a 400 ("Contact already in list and/or does not exist"). Over the rate limit (per
`api-key`, sliding second) the answer is 429 with `x-sib-ratelimit-limit/-remaining/-reset`.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import JSONResponse, Response

from tests.fakes.server import FakeVendor, Seen
from tests.fakes.spec import Operation, brevo_spec

__all__ = ["FakeBrevo", "RemoteContact"]


@dataclass
class RemoteContact:
    id: int
    email: str
    attributes: dict[str, Any] = field(default_factory=dict)
    email_blacklisted: bool = False
    list_ids: set[int] = field(default_factory=set)


class FakeBrevo(FakeVendor):
    def __init__(self, *, api_key: str = "xkeysib-test", lists: set[int] | None = None,
                 rate_limit: int | None = 10) -> None:
        super().__init__()
        self.spec = brevo_spec()
        self.api_key = api_key
        self.lists = set(lists or {1, 2, 3})
        self.rate_limit = rate_limit
        self.contacts: dict[int, RemoteContact] = {}
        self._by_email: dict[str, RemoteContact] = {}
        self.doi_requests: list[dict[str, Any]] = []
        self.deleted: list[str] = []
        self._next_id = 1
        self._window: dict[str, deque[float]] = {}
        self.ecommerce_active = False
        self.categories: dict[str, dict[str, Any]] = {}
        self.products: dict[str, dict[str, Any]] = {}
        self.orders: dict[str, dict[str, Any]] = {}
        self.order_statuses: dict[str, list[tuple[str, bool]]] = {}   # order id -> [(status, historical)]
        self.orders_before_products: list[str] = []
        self.events: list[dict[str, Any]] = []

    # -- views for tests ----------------------------------------------------------------------------
    def by_email(self, email: str) -> RemoteContact | None:
        return self._by_email.get(email.lower())  # an index: a linear scan stalled the fake at 30k contacts

    def put(self, contact: RemoteContact) -> None:
        """A contact the vendor already holds, with the id it has there."""
        self.contacts[contact.id] = contact
        self._by_email[contact.email] = contact
        self._next_id = max(self._next_id, contact.id + 1)

    def seed(self, emails: list[str]) -> None:
        """Contacts the vendor already holds (benches): ids 1..n in order."""
        for email in emails:
            self._create(email, {})

    def members(self, list_id: int) -> set[str]:
        return {c.email for c in self.contacts.values() if list_id in c.list_ids}

    def confirm_doi(self, email: str) -> None:
        """The person clicks the DOI mail: the contact exists and joins the lists asked for."""
        request = next(r for r in reversed(self.doi_requests) if r["email"] == email)
        contact = self.by_email(email) or self._create(email, request.get("attributes", {}))
        contact.list_ids |= set(request["includeListIds"])

    # -- FakeVendor hooks ---------------------------------------------------------------------------
    def account(self, headers: Mapping[str, str]) -> str:
        return headers.get("api-key", "")

    def authorized(self, account: str) -> bool:
        return account == self.api_key

    def limit(self, account: str, now: float) -> Response | None:
        if self.rate_limit is None:
            return None
        window = self._window.setdefault(account, deque())
        while window and now - window[0] >= 1.0:
            window.popleft()
        if len(window) >= self.rate_limit:
            reset = max(1, math.ceil(1.0 - (now - window[0])))
            return self.error(429, "too_many_requests", "Too many requests", {
                "x-sib-ratelimit-limit": str(self.rate_limit), "x-sib-ratelimit-remaining": "0",
                "x-sib-ratelimit-reset": str(reset)})
        window.append(now)
        return None

    def error(self, status: int, title: str, detail: str, headers: Mapping[str, str] | None = None) -> Response:
        codes = {400: "invalid_parameter", 401: "unauthorized", 404: "document_not_found"}
        return JSONResponse({"code": codes.get(status, title), "message": detail}, status, headers=dict(headers or {}))

    async def handle(self, op: Operation, params: dict[str, str], query: dict[str, str], body: Any,
                     seen: Seen) -> Response:
        if op.template == "/ecommerce/activate":  # the spec gives it no operationId
            self.ecommerce_active = True
            return Response(status_code=200)
        return getattr(self, "_" + op.operation_id)(params, query, body or {}, seen)

    def events_of(self, email: str, name: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.events if e["identifiers"].get("email_id") == email.lower()
                and (name is None or e["event_name"] == name)]

    # -- e-commerce ---------------------------------------------------------------------------------
    def _createUpdateBatchCategory(self, params: dict[str, str], query: dict[str, str], body: dict[str, Any],
                                   seen: Seen) -> Response:
        if not self.ecommerce_active:
            return self._bad("permission_denied", "eCommerce is not activated for this account")
        for category in body["categories"]:
            self.categories.setdefault(category["id"], {}).update(category)
        return JSONResponse({"createdCount": len(body["categories"]), "updatedCount": 0}, 201)

    def _createUpdateBatchProducts(self, params: dict[str, str], query: dict[str, str], body: dict[str, Any],
                                   seen: Seen) -> Response:
        if not self.ecommerce_active:
            return self._bad("permission_denied", "eCommerce is not activated for this account")
        for product in body["products"]:
            unknown = [c for c in product.get("categories", []) if c not in self.categories]
            if unknown:
                return self._bad("invalid_parameter", "category not found")
            self.products.setdefault(product["id"], {}).update(product)
        return JSONResponse({"createdCount": len(body["products"]), "updatedCount": 0}, 201)

    def _createBatchOrder(self, params: dict[str, str], query: dict[str, str], body: dict[str, Any],
                          seen: Seen) -> Response:
        historical = body.get("historical", True)
        for order in body["orders"]:
            missing = [p["productId"] for p in order["products"] if p["productId"] not in self.products]
            if missing:
                self.orders_before_products.append(order["id"])
            self.orders[order["id"]] = order
            self.order_statuses.setdefault(order["id"], []).append((order["status"], historical))
        return JSONResponse({"batchId": len(self.order_statuses)}, 202)

    def _createEvent(self, params: dict[str, str], query: dict[str, str], body: dict[str, Any],
                     seen: Seen) -> Response:
        # event.event_properties: "Top level properties and nested properties ... Keys are limited to 255 characters,
        # alphanumerical characters and - _ only" (the schema cannot say it: checked here, at every depth).
        bad = _bad_keys(body.get("event_properties", {}))
        if bad:
            self.violation(seen, f"event_properties keys must be letters, digits, - and _ (1 to 255): {bad}")
            return self._bad("invalid_parameter", "event_properties has an invalid key")
        self.events.append({**body, "identifiers": {k: str(v).lower() for k, v in body["identifiers"].items()}})
        return Response(status_code=204)

    # -- operations ---------------------------------------------------------------------------------
    def _createContact(self, params: dict[str, str], query: dict[str, str], body: dict[str, Any],
                       seen: Seen) -> Response:
        if "email" not in body:
            return self._bad("missing_parameter", "email is missing")  # createContact needs an identifier
        bad_list = self._unknown_lists(body.get("listIds", []))
        if bad_list:
            return bad_list
        contact = self.by_email(body["email"])
        if contact is not None and not body.get("updateEnabled"):
            return self._bad("duplicate_parameter", "Unable to create contact, email is already associated "
                             "with another Contact")
        created = contact is None
        contact = contact or self._create(body["email"], {})
        contact.attributes.update(body.get("attributes", {}))
        if "emailBlacklisted" in body:
            contact.email_blacklisted = body["emailBlacklisted"]
        contact.list_ids |= set(body.get("listIds", []))
        return JSONResponse({"id": contact.id}, 201) if created else Response(status_code=204)

    def _createDoiContact(self, params: dict[str, str], query: dict[str, str], body: dict[str, Any],
                          seen: Seen) -> Response:
        bad_list = self._unknown_lists(body["includeListIds"])
        if bad_list:
            return bad_list
        self.doi_requests.append(body)
        contact = self.by_email(body["email"])
        return Response(status_code=201 if contact is None else 204)

    def _getContactInfo(self, params: dict[str, str], query: dict[str, str], body: dict[str, Any],
                        seen: Seen) -> Response:
        contact = self._find(params["identifier"], query.get("identifierType"))
        if contact is None:
            return self.error(404, "document_not_found", "Contact does not exist")
        return JSONResponse({
            "id": contact.id, "email": contact.email, "emailBlacklisted": contact.email_blacklisted,
            "smsBlacklisted": False, "createdAt": "2026-11-23T10:00:00.000+01:00",
            "modifiedAt": "2026-11-23T10:00:00.000+01:00", "attributes": contact.attributes,
            "listIds": sorted(contact.list_ids), "statistics": {},
        })

    def _updateContact(self, params: dict[str, str], query: dict[str, str], body: dict[str, Any],
                       seen: Seen) -> Response:
        contact = self._find(params["identifier"], query.get("identifierType"))
        if contact is None:
            return JSONResponse({"code": "document_not_found", "message": "Contact does not exist"}, 404)
        bad_list = self._unknown_lists([*body.get("listIds", []), *body.get("unlinkListIds", [])])
        if bad_list:
            return bad_list
        attributes = dict(body.get("attributes", {}))
        new_email = attributes.pop("EMAIL", None)
        if isinstance(new_email, str) and new_email.lower() != contact.email:
            if self.by_email(new_email) is not None:
                return self._bad("duplicate_parameter", "Contact already exist")
            del self._by_email[contact.email]
            contact.email = new_email.lower()
            self._by_email[contact.email] = contact
        contact.attributes.update(attributes)
        if "emailBlacklisted" in body:
            contact.email_blacklisted = body["emailBlacklisted"]
        contact.list_ids |= set(body.get("listIds", []))
        contact.list_ids -= set(body.get("unlinkListIds", []))
        return Response(status_code=204)

    def _deleteContact(self, params: dict[str, str], query: dict[str, str], body: dict[str, Any],
                       seen: Seen) -> Response:
        contact = self._find(params["identifier"], query.get("identifierType"))
        if contact is None:
            return self.error(404, "document_not_found", "Contact does not exist")
        del self.contacts[contact.id]
        del self._by_email[contact.email]
        self.deleted.append(contact.email)
        return Response(status_code=204)

    def _addContactToList(self, params: dict[str, str], query: dict[str, str], body: dict[str, Any],
                          seen: Seen) -> Response:
        return self._list_change(int(params["listId"]), body, seen, add=True)

    def _removeContactFromList(self, params: dict[str, str], query: dict[str, str], body: dict[str, Any],
                               seen: Seen) -> Response:
        return self._list_change(int(params["listId"]), body, seen, add=False)

    # -- helpers ------------------------------------------------------------------------------------
    def _list_change(self, list_id: int, body: dict[str, Any], seen: Seen, *, add: bool) -> Response:
        if list_id not in self.lists:
            return self.error(404, "document_not_found", "List ID does not exist")
        if "emails" not in body:
            self.violation(seen, "the adapter must address contacts by email in list calls")
            return self._bad("invalid_parameter", "only emails are supported by this fake")
        success, failure = [], []
        for email in body["emails"]:
            contact = self.by_email(email)
            if contact is None or (list_id in contact.list_ids) == add:
                failure.append(email)
                continue
            (contact.list_ids.add if add else contact.list_ids.discard)(list_id)
            success.append(email)
        if not success:
            what = "already in list" if add else "already removed from list"
            return self._bad("invalid_parameter", f"Contact {what} and/or does not exist")
        return JSONResponse({"contacts": {"success": success, "failure": failure}}, 201)

    def _find(self, identifier: str, kind: str | None) -> RemoteContact | None:
        if kind == "contact_id" or (kind is None and identifier.isdigit()):
            return self.contacts.get(int(identifier)) if identifier.isdigit() else None
        if kind in (None, "email_id"):
            return self.by_email(identifier)
        return None

    def _create(self, email: str, attributes: dict[str, Any]) -> RemoteContact:
        contact = RemoteContact(self._next_id, email.lower(), dict(attributes))
        self.contacts[contact.id] = contact
        self._by_email[contact.email] = contact
        self._next_id += 1
        return contact

    def _unknown_lists(self, ids: list[int]) -> Response | None:
        unknown = sorted(set(ids) - self.lists)
        if unknown:
            return self._bad("invalid_parameter", f"List ID(s) {json.dumps(unknown)} not found")
        return None

    @staticmethod
    def _bad(code: str, message: str) -> Response:
        return JSONResponse({"code": code, "message": message}, 400)


def _bad_keys(value: Any) -> list[str]:
    """Keys of an event's properties, at any depth, that Brevo does not take."""
    if isinstance(value, list):
        return [k for item in value for k in _bad_keys(item)]
    if not isinstance(value, dict):
        return []
    bad = [k for k in value if not (isinstance(k, str) and 0 < len(k) <= 255
                                    and all(ch.isascii() and (ch.isalnum() or ch in "-_") for ch in k))]
    return bad + [k for v in value.values() for k in _bad_keys(v)]
