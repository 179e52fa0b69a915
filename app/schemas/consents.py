"""The consent ledger on the wire: events in, state and events out."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyAddress,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from app.schemas.base import InputSchema
from app.schemas.strict import FromJSON
from app.schemas.types import AwareTimestamp, Declared, LongText, ShortText, one_of_required
from app.security.masking import mask_text

__all__ = [
    "CanEmail",
    "ConsentAction",
    "ConsentCreate",
    "ConsentEventRead",
    "ConsentLedger",
    "ConsentProof",
    "ConsentPurpose",
    "PurposeState",
    "present_event",
]


class ConsentPurpose(StrEnum):
    EMAIL_MARKETING = "email_marketing"
    SMS_MARKETING = "sms_marketing"
    PHONE_MARKETING = "phone_marketing"
    POSTAL_MARKETING = "postal_marketing"
    PROFILING = "profiling"
    PARTNER_SHARING = "partner_sharing"


class ConsentAction(StrEnum):
    GRANTED = "granted"
    WITHDRAWN = "withdrawn"
    CONFIRMED = "confirmed"  # a double opt-in click: confirms a grant


_PROOF_FIELDS = ("ip", "user_agent", "form_url", "wording", "policy_version")


class ConsentProof(InputSchema):
    """What shows the person really acted: where, with which words, under which policy."""

    model_config = ConfigDict(json_schema_extra=one_of_required(*_PROOF_FIELDS))

    ip: Annotated[IPvAnyAddress, Declared(anyOf=[{"format": "ipv4"}, {"format": "ipv6"}])] | None = None
    user_agent: LongText | None = None
    form_url: LongText | None = None
    wording: LongText | None = None
    policy_version: ShortText | None = None

    @field_serializer("ip")
    def _ip_as_text(self, value: Any) -> str | None:
        return str(value) if value is not None else None

    @model_validator(mode="after")
    def _says_something(self) -> Self:
        if all(getattr(self, name) is None for name in _PROOF_FIELDS):
            raise ValueError(f"a proof needs at least one of {', '.join(_PROOF_FIELDS)}")
        return self


class ConsentCreate(InputSchema):
    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"properties": {"action": {"enum": [ConsentAction.WITHDRAWN, ConsentAction.CONFIRMED]}}},
        {"required": ["proof"], "properties": {"proof": {"not": {"type": "null"}}}},
    ]})

    purpose: Annotated[ConsentPurpose, FromJSON]
    action: Annotated[ConsentAction, FromJSON]
    source: ShortText | None = Field(default=None, description="Where it happened: newsletter_form, checkout, ...")
    occurred_at: AwareTimestamp | None = Field(
        default=None, description="When the person acted (default: now); never in the future"
    )
    proof: ConsentProof | None = Field(default=None, validate_default=True, description="Required for `granted`")

    @field_validator("proof")
    @classmethod
    def _grants_carry_proof(cls, proof: ConsentProof | None, info: ValidationInfo) -> ConsentProof | None:
        if proof is None and info.data.get("action") is ConsentAction.GRANTED:
            raise ValueError("a granted consent needs a proof (GDPR art. 7(1): consent must be demonstrable)")
        return proof


class ProofRead(BaseModel):
    ip: str | None = None
    user_agent: str | None = None
    form_url: str | None = None
    wording: str | None = None
    policy_version: str | None = None
    vendor: str | None = Field(default=None, description="Set when an emailing tool reported the event (inbound sync)")


class ConsentEventRead(BaseModel):
    id: int
    purpose: str = Field(description="A purpose, or `list_subscription`: leaving the list `list_id` (no purpose "
                                     "changes)")
    action: str
    list_id: uuid.UUID | None = Field(default=None, description="The list the event was about, if any")
    source: str | None
    occurred_at: datetime
    recorded_at: datetime
    recorded_by: str
    proof: ProofRead | None


class PurposeState(BaseModel):
    granted: bool
    since: datetime | None = Field(description="When the current state began (null: never asked)")


class ConsentLedger(BaseModel):
    contact_id: uuid.UUID
    state: dict[ConsentPurpose, PurposeState]
    events: list[ConsentEventRead] = Field(description="The whole ledger, in the order things happened")


class CanEmail(BaseModel):
    marketing: bool = Field(description="Mailable address, current email_marketing consent, subscribed to a list")
    transactional: bool = Field(description="An address that does not bounce (order confirmations and the like)")


_PROOF_KEYS = ("ip", "user_agent", "form_url", "wording", "policy_version", "vendor")


def present_event(row: Mapping[str, Any], *, reveal_pii: bool) -> dict[str, Any]:
    """A ledger event on the wire; the IP, user agent and form URL are personal data, masked without pii:read
    (a form URL can carry the person: `?email=...`). The wording and policy version are the shop's own text."""
    proof = {k: row["proof"].get(k) for k in _PROOF_KEYS} if row["proof"] else None
    if proof is not None and proof["vendor"] is None:
        del proof["vendor"]  # only events an emailing tool reported carry it
    if proof is not None and not reveal_pii:
        proof["ip"] = mask_text(proof.get("ip"))
        proof["user_agent"] = mask_text(proof.get("user_agent"))
        proof["form_url"] = mask_text(proof.get("form_url"))
    return {k: row[k] for k in ("id", "purpose", "action", "list_id", "source", "occurred_at", "recorded_at",
                                "recorded_by")} | {
        "proof": proof
    }
