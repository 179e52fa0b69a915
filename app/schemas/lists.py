"""Lists and memberships on the wire."""

from __future__ import annotations

import ipaddress
import re
import uuid
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Self
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from app.schemas.base import InputSchema, VersionReceipt
from app.schemas.consents import ConsentProof
from app.schemas.contacts import ContactKind
from app.schemas.strict import FromJSON
from app.schemas.types import NON_BLANK, Declared, LongText, ShortText, Uuid, absent_or_set, refuse_null

__all__ = [
    "ConfirmPreview",
    "ConfirmResult",
    "LinkTarget",
    "ListCounts",
    "ListCreate",
    "ListPage",
    "ListPatch",
    "ListRead",
    "ListWritten",
    "MemberBatch",
    "MemberBatchItem",
    "MemberBatchResult",
    "MemberPage",
    "MemberRead",
    "MemberReceipt",
    "MemberStatus",
    "MemberWritten",
    "SubscribeConsent",
    "SubscribeRequest",
    "UnsubscribePreview",
    "UnsubscribeResult",
    "present_list",
    "present_member",
    "present_member_receipt",
]


class MemberStatus(StrEnum):
    PENDING = "pending"
    SUBSCRIBED = "subscribed"
    UNSUBSCRIBED = "unsubscribed"


def _distinct(kinds: list[ContactKind] | None) -> list[ContactKind] | None:
    return list(dict.fromkeys(kinds)) if kinds is not None else None


def _origin(value: str) -> str:
    """`scheme://host[:port]` exactly as a browser sends it in `Origin` (lower case, default port left out)."""
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ValueError("not an origin such as https://shop.example") from None
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.username is not None \
            or parts.password is not None or parts.path not in ("", "/") or parts.query or parts.fragment \
            or value.endswith("/") or "#" in value or "?" in value:
        raise ValueError("an origin is scheme://host[:port], without a path, e.g. https://shop.example")
    if not _is_host(parts.hostname):
        raise ValueError("an origin's host is a DNS name or an IP address, e.g. https://shop.example")
    default = {"https": 443, "http": 80}[parts.scheme]
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None and port != default else "")


_DNS_NAME = re.compile(r"[a-z0-9-]+(\.[a-z0-9-]+)*")


def _is_host(hostname: str) -> bool:
    """What a browser can put in `Origin`: a DNS name (letters, digits, hyphens, dots; urlsplit lowers it) or, in
    brackets, an IPv6 address. `*`, `_` and the like never match an origin a browser sends."""
    if ":" in hostname:
        try:
            ipaddress.IPv6Address(hostname)
        except ValueError:
            return False
        return True
    return _DNS_NAME.fullmatch(hostname) is not None


def _distinct_origins(origins: list[str]) -> list[str]:
    return list(dict.fromkeys(origins))


MAX_BATCH = 1000  # contacts in add and remove together

ListName = Annotated[ShortText, StringConstraints(min_length=1, max_length=100), NON_BLANK]
AcceptedKinds = Annotated[list[Annotated[ContactKind, FromJSON]], Field(min_length=1, max_length=len(ContactKind)),
                          AfterValidator(_distinct)]
# What _origin accepts, for the contract: a DNS name or an IPv4 address (an IPv6 one in brackets is accepted too, and
# not declared), and a port up to 65535.
_ORIGIN_PATTERN = (r"^[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*"
                   r"(:([0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?$")
Origin = Annotated[str, StringConstraints(min_length=8, max_length=200), AfterValidator(_origin),
                   Declared(pattern=_ORIGIN_PATTERN)]
SignupOrigins = Annotated[list[Origin], Field(max_length=20), AfterValidator(_distinct_origins)]
Color = Annotated[str, StringConstraints(max_length=7, pattern=r"^#[0-9a-fA-F]{6}$"), AfterValidator(str.lower)]
DisplayName = Annotated[ShortText, StringConstraints(min_length=1, max_length=100), NON_BLANK]
PolicyVersion = Annotated[ShortText, StringConstraints(min_length=1, max_length=100), NON_BLANK]
Wording = Annotated[LongText, StringConstraints(min_length=1), NON_BLANK]

_PUBLIC_FIELDS = {
    "public_signup": Field(default=False, description="Browsers may sign up at POST /v1/public/lists/{id}/signup"),
    "signup_origins": Field(default_factory=list, description="Exact origins allowed to sign up (CORS), at most 20"),
    "signup_wording": Field(default=None, description="The consent text shown on the form; kept as the proof's "
                                                      "wording. Required for public_signup"),
    "signup_policy_version": Field(default=None, description="The privacy policy version the form shows; kept in "
                                                             "the proof"),
    "display_name": Field(default=None, description="The name people see on public pages (default: name)"),
    "color": Field(default=None, description="Accent colour of this list's public pages, #rrggbb"),
}


class ListCreate(InputSchema):
    # app.services.lists: a public signup form shows the consent wording (each signup's proof), on the shop's pages.
    # The const typed: openapi-python-client writes invalid Python for an untyped `const: false`.
    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"properties": {"public_signup": {"type": "boolean", "const": False}}},
        {"required": ["signup_wording", "signup_origins"],
         "properties": {"signup_wording": {"type": "string"}, "signup_origins": {"minItems": 1}}},
    ]})

    name: ListName
    description: LongText | None = None
    double_opt_in: bool = False
    accepted_kinds: AcceptedKinds | None = Field(default=None, description="null: every kind of contact")
    public_signup: bool = _PUBLIC_FIELDS["public_signup"]
    signup_origins: SignupOrigins = _PUBLIC_FIELDS["signup_origins"]
    signup_wording: Wording | None = _PUBLIC_FIELDS["signup_wording"]
    signup_policy_version: PolicyVersion | None = _PUBLIC_FIELDS["signup_policy_version"]
    display_name: DisplayName | None = _PUBLIC_FIELDS["display_name"]
    color: Color | None = _PUBLIC_FIELDS["color"]


class ListPatch(InputSchema):
    """Merge patch: absent fields untouched; null clears description, accepted_kinds (= any kind) and the
    public page texts."""

    name: ListName | None = absent_or_set()
    description: LongText | None = None
    double_opt_in: bool | None = absent_or_set()
    accepted_kinds: AcceptedKinds | None = None
    public_signup: bool | None = absent_or_set()
    signup_origins: SignupOrigins | None = absent_or_set()
    signup_wording: Wording | None = None
    signup_policy_version: PolicyVersion | None = None
    display_name: DisplayName | None = None
    color: Color | None = None

    _required_fields_stay = field_validator("name", "double_opt_in", "public_signup", "signup_origins",
                                            mode="before")(refuse_null)


class ListCounts(BaseModel):
    subscribed: int
    pending: int
    unsubscribed: int


class ListRead(BaseModel):
    id: uuid.UUID
    name: str
    description: str | None
    double_opt_in: bool
    accepted_kinds: list[str] | None
    public_signup: bool
    signup_origins: list[str]
    signup_wording: str | None
    signup_policy_version: str | None
    display_name: str | None
    color: str | None
    counts: ListCounts
    created_at: datetime
    updated_at: datetime
    version: int


# A list's definition and counts are lists:read's: a PATCH answers a token without it a receipt (security.md, 11).
ListWritten = ListRead | VersionReceipt


class ListPage(BaseModel):
    data: list[ListRead]
    next_cursor: str | None


class SubscribeConsent(InputSchema):
    """The newsletter-form case: the email_marketing consent given with the subscription."""

    occurred_at: Annotated[AwareDatetime, FromJSON] | None = Field(
        default=None, description="When the person agreed (default: now)")
    source: ShortText | None = None
    proof: ConsentProof


class SubscribeRequest(InputSchema):
    source: ShortText | None = Field(default=None, description="How the contact joined (default: api)")
    consent: SubscribeConsent | None = Field(
        default=None, description="Required unless the ledger already holds a current email_marketing grant"
    )


class MemberRead(BaseModel):
    list_id: uuid.UUID
    contact_id: uuid.UUID
    status: MemberStatus
    source: str | None
    subscribed_at: datetime | None
    unsubscribed_at: datetime | None
    pending_since: datetime | None
    updated_at: datetime


class MemberReceipt(BaseModel):
    """A membership write's answer to a token without lists:read: the write's outcome, not the stored history."""

    list_id: uuid.UUID
    contact_id: uuid.UUID
    status: MemberStatus = Field(description="The membership's status after this write")
    created: bool = Field(description="true when this write created the membership")


# A membership's source and dates are what GET /v1/lists/{id}/members (lists:read) shows (security.md, class 11).
MemberWritten = MemberRead | MemberReceipt


class MemberPage(BaseModel):
    data: list[MemberRead]
    next_cursor: str | None


class MemberBatch(InputSchema):
    # At least one contact; at most MAX_BATCH in add and remove together, and none in both (the server counts those).
    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"required": [name], "properties": {name: {"minItems": 1}}} for name in ("add", "remove")]})

    add: list[Uuid] = Field(default_factory=list, max_length=MAX_BATCH,
                            description="Contacts to subscribe (ledger consent needed)")
    remove: list[Uuid] = Field(default_factory=list, max_length=MAX_BATCH, description="Contacts to unsubscribe")
    source: ShortText | None = Field(default=None, description="Source recorded on added memberships")

    @model_validator(mode="after")
    def _size(self) -> Self:
        total = len(self.add) + len(self.remove)
        if not 1 <= total <= MAX_BATCH:
            raise ValueError(f"between 1 and {MAX_BATCH} contacts in add and remove together")
        if set(self.add) & set(self.remove):
            raise ValueError("a contact cannot be both added and removed")
        return self


class MemberBatchItem(BaseModel):
    index: int = Field(description="Position in add, then remove")
    op: str = Field(description="add | remove")
    contact_id: uuid.UUID
    status: str = Field(description="pending | subscribed | unsubscribed | error")
    error: dict[str, Any] | None = Field(default=None, description="problem+json body for this item")


class MemberBatchResult(BaseModel):
    results: list[MemberBatchItem]
    succeeded: int
    errors: int


class LinkTarget(BaseModel):
    id: uuid.UUID
    name: str


class ConfirmResult(BaseModel):
    result: str = Field(description="confirmed | already_confirmed")
    list: LinkTarget | None
    status: MemberStatus | None


class ConfirmPreview(BaseModel):
    """What a confirmation link would do; reading it changes nothing (mail scanners follow links)."""

    list: LinkTarget | None
    status: MemberStatus | None
    confirm_url: str = Field(description="POST here to confirm")


class UnsubscribePreview(BaseModel):
    """What a one-click link would do; reading it changes nothing (mail scanners follow links)."""

    list: LinkTarget | None
    status: MemberStatus | None
    unsubscribe_url: str = Field(description="POST here to leave this list")
    unsubscribe_all_url: str = Field(description="POST here to withdraw email_marketing consent (every list)")


class UnsubscribeResult(BaseModel):
    result: str = Field(description="unsubscribed")
    list: LinkTarget | None
    status: MemberStatus | None
    unsubscribed_lists: int = Field(description="Memberships this request changed (0 on a replay)")


def present_list(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "name": row["name"],
        "description": row["description"],
        "double_opt_in": row["double_opt_in"],
        "accepted_kinds": row["accepted_kinds"],
        **{k: row[k] for k in ("public_signup", "signup_origins", "signup_wording", "signup_policy_version",
                               "display_name", "color")},
        "counts": {"subscribed": row["subscribed"], "pending": row["pending"], "unsubscribed": row["unsubscribed"]},
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "version": row["version"],
    }


def present_member(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("list_id", "contact_id", "status", "source", "subscribed_at", "unsubscribed_at",
                                "pending_since", "updated_at")}


def present_member_receipt(row: Mapping[str, Any], *, created: bool) -> dict[str, Any]:
    return {"list_id": row["list_id"], "contact_id": row["contact_id"], "status": row["status"], "created": created}
