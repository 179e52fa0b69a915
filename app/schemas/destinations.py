"""Destinations and deliveries on the wire. Secrets go in, never out (except once, when Carnet made them)."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    UrlConstraints,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

from app.schemas.base import InputSchema, VersionReceipt
from app.schemas.strict import FromJSON
from app.schemas.types import (
    NON_BLANK,
    CurrencyCode,
    Declared,
    ShortText,
    Uuid,
    WholeNumber,
    absent_or_set,
    one_of_required,
    refuse_null,
)

__all__ = [
    "SECRET_FIELDS",
    "BrevoConfig",
    "DeliveryPage",
    "DeliveryRead",
    "DeliveryReceipt",
    "DeliveryStatus",
    "DeliveryWritten",
    "DestinationCreate",
    "DestinationCreated",
    "DestinationKind",
    "DestinationPage",
    "DestinationPatch",
    "DestinationRead",
    "DestinationWritten",
    "ListMapping",
    "MailchimpConfig",
    "ResyncResult",
    "WebhookConfig",
    "config_components",
    "config_model",
]

# Config keys that are secrets: stored encrypted (app.security.secrets), never returned.
SECRET_FIELDS = frozenset({"api_key", "secret", "previous_secret", "signing_secret", "inbound_secret"})


class DestinationKind(StrEnum):
    BREVO = "brevo"
    MAILCHIMP = "mailchimp"
    WEBHOOK = "webhook"


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    DELIVERED = "delivered"
    DEAD = "dead"


RemoteName = Annotated[str, StringConstraints(min_length=1, max_length=100), NON_BLANK]  # a vendor's list id, tag
DestinationName = Annotated[ShortText, StringConstraints(min_length=1, max_length=100), NON_BLANK]
Secret = Annotated[SecretStr, Field(min_length=8, max_length=500)]
_REMOTE_FIELD_PATTERN = r"^[A-Za-z0-9_.\-]{1,100}$"
RemoteField = Annotated[str, StringConstraints(max_length=100, pattern=_REMOTE_FIELD_PATTERN)]
MAX_CONFIG_KEYS = 20      # the largest kind's config has fewer keys
MAX_FIELD_MAPPINGS = 200  # Carnet fields mapped to vendor fields
# Carnet fields a vendor field may be mapped from: the contact's own fields and `attributes.<name>`.
MAPPABLE_FIELDS = frozenset({
    "external_id", "phone", "first_name", "last_name", "company", "job_title", "sector", "gender", "birth_date",
    "language", "source", "kind", "lifecycle_stage", "address.line1", "address.line2", "address.postal_code",
    "address.city", "address.region", "address.country", "stats.orders_count", "stats.total_spent",
    "stats.average_basket", "stats.first_order_at", "stats.last_order_at", "stats.last_order_amount",
    "preferences_url",  # the person's signed preference center link, for the vendor's templates
})
_ATTRIBUTE_FIELD = re.compile(r"^attributes\.[a-z][a-z0-9_]{0,62}$")


# A URL in a config: at most 2,000 characters, as a cart's `checkout_url` (pydantic's AnyHttpUrl has no bound:
# a 1 MB URL was stored and shown back whole to every reader of destinations).
MAX_URL_CHARS = 2000
WebUrl = Annotated[AnyHttpUrl, UrlConstraints(max_length=MAX_URL_CHARS)]


def _without_credentials(value: AnyHttpUrl | None) -> AnyHttpUrl | None:
    # `config` is shown to every reader of destinations: a password in a URL would be a secret in clear there.
    if value is not None and (value.username or value.password):
        raise ValueError("no credentials in the URL: secrets go in the write-only fields (`api_key`, `secret`)")
    return value


class _Config(InputSchema):
    base_url: WebUrl | None = Field(default=None, description="Overrides the vendor's API host (proxies, tests)")
    inbound_secret: Secret | None = Field(default=None, description="Write-only; generated when absent")

    @field_validator("base_url")
    @classmethod
    def _no_credentials(cls, value: AnyHttpUrl | None) -> AnyHttpUrl | None:
        return _without_credentials(value)


EventTypeName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_.]{0,63}$")]  # as EventCreate.type


class _Commerce(InputSchema):
    """Commerce data to the emailing tool (docs/sync.md, "Commerce"): every option off unless set."""

    push_orders: bool | None = Field(default=None, description="Orders and their status changes (default false)")
    push_carts: bool | None = Field(default=None, description=(
        "Carts, for abandoned-cart automations; only of people with a current email_marketing grant (default false)"))
    push_events: list[EventTypeName] | None = Field(default=None, max_length=20, description=(
        "Event types sent as the vendor's custom events; only of people with a current email_marketing grant"))

    @field_validator("push_events")
    @classmethod
    def _once_each(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(value) != len(set(value)):
            raise ValueError("an event type is listed twice")
        return value


class BrevoConfig(_Config, _Commerce):
    api_key: Secret | None = Field(default=None, description="Write-only (`api-key` header)")
    double_opt_in_template_id: Annotated[int, Field(ge=1, le=2**63 - 1), WholeNumber] | None = Field(
        default=None, description="For vendor double opt-in lists")  # Brevo's templateId: an int64
    double_opt_in_redirect_url: WebUrl | None = None


class MailchimpConfig(_Config, _Commerce):
    api_key: Secret | None = Field(default=None, description="Write-only; its `-usN` suffix names the datacenter")
    signing_secret: Secret | None = Field(default=None, description="Write-only; checks X-Mailchimp-Signature")
    store_id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,50}$")] | None = Field(
        default=None, description=("The e-commerce store orders and carts go to; created if missing (required by "
                                   "push_orders and push_carts)"))
    store_list_id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,100}$")] | None = Field(
        default=None, description="The audience of a store Carnet creates (default: the first mapped list)")
    store_currency: CurrencyCode | None = Field(
        default=None, description="The currency of a store Carnet creates (default: that of the first order or cart)")

    @field_validator("push_events")
    @classmethod
    def _mailchimp_event_names(cls, value: list[str] | None) -> list[str] | None:
        # Mailchimp's member event `name` "Must be 2-30 characters in length" (the spec's `Events`).
        if value is not None and any(not 2 <= len(name) <= 30 for name in value):
            raise ValueError("a Mailchimp event name has 2 to 30 characters")
        return value


_WHSEC = re.compile(r"^whsec_[A-Za-z0-9+/]{32,88}={0,2}$")
WebhookSecret = Annotated[SecretStr, Declared(pattern=_WHSEC.pattern)]  # checked by _standard_webhooks_secret


class WebhookConfig(_Config):
    url: WebUrl | None = None
    secret: WebhookSecret | None = Field(default=None, max_length=500,
                                         description="Write-only `whsec_...`; generated when absent")
    previous_secret: WebhookSecret | None = Field(default=None, max_length=500,
                                                  description="Write-only; also signs during a rotation")
    topics: list[Annotated[str, StringConstraints(max_length=64, pattern=r"^[a-z_]+\.[a-z_]+$")]] | None = Field(
        default=None, max_length=50, description="Only these topics (default: all)")


    @field_validator("url")
    @classmethod
    def _no_url_credentials(cls, value: AnyHttpUrl | None) -> AnyHttpUrl | None:
        return _without_credentials(value)

    @field_validator("secret", "previous_secret")
    @classmethod
    def _standard_webhooks_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not _WHSEC.fullmatch(value.get_secret_value()):
            raise ValueError("a Standard Webhooks secret: `whsec_` then base64 of 24 to 64 random bytes")
        return value




def config_model(kind: DestinationKind) -> type[_Config]:
    return {DestinationKind.BREVO: BrevoConfig, DestinationKind.MAILCHIMP: MailchimpConfig,
            DestinationKind.WEBHOOK: WebhookConfig}[kind]


class ListMapping(InputSchema):
    list_id: Uuid
    remote_list_id: RemoteName
    double_opt_in: bool = Field(default=False, description="Confirm through the vendor (Mailchimp pending, "
                                                           "Brevo doubleOptinConfirmation)")


class SegmentMapping(InputSchema):
    segment_id: Uuid
    remote_list_id: RemoteName | None = Field(
        default=None, description="Brevo: the list the segment fills; Mailchimp: the audience whose members get "
                                  "the tag (an audience of list_mappings); webhook: none")
    tag: RemoteName | None = Field(
        default=None, description="Mailchimp only: the tag that marks the segment's members")


# What _check_field_mappings accepts, for the contract (pydantic alone would allow any key beside the pattern).
FieldMappings = Annotated[dict[RemoteField, RemoteField], WithJsonSchema({
    "type": "object", "maxProperties": MAX_FIELD_MAPPINGS,
    "propertyNames": {"anyOf": [{"enum": sorted(MAPPABLE_FIELDS)}, {"pattern": _ATTRIBUTE_FIELD.pattern}]},
    "additionalProperties": {"type": "string", "maxLength": 100, "pattern": _REMOTE_FIELD_PATTERN},
    "description": "Carnet field (`first_name`, `attributes.size`) → vendor field",
})]


def _check_field_mappings(value: dict[str, str] | None) -> dict[str, str] | None:
    for carnet_field in value or {}:
        if carnet_field not in MAPPABLE_FIELDS and not _ATTRIBUTE_FIELD.fullmatch(carnet_field):
            raise ValueError(f"{carnet_field!r} is not a mappable contact field")
    return value


class _Mapped(InputSchema):
    @field_validator("list_mappings", "segment_mappings", check_fields=False)
    @classmethod
    def _mapped_once(cls, mappings: list[Any] | None, info: ValidationInfo) -> list[Any] | None:
        key = "list_id" if info.field_name == "list_mappings" else "segment_id"
        ids = [getattr(m, key) for m in mappings or ()]
        if len(ids) != len(set(ids)):
            raise ValueError(f"a {key.removesuffix('_id')} is mapped twice")
        return mappings


# The config keys a creation needs (the webhook's `secret` is generated when absent).
_NEEDED = {DestinationKind.BREVO: ("api_key",), DestinationKind.MAILCHIMP: ("api_key",),
           DestinationKind.WEBHOOK: ("url",)}


def config_components() -> dict[str, Any]:
    """Each kind's config at creation (BrevoConfig, ...), for components/schemas: its keys, and those a creation
    needs. Whether a URL may be reached (no private address) and a list exists the server judges. Named components,
    not inline: client generators (openapi-python-client) give an inline object in a union one clashing name."""
    return {config_model(kind).__name__: {
        **config_model(kind).model_json_schema(), **one_of_required(*_NEEDED[kind]),
        "description": f"The config of a {kind.value} destination, as a creation takes it"}
        for kind in DestinationKind}


def _config_by_kind() -> dict[str, Any]:
    """Each kind's config, for the contract (the components of config_components, which app.main adds)."""
    return {"anyOf": [
        {"properties": {"kind": {"const": kind.value},
                        "config": {"$ref": f"#/components/schemas/{config_model(kind).__name__}"}},
         "required": ["config"]}
        for kind in DestinationKind]}


class DestinationCreate(_Mapped):
    model_config = ConfigDict(json_schema_extra=_config_by_kind())
    kind: Annotated[DestinationKind, FromJSON]
    name: DestinationName
    enabled: bool = True
    config: dict[str, Any] = Field(default_factory=dict, max_length=MAX_CONFIG_KEYS,
                                   description="Per kind; secrets in it are write-only")
    list_mappings: Annotated[list[ListMapping], Field(max_length=100)] = Field(default_factory=list)
    segment_mappings: Annotated[list[SegmentMapping], Field(max_length=20)] = Field(
        default_factory=list, description="Segments synced: their members enter and leave as the segment changes")
    field_mappings: FieldMappings = Field(default_factory=dict, max_length=MAX_FIELD_MAPPINGS)

    _fields = field_validator("field_mappings")(_check_field_mappings)


class DestinationPatch(_Mapped):
    """Merge patch. `config` is merged key by key (a secret given replaces the stored one; null removes a key)."""

    name: DestinationName | None = absent_or_set()
    enabled: bool | None = absent_or_set()
    config: dict[str, Any] | None = Field(default=None, max_length=MAX_CONFIG_KEYS)
    list_mappings: Annotated[list[ListMapping], Field(max_length=100)] | None = absent_or_set()
    segment_mappings: Annotated[list[SegmentMapping], Field(max_length=20)] | None = absent_or_set()
    field_mappings: FieldMappings | None = absent_or_set(max_length=MAX_FIELD_MAPPINGS)

    _fields = field_validator("field_mappings")(_check_field_mappings)

    _not_null = field_validator("name", "enabled", "list_mappings", "segment_mappings", "field_mappings",
                                mode="before")(refuse_null)


class DestinationHealth(BaseModel):
    last_success_at: datetime | None
    last_error_at: datetime | None
    last_error: str | None
    consecutive_failures: int
    disabled_reason: str | None
    pending: int
    dead: int


class SegmentMappingRead(BaseModel):
    segment_id: uuid.UUID
    remote_list_id: str | None
    tag: str | None
    members: int = Field(description="Members in the last snapshot (before the consent rule of vendors)")
    refreshed_at: datetime | None = Field(
        description="When the snapshot was last brought up to date; null: never yet (due now, unless last_error)")
    last_error: Literal["invalid_filter", "statement_timeout"] | None = Field(description=(
        "Why the last refresh failed (the snapshot was left as it was; tried again at the next round): "
        "invalid_filter, the segment's filter no longer compiles (an attribute it names was deleted); "
        "statement_timeout, the refresh ran past the worker's statement timeout. Null once one succeeds"))
    failed_at: datetime | None = Field(description="When that refresh failed; null when last_error is")


class DestinationRead(BaseModel):
    id: uuid.UUID
    kind: DestinationKind
    name: str
    enabled: bool
    config: dict[str, Any] = Field(description="Without secrets")
    secrets_set: list[str] = Field(description="Names of the secrets stored (their values are never shown)")
    list_mappings: list[dict[str, Any]]
    segment_mappings: list[SegmentMappingRead]
    field_mappings: dict[str, str]
    inbound_url: str | None
    health: DestinationHealth
    created_at: datetime
    updated_at: datetime
    version: int


# A destination's settings and health are destinations:read's: a PATCH answers a token without it a receipt
# (docs/security.md, class 11).
DestinationWritten = DestinationRead | VersionReceipt


class DestinationCreated(DestinationRead):
    generated_secrets: dict[str, str] = Field(
        description="Secrets Carnet generated (inbound_secret, webhook secret): shown this once only")


class DestinationPage(BaseModel):
    data: list[DestinationRead]
    next_cursor: str | None


class DeliveryRead(BaseModel):
    id: int
    destination_id: uuid.UUID
    contact_id: uuid.UUID | None
    topic: str
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    delivered_at: datetime | None


class DeliveryReceipt(BaseModel):
    """A retry's answer to a token without destinations:read: the delivery's id and status, not the sync log's
    record (its destination, contact, topic, last error)."""

    id: int = Field(description="The delivery that will carry it (a newer one when the retried one was folded in)")
    status: DeliveryStatus = Field(description="After the retry: pending, or as it was when delivered or in flight")


DeliveryWritten = DeliveryRead | DeliveryReceipt


class DeliveryPage(BaseModel):
    data: list[DeliveryRead]
    next_cursor: str | None


class ResyncResult(BaseModel):
    queued: int = Field(description="Contacts queued for a full push")
