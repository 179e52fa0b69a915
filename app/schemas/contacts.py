"""Contact wire schemas: create/upsert/patch bodies and the read model."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from app.access import reveal
from app.schemas.base import InputSchema
from app.schemas.strict import FromJSON
from app.schemas.types import (
    CountryCode,
    Day,
    Email,
    ExternalId,
    Phone,
    ShortText,
    TagName,
    Timestamp,
    absent_or_set,
    one_of_required,
)
from app.security.masking import mask_email, mask_name, mask_phone, mask_text

__all__ = [
    "MASKED_SORTS",
    "WRITTEN",
    "Address",
    "AddressRead",
    "BatchItemResult",
    "BatchResult",
    "ContactBatch",
    "ContactCreate",
    "ContactKind",
    "ContactPage",
    "ContactPatch",
    "ContactRead",
    "ContactReceipt",
    "ContactSort",
    "ContactSource",
    "ContactStats",
    "ContactUpsert",
    "ContactWritten",
    "LifecycleStage",
    "present_contact",
    "present_receipt",
]


MAX_ATTRIBUTES = 250  # attribute values set by one request


class ContactKind(StrEnum):
    CUSTOMER = "customer"
    PROSPECT = "prospect"
    VENDOR = "vendor"
    PARTNER = "partner"


class LifecycleStage(StrEnum):
    PROSPECT = "prospect"
    NEW_CUSTOMER = "new_customer"
    LOYAL_CUSTOMER = "loyal_customer"
    LAPSED_CUSTOMER = "lapsed_customer"


class ContactSource(StrEnum):
    NEWSLETTER_FORM = "newsletter_form"
    WEBSITE_SIGNUP = "website_signup"
    CHECKOUT = "checkout"
    SOCIAL = "social"
    CONTEST = "contest"
    WHITE_PAPER = "white_paper"
    CONTACT_REQUEST = "contact_request"
    SURVEY = "survey"
    PURCHASED_FILE = "purchased_file"
    STORE = "store"
    IMPORT = "import"
    API = "api"


class ContactSort(StrEnum):
    CREATED_AT = "created_at"
    CREATED_AT_DESC = "-created_at"
    UPDATED_AT = "updated_at"
    UPDATED_AT_DESC = "-updated_at"
    LAST_NAME = "last_name"
    LAST_NAME_DESC = "-last_name"
    LAST_ORDER_AT = "last_order_at"
    LAST_ORDER_AT_DESC = "-last_order_at"


# Orders of masked values: a masked reader paging through them learns how the hidden names compare (pii:read).
MASKED_SORTS = frozenset({ContactSort.LAST_NAME, ContactSort.LAST_NAME_DESC})


class Address(InputSchema):
    line1: ShortText | None = None
    line2: ShortText | None = None
    postal_code: ShortText | None = Field(default=None, max_length=20)
    city: ShortText | None = None
    region: ShortText | None = None
    country: CountryCode | None = None



class _ContactFields(InputSchema):
    """Writable fields. In a merge patch, an absent field is untouched and null clears it."""

    external_id: ExternalId | None = None
    email: Email | None = None
    phone: Phone | None = None
    first_name: ShortText | None = None
    last_name: ShortText | None = None
    company: ShortText | None = None
    job_title: ShortText | None = None
    sector: ShortText | None = None
    gender: ShortText | None = Field(default=None, max_length=32)
    birth_date: Day | None = Field(default=None, description="From 1900-01-01 to today (the server's date)")
    address: Address | None = None
    language: ShortText | None = Field(default=None, max_length=35, description="BCP 47 tag, e.g. fr or fr-BE")
    source: Annotated[ContactSource, FromJSON] | None = None
    first_contact_at: Timestamp | None = None
    first_contact_channel: ShortText | None = None
    kind: Annotated[ContactKind, FromJSON] | None = absent_or_set()
    attributes: dict[Annotated[str, StringConstraints(max_length=63)], Any] | None = Field(
        default=None, max_length=MAX_ATTRIBUTES,
        description=f"Custom attributes, typed by /v1/attributes (at most {MAX_ATTRIBUTES} a request). In a patch, "
                    "null removes a key.")
    tags: list[TagName] | None = Field(default=None, max_length=100)

    @field_validator("birth_date")
    @classmethod
    def _birth_date_in_the_past(cls, value: date | None) -> date | None:
        if value is not None and not date(1900, 1, 1) <= value <= date.today():
            raise ValueError("must be between 1900-01-01 and today")
        return value

    @field_validator("kind", mode="before")
    @classmethod
    def _kind_not_null(cls, value: object) -> object:
        if value is None:  # the column always has a kind; null would not clear it
            raise ValueError("kind cannot be null: set customer, prospect, vendor or partner")
        return value


class ContactCreate(_ContactFields):
    model_config = ConfigDict(json_schema_extra=one_of_required("email", "phone", "external_id"))

    @model_validator(mode="after")
    def _has_an_identifier(self) -> Self:
        if not (self.email or self.phone or self.external_id):
            raise ValueError("one of email, phone or external_id is required")
        return self


class ContactUpsert(_ContactFields):
    """Matched by external_id, else email: one of them is required."""

    model_config = ConfigDict(json_schema_extra=one_of_required("external_id", "email"))

    @model_validator(mode="after")
    def _has_a_key(self) -> Self:
        if not (self.email or self.external_id):
            raise ValueError("external_id or email is required to match a contact")
        return self


class ContactPatch(_ContactFields):
    pass


class ContactBatch(InputSchema):
    # Any JSON value: an item that is not an object fails alone, in its own result.
    items: list[Any] = Field(min_length=1, max_length=1000, description="ContactUpsert bodies")


class ContactStats(BaseModel):
    orders_count: int
    total_spent: Decimal
    average_basket: Decimal | None
    first_order_at: datetime | None
    last_order_at: datetime | None
    last_order_amount: Decimal | None
    currency: str | None


class AddressRead(BaseModel):
    line1: str | None
    line2: str | None
    postal_code: str | None
    city: str | None
    region: str | None
    country: str | None


class ContactRead(BaseModel):
    id: uuid.UUID
    external_id: str | None
    email: str | None
    email_status: str
    phone: str | None
    first_name: str | None
    last_name: str | None
    company: str | None
    job_title: str | None
    sector: str | None
    gender: str | None
    birth_date: date | None
    address: AddressRead
    language: str | None
    source: str | None
    first_contact_at: datetime | None
    first_contact_channel: str | None
    kind: str
    lifecycle_stage: str
    attributes: dict[str, Any]
    tags: list[str]
    stats: ContactStats
    created_at: datetime
    updated_at: datetime
    last_activity_at: datetime | None
    version: int
    pii_masked: bool = Field(description="true when personal data was masked for a token without pii:read")


class ContactReceipt(BaseModel):
    """A contacts write's answer to a token without contacts:read: what it did, nothing the file holds."""

    id: uuid.UUID
    created: bool = Field(description="true when this write created the contact")
    version: int = Field(description="The contact's version after the write, as in the ETag (for If-Match)")


# What a contacts write answers (docs/api.md, "Write receipts"): the contact, masked without pii:read; a receipt for
# a token without contacts:read (a write never reads what the token's scopes deny: docs/security.md, class 11).
ContactWritten = ContactRead | ContactReceipt
WRITTEN = ("The contact as the caller may read it (masked without pii:read); for a token without contacts:read, a "
           "ContactReceipt (id, created, version) and nothing the file holds")


class ContactPage(BaseModel):
    data: list[ContactRead]
    next_cursor: str | None


class BatchItemResult(BaseModel):
    index: int
    status: str = Field(description="created | updated | error")
    id: uuid.UUID | None = None
    error: dict[str, Any] | None = Field(default=None, description="problem+json body for this item")


class BatchResult(BaseModel):
    results: list[BatchItemResult]
    created: int
    updated: int
    errors: int



def present_contact(row: Mapping[str, Any], *, reveal_pii: bool) -> dict[str, Any]:
    """The wire form of a contact row (ContactRead's shape), masked unless the caller may see PII.

    Unmasked, it is an access to the person's data: the request's journal entry names the contact."""
    if reveal_pii:
        reveal(row["id"])
    data = {
        "id": row["id"],
        "external_id": row["external_id"],
        "email": row["email"],
        "email_status": row["email_status"],
        "phone": row["phone"],
        "first_name": row["first_name"],
        "last_name": row["last_name"],
        "company": row["company"],
        "job_title": row["job_title"],
        "sector": row["sector"],
        "gender": row["gender"],
        "birth_date": row["birth_date"],
        "address": {
            "line1": row["address_line1"],
            "line2": row["address_line2"],
            "postal_code": row["postal_code"],
            "city": row["city"],
            "region": row["region"],
            "country": row["country"],
        },
        "language": row["language"],
        "source": row["source"],
        "first_contact_at": row["first_contact_at"],
        "first_contact_channel": row["first_contact_channel"],
        "kind": row["kind"],
        "lifecycle_stage": row["lifecycle_stage"],
        "attributes": row["attributes"],
        "tags": row["tags"],
        "stats": {
            "orders_count": row["orders_count"],
            "total_spent": row["total_spent"],
            "average_basket": row["average_basket"],
            "first_order_at": row["first_order_at"],
            "last_order_at": row["last_order_at"],
            "last_order_amount": row["last_order_amount"],
            "currency": row["currency"],
        },
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "last_activity_at": row["last_activity_at"],
        "version": row["version"],
        "pii_masked": not reveal_pii,
    }
    if not reveal_pii:
        data["email"] = mask_email(data["email"])
        data["phone"] = mask_phone(data["phone"])
        data["first_name"] = mask_name(data["first_name"])
        data["last_name"] = mask_name(data["last_name"])
        data["birth_date"] = None
        data["address"]["line1"] = mask_text(data["address"]["line1"])
        data["address"]["line2"] = mask_text(data["address"]["line2"])
    return data


def present_receipt(row: Mapping[str, Any], *, created: bool) -> dict[str, Any]:
    """ContactReceipt's shape: only what the write itself decided (the id, a creation, the new version)."""
    return {"id": row["id"], "created": created, "version": row["version"]}
