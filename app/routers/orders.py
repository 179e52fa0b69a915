"""`/v1/orders`, `/v1/events` and a contact's orders and events."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from app.access import reveal
from app.db import ReadSession, WriteSession
from app.errors import (
    AppError,
    ContactNotFound,
    DuplicateContact,
    IdempotencyKeyReused,
    InvalidInput,
    PreconditionFailed,
    problems,
)
from app.routers.deps import Idempotency, IfMatch, JSONBody, batch_results, etag
from app.schemas.orders import (
    CartPut,
    CartRead,
    CartWritten,
    EventBatch,
    EventBatchResult,
    EventCreate,
    EventPage,
    EventWritten,
    OrderPage,
    OrderPut,
    OrderRead,
    OrderWritten,
    present_contact_event,
    present_event_receipt,
    present_order_receipt,
)
from app.schemas.types import Declared, ExternalId, Limit, utc_instant
from app.security import Principal, Scope, require
from app.services import carts as carts_service
from app.services import events as events_service
from app.services import history as history_service
from app.services import orders as orders_service
from app.services.suppressions import SuppressedContact

__all__ = ["carts_router", "contact_activity_router", "events_router", "orders_router"]

orders_router = APIRouter(prefix="/orders", tags=["orders"])
carts_router = APIRouter(prefix="/carts", tags=["orders"])
events_router = APIRouter(prefix="/events", tags=["events"])
contact_activity_router = APIRouter(prefix="/contacts", tags=["orders", "events"])


# A contact named by email is upserted (services/orders.resolve_contact): its refusals are this route's too.
_CONTACT_BY_EMAIL = (DuplicateContact, SuppressedContact)


def _policy(request: Request) -> orders_service.LifecyclePolicy:
    return request.app.state.lifecycle_policy  # type: ignore[no-any-return]


def _order_response(row: Any, *, status_code: int = 200) -> JSONBody:
    """One order (or cart) with its ETag (its version: see `orders.order_version`)."""
    return JSONBody(row, status_code=status_code, headers={"ETag": etag(orders_service.order_version(row))})


def _written(row: Any, caller: Principal, *, created: bool) -> JSONBody:
    """A PUT's answer: the stored order or cart (its dates, a converted cart's order) only to a reader of orders,
    else a receipt (docs/security.md, class 11). The ETag is the same either way, for If-Match."""
    if caller.reads(Scope.ORDERS_READ):
        return _order_response(row, status_code=201 if created else 200)
    version = orders_service.order_version(row)
    return JSONBody(present_order_receipt(row, created=created, version=version), status_code=201 if created else 200,
                    headers={"ETag": etag(version)})


def _put_responses(what: str, written: Any, *refusals: type[AppError]) -> dict[int | str, dict[str, Any]]:
    said = f"The {what} as GET shows it; for a token without orders:read, an OrderReceipt (id, external_id, created, " \
           "version)"
    return {200: {"description": said}, 201: {"description": f"Created. {said}", "model": written},
            **problems(PreconditionFailed, *refusals, *_CONTACT_BY_EMAIL)}


@orders_router.put("/{external_id}", response_model=OrderWritten, responses=_put_responses("order", OrderWritten))
async def put_order(
    external_id: ExternalId, payload: OrderPut, request: Request, session: WriteSession,
    caller: Annotated[Principal, require(Scope.ORDERS_WRITE)], expected_version: IfMatch,
) -> Any:
    """Idempotent upsert: a replay changes nothing; the contact's stats and stage follow in the same transaction."""
    row, created = await orders_service.upsert_order(session, external_id, payload, actor=caller,
                                                     policy=_policy(request), expected_version=expected_version)
    return _written(row, caller, created=created)


@orders_router.get("/{external_id}", response_model=OrderRead, responses=problems(orders_service.OrderNotFound))
async def get_order(
    external_id: ExternalId, session: ReadSession, _: Annotated[Principal, require(Scope.ORDERS_READ)]
) -> Any:
    row = await orders_service.get_order(session, external_id)
    reveal(row["contact_id"])  # a person's purchases: never masked, always journaled (docs/gdpr.md)
    return _order_response(row)


@carts_router.put("/{external_id}", response_model=CartWritten,
                  responses=_put_responses("cart", CartWritten, carts_service.CartClosed))
async def put_cart(
    external_id: ExternalId, payload: CartPut, session: WriteSession,
    caller: Annotated[Principal, require(Scope.ORDERS_WRITE)], expected_version: IfMatch,
) -> Any:
    """Idempotent upsert of the cart as the shop sees it now; an order naming it (`cart_external_id`) converts it."""
    row, created = await carts_service.upsert_cart(session, external_id, payload, actor=caller,
                                                   expected_version=expected_version)
    return _written(row, caller, created=created)


@carts_router.get("/{external_id}", response_model=CartRead, responses=problems(carts_service.CartNotFound))
async def get_cart(
    external_id: ExternalId, session: ReadSession, _: Annotated[Principal, require(Scope.ORDERS_READ)]
) -> Any:
    row = await carts_service.get_cart(session, external_id)
    reveal(row["contact_id"])  # like an order: never masked, always journaled
    return _order_response(row)


_EVENT_WRITTEN = ("The event as GET /v1/contacts/{id}/events shows it (properties masked without pii:read); for a "
                  "token without events:read, an EventReceipt (id, event_id, contact_id, created)")


@events_router.post("", status_code=201, response_model=EventWritten,
                    responses={201: {"description": _EVENT_WRITTEN},
                               200: {"description": f"Replay of a known event_id: nothing written. {_EVENT_WRITTEN}",
                                     "model": EventWritten},
                               **problems(IdempotencyKeyReused, *_CONTACT_BY_EMAIL)})
async def create_event(
    payload: EventCreate, session: WriteSession, caller: Annotated[Principal, require(Scope.EVENTS_WRITE)],
    idem: Idempotency,
) -> Any:
    if idem.replay:
        return idem.replay
    done = await events_service.record_event(session, payload, actor=caller)
    # a replay's row is the event stored first, perhaps another sender's: shown only as that reader may see it
    body = (present_contact_event(done.row, reveal_pii=caller.sees_pii) if caller.reads(Scope.EVENTS_READ)
            else present_event_receipt(done.row, contact_id=done.contact_id, created=done.created))
    return await idem.respond(201 if done.created else 200, body)


@events_router.post("/batch", response_model=EventBatchResult, responses=problems(IdempotencyKeyReused))
async def create_events(
    payload: EventBatch, session: WriteSession, caller: Annotated[Principal, require(Scope.EVENTS_WRITE)],
    idem: Idempotency,
) -> Any:
    """Up to 1,000 events; each succeeds or fails alone."""
    if idem.replay:
        return idem.replay
    results = batch_results(await events_service.record_batch(session, payload.items, actor=caller))
    return await idem.respond(200, {"results": results, "errors": sum(r["status"] == "error" for r in results)})


@contact_activity_router.get("/{contact_id}/orders", response_model=OrderPage,
                             responses=problems(ContactNotFound))
async def list_contact_orders(
    contact_id: uuid.UUID, session: ReadSession, _: Annotated[Principal, require(Scope.ORDERS_READ)],
    limit: Limit = 50, cursor: OrderCursor = None,
) -> Any:
    """Newest first; `next_cursor` continues."""
    rows = await orders_service.contact_orders(session, contact_id, limit=limit, before=_order_cursor(cursor))
    if rows:
        reveal(contact_id)
    next_cursor = _order_cursor_of(rows[limit - 1]) if len(rows) > limit else None
    return JSONBody({"data": rows[:limit], "next_cursor": next_cursor})


@contact_activity_router.get("/{contact_id}/events", response_model=EventPage,
                             responses=problems(ContactNotFound))
async def list_contact_events(
    contact_id: uuid.UUID, session: ReadSession, caller: Annotated[Principal, require(Scope.EVENTS_READ)],
    limit: Limit = 50, cursor: Annotated[str | None, Query(max_length=40, pattern=r"^[0-9]+$")] = None,
) -> Any:
    """Newest first. Without `pii:read`, string values inside `properties` are masked (keys kept)."""
    rows = await events_service.contact_events(session, contact_id, limit=limit,
                                               before_id=history_service.id_cursor(cursor))
    next_cursor = str(rows[limit - 1]["id"]) if len(rows) > limit else None
    return JSONBody({"data": [present_contact_event(r, reveal_pii=caller.sees_pii) for r in rows[:limit]],
                     "next_cursor": next_cursor})


# `placed_at|id` of the page's last order, as next_cursor gives it (its form, a little narrower: days up to 28).
# UTC as `Z`, so that the cursor is URL-safe as given, like every other cursor (`+00:00` in a query reads as a space);
# `+00:00`, what it was before, is still read.
_ORDER_CURSOR_PATTERN = (r"^([1-9][0-9]{3}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])"
                         r"T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
                         r"(\.[0-9]{1,6})?(Z|\+00:00)\|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})?$")
OrderCursor = Annotated[str | None, Declared(pattern=_ORDER_CURSOR_PATTERN),
                        Query(max_length=100, description="`next_cursor` of the previous page, as given")]


def _order_cursor_of(row: Any) -> str:
    return f"{row['placed_at'].isoformat().replace('+00:00', 'Z')}|{row['id']}"


def _order_cursor(cursor: str | None) -> tuple[datetime, uuid.UUID] | None:
    if not cursor:
        return None
    try:
        placed, _, order_id = cursor.partition("|")
        return utc_instant(datetime.fromisoformat(placed)), uuid.UUID(order_id)
    except ValueError:
        raise InvalidInput.one("cursor", "not a cursor issued by this server", "invalid_cursor") from None
