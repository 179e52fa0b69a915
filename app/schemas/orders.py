"""Orders and events on the wire."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Self
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from app.access import reveal
from app.schemas.base import InputSchema
from app.schemas.freeform import FreeJSONObject
from app.schemas.strict import FromJSON
from app.schemas.types import (
    NON_BLANK,
    SHOP_CLOCK_NOTE,
    CurrencyCode,
    Declared,
    Email,
    ExternalId,
    ShopTimestamp,
    ShortText,
    Uuid,
    WholeNumber,
    one_of_required,
)
from app.security.masking import mask_json

__all__ = [
    "CartPut",
    "CartRead",
    "CartStatus",
    "CartWritten",
    "ContactRef",
    "EventBatch",
    "EventBatchItem",
    "EventBatchResult",
    "EventCreate",
    "EventPage",
    "EventRead",
    "EventReceipt",
    "EventWritten",
    "OrderChannel",
    "OrderItem",
    "OrderPage",
    "OrderPut",
    "OrderRead",
    "OrderReceipt",
    "OrderStatus",
    "OrderWritten",
    "present_contact_event",
    "present_event_receipt",
    "present_order_receipt",
]


def _cents(value: Decimal) -> Decimal:
    if not value.is_finite() or value.as_tuple().exponent < -2:  # type: ignore[operator]
        raise ValueError("a decimal amount with at most 2 decimals, e.g. \"49.90\"")
    return value


# numeric(14, 2), the column: up to 999,999,999,999.99. Sent as a JSON number or a string; declared as both.
MAX_MONEY = Decimal("999999999999.99")
_MONEY_SCHEMA = {"anyOf": [
    {"type": "number", "minimum": 0, "maximum": float(MAX_MONEY), "multipleOf": 0.01},
    {"type": "string", "maxLength": 40, "pattern": r"^[0-9]{1,12}(\.[0-9]{1,2})?$"}]}


def _money_text(value: Any) -> Any:
    if isinstance(value, str) and len(value) > 40:  # before Decimal() reads it
        raise ValueError("a decimal amount with at most 2 decimals, e.g. \"49.90\"")
    return value


Money = Annotated[Decimal, BeforeValidator(_money_text), Field(ge=0, le=MAX_MONEY), FromJSON, AfterValidator(_cents),
                  WithJsonSchema(_MONEY_SCHEMA, mode="validation")]
Currency = Annotated[CurrencyCode, Field(
    description="ISO 4217: an active code, or one withdrawn since 2007 (past orders), e.g. EUR")]


class OrderStatus(StrEnum):
    PLACED = "placed"
    PAID = "paid"
    SHIPPED = "shipped"
    DELIVERED = "delivered"
    CANCELLED = "cancelled"
    REFUNDED = "refunded"


class OrderChannel(StrEnum):
    WEB = "web"
    STORE = "store"
    PHONE = "phone"
    MARKETPLACE = "marketplace"


class ContactRef(InputSchema):
    """Which contact: by id, else external_id, else email (an unknown email creates the contact). An id or an
    external_id alone must name an existing contact (the server judges: 422 otherwise)."""

    model_config = ConfigDict(json_schema_extra=one_of_required("id", "external_id", "email"))

    id: Uuid | None = None
    external_id: ExternalId | None = None
    email: Email | None = None

    @model_validator(mode="after")
    def _one_key(self) -> Self:
        if not (self.id or self.external_id or self.email):
            raise ValueError("one of id, external_id or email is required")
        return self


class OrderItem(InputSchema):
    sku: Annotated[ShortText, NON_BLANK] = Field(min_length=1)
    name: ShortText | None = None
    category: ShortText | None = None
    quantity: Annotated[int, Field(ge=1, le=1_000_000), WholeNumber]
    unit_price: Money


class OrderPut(InputSchema):
    contact: ContactRef
    placed_at: ShopTimestamp = Field(description=f"When it was placed (an offset is required). {SHOP_CLOCK_NOTE}")
    status: Annotated[OrderStatus, FromJSON]
    currency: Currency
    total_amount: Money
    items: list[OrderItem] = Field(default_factory=list, max_length=1000)
    channel: Annotated[OrderChannel, FromJSON] | None = None
    cart_external_id: ExternalId | None = Field(default=None, description=(
        "The cart this order came from: a known cart of the same contact is closed by it (status converted)"))


class OrderRead(BaseModel):
    id: uuid.UUID
    external_id: str
    contact_id: uuid.UUID
    placed_at: datetime
    status: OrderStatus
    currency: str
    total_amount: Decimal
    items: list[dict[str, Any]]
    channel: str | None
    cart_external_id: str | None = None
    created_at: datetime
    updated_at: datetime


class OrderReceipt(BaseModel):
    """PUT /v1/orders|carts/{ext}'s answer to a token without orders:read: what it did, nothing stored."""

    id: uuid.UUID
    external_id: str
    created: bool = Field(description="true when this write created it")
    version: int = Field(description="Its version after the write, as in the ETag (for If-Match)")


# An order's or cart's dates, and the order that converted a cart, are orders:read's (docs/security.md, class 11).
OrderWritten = OrderRead | OrderReceipt


class CartStatus(StrEnum):
    OPEN = "open"
    CONVERTED = "converted"
    ABANDONED = "abandoned"


# What _web_link accepts, for the contract: http(s), a host (a name, or an IPv6 address in brackets), no user or
# password (no `@` before the path).
_WEB_LINK_PATTERN = r"^[Hh][Tt][Tt][Pp][Ss]?://(?:[^/?#@:\[\]]+|\[[^/?#@\]]+\])(?::[^/?#@]*)?(?:[/?#][\s\S]*)?$"


def _web_link(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.username is not None \
            or parts.password is not None:
        raise ValueError("an http(s) address without credentials, e.g. https://shop.example/cart/recover/abc")
    return value


class CartPut(InputSchema):
    """A cart as the shop sees it now. `converted` is normally set by an order naming the cart
    (`cart_external_id`); a converted cart accepts no further change."""

    # closed_at only on a converted or abandoned cart (the status defaults to open).
    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"properties": {"closed_at": {"type": "null"}}},
        {"required": ["status"], "properties": {"status": {"enum": ["converted", "abandoned"]}}},
    ]})

    contact: ContactRef
    status: Annotated[CartStatus, FromJSON] = CartStatus.OPEN
    currency: Currency
    items: list[OrderItem] = Field(min_length=1, max_length=1000)
    total_amount: Money | None = Field(default=None, validate_default=True,  # absent: the lines' sum must fit
                                       description="Default: the sum of quantity × unit_price")
    checkout_url: Annotated[str, StringConstraints(max_length=2000), AfterValidator(_web_link),
                            Declared(pattern=_WEB_LINK_PATTERN)] | None = Field(
        default=None, description="Where the person resumes the cart (the abandoned-cart email links there)")
    opened_at: ShopTimestamp = Field(description=f"When the cart was started (the shop's clock). {SHOP_CLOCK_NOTE}")
    closed_at: ShopTimestamp | None = Field(default=None, description=(
        f"When it was converted or abandoned (default: when Carnet learns it). {SHOP_CLOCK_NOTE}"))

    # Each fault is a 422 on the field to change (docs/api.md, Errors); the fields each rule reads come first.
    @field_validator("total_amount")
    @classmethod
    def _lines_fit(cls, total: Decimal | None, info: ValidationInfo) -> Decimal | None:
        if total is None and "items" in info.data and _lines_total(info.data["items"]) > MAX_MONEY:
            raise ValueError(f"the lines add up to more than {MAX_MONEY}: give total_amount")
        return total

    @field_validator("closed_at")
    @classmethod
    def _closed_after_opened(cls, closed: datetime | None, info: ValidationInfo) -> datetime | None:
        if closed is not None and info.data.get("status") is CartStatus.OPEN:
            raise ValueError("closed_at is for a converted or abandoned cart")
        if closed is not None and "opened_at" in info.data and closed < info.data["opened_at"]:
            raise ValueError("closed_at comes before opened_at")
        return closed

    def lines_total(self) -> Decimal:
        return _lines_total(self.items)


def _lines_total(items: list[OrderItem]) -> Decimal:
    return sum((item.unit_price * item.quantity for item in items), Decimal(0))


class CartRead(BaseModel):
    id: uuid.UUID
    external_id: str
    contact_id: uuid.UUID
    status: CartStatus
    currency: str
    total_amount: Decimal
    items: list[dict[str, Any]]
    checkout_url: str | None
    opened_at: datetime
    closed_at: datetime | None
    order_external_id: str | None
    created_at: datetime
    updated_at: datetime


CartWritten = CartRead | OrderReceipt


class EventCreate(InputSchema):
    contact: ContactRef
    type: Annotated[str, Field(max_length=64, pattern=r"^[a-z][a-z0-9_.]{0,63}$",
                               description="e.g. page_view, cart_abandoned")]
    occurred_at: ShopTimestamp = Field(description=f"When it happened (an offset is required). {SHOP_CLOCK_NOTE}")
    properties: FreeJSONObject = Field(default_factory=dict, max_length=1000, description=(
        "Any JSON object of at most 1,000 keys, 32 levels deep and 10,000 JSON values in all; string values are "
        "masked (keys kept) for a token without pii:read"))
    event_id: ExternalId | None = Field(default=None, description="Sender's id: a replay with the same id is ignored")

    @field_validator("properties")
    @classmethod
    def _small_enough(cls, properties: dict[str, Any]) -> dict[str, Any]:
        # NUL is refused in every key and text by FreeJSONObject; looking for it in the repr also refused the four
        # characters `\x00` written as text (a Windows path, an escaped dump), which hold no NUL
        if len(repr(properties)) > 16_000:  # once: a batch checks a thousand of these
            raise ValueError("properties must be under 16 kB of JSON")
        return properties


class EventBatch(InputSchema):
    # Any JSON value: an item that is not an object fails alone, in its own result.
    items: list[Any] = Field(min_length=1, max_length=1000, description="EventCreate bodies")


class EventRead(BaseModel):
    id: int
    event_id: str | None
    contact_id: uuid.UUID
    type: str
    occurred_at: datetime
    properties: dict[str, Any]
    created_at: datetime


class EventReceipt(BaseModel):
    """POST /v1/events' answer to a token without events:read: what it did, nothing stored."""

    id: int
    event_id: str | None = Field(description="As sent")
    contact_id: uuid.UUID = Field(description="The contact this request's `contact` named (created if new)")
    created: bool = Field(description="false: an event with this event_id was stored already (nothing written)")


# A replayed event_id answers the event stored first, whoever sent it: only a reader may see it (security.md, 11).
EventWritten = EventRead | EventReceipt


class OrderPage(BaseModel):
    data: list[OrderRead]
    next_cursor: str | None


class EventPage(BaseModel):
    data: list[EventRead]
    next_cursor: str | None


class EventBatchItem(BaseModel):
    index: int
    status: str = Field(description="created | duplicate | error")
    id: int | None = None
    error: dict[str, Any] | None = None


class EventBatchResult(BaseModel):
    results: list[EventBatchItem]
    errors: int


def present_contact_event(row: Mapping[str, Any], *, reveal_pii: bool) -> dict[str, Any]:
    """An event on the wire: without pii:read, its free-form `properties` are masked (security.masking.mask_json)."""
    event = dict(row)
    if reveal_pii:
        reveal(row["contact_id"])  # journaled (app.access)
    else:
        event["properties"] = mask_json(event["properties"])
    return event


def present_event_receipt(row: Mapping[str, Any], *, contact_id: uuid.UUID, created: bool) -> dict[str, Any]:
    return {"id": row["id"], "event_id": row["event_id"], "contact_id": contact_id, "created": created}


def present_order_receipt(row: Mapping[str, Any], *, created: bool, version: int) -> dict[str, Any]:
    return {"id": row["id"], "external_id": row["external_id"], "created": created, "version": version}
