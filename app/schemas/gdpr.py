"""GDPR on the wire: the access export, suppression check and release, retention runs."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.schemas.base import InputSchema
from app.schemas.consents import ConsentLedger, ConsentProof, present_event
from app.schemas.contacts import ContactRead, present_contact
from app.schemas.history import HistoryEntry, present_history
from app.schemas.orders import CartRead, EventRead, OrderRead, present_contact_event
from app.schemas.types import Email, ExternalId, PhoneLookup, one_of_required
from app.security.masking import mask_text

__all__ = [
    "EXPORT_FORMAT",
    "RETENTION_IDS_SHOWN",
    "ContactExportRead",
    "ExportedMembership",
    "RetentionReportRead",
    "RetentionRun",
    "SuppressionCheck",
    "SuppressionRelease",
    "SuppressionReleased",
    "present_export",
]

EXPORT_FORMAT = "carnet.contact-export/1"


class ExportedMembership(BaseModel):
    list_id: uuid.UUID
    list_name: str
    status: str
    source: str | None
    subscribed_at: datetime | None
    unsubscribed_at: datetime | None
    pending_since: datetime | None
    pending_proof: dict[str, Any] | None = Field(
        default=None, description="A public signup waiting for confirmation: what the request showed (ip, user "
                                  "agent, page, wording); masked without pii:read")
    updated_at: datetime


class ContactExportRead(BaseModel):
    """Everything Carnet holds about one person (GDPR art. 15; machine-readable for art. 20)."""

    format: str = Field(description=f"`{EXPORT_FORMAT}`")
    generated_at: datetime
    contact_id: uuid.UUID
    pii_masked: bool = Field(description="true when personal data was masked for a token without pii:read")
    profile: ContactRead
    attributes: dict[str, Any]
    tags: list[str]
    memberships: list[ExportedMembership]
    consents: ConsentLedger = Field(description="Current state per purpose and the whole ledger")
    orders: list[OrderRead]
    carts: list[CartRead]
    events: list[EventRead]
    history: list[HistoryEntry] = Field(description="Every field change, oldest first")


class SuppressionCheck(BaseModel):
    suppressed: bool


class SuppressionRelease(InputSchema):
    """Re-admit an erased person who asked to come back; `proof` shows they did."""

    model_config = ConfigDict(json_schema_extra=one_of_required("email", "phone", "external_id"))

    email: Email | None = None
    phone: PhoneLookup | None = None
    external_id: ExternalId | None = Field(
        default=None, description="A customer number the erased person held (the shop gives it again, or the person "
                                  "comes back under it)")
    proof: ConsentProof = Field(description="The person's fresh request: where, when (ip), which wording")

    @model_validator(mode="after")
    def _names_an_address(self) -> Self:
        if not (self.email or self.phone or self.external_id):
            raise ValueError("email, phone or external_id is required")
        return self


class SuppressionReleased(BaseModel):
    released: list[str] = Field(description="Which of email, phone, external_id were released")


# A first run may erase years of prospects: the answer counts them all and names a bounded few (docs/gdpr.md).
RETENTION_IDS_SHOWN = 1000


class RetentionRun(InputSchema):
    dry_run: bool = Field(description="true: list what would be erased and change nothing")


class RetentionReportRead(BaseModel):
    dry_run: bool
    retention_days: int
    cutoff: datetime = Field(description="Prospects with no activity since this instant qualify")
    erased: int = Field(description="Contacts erased (dry run: that would be erased)")
    contact_ids: list[uuid.UUID] = Field(
        max_length=RETENTION_IDS_SHOWN,
        description=f"The first {RETENTION_IDS_SHOWN:,} of them by id; `carnet retention --dry-run` lists them all")
    contact_ids_truncated: bool = Field(description="true: `erased` counts more contacts than `contact_ids` lists")


def present_export(data: Any, *, reveal_pii: bool, generated_at: datetime) -> dict[str, Any]:
    """`data` is a services.gdpr.ContactExport; masking is the presenters' (as on every other route)."""
    contact = data.contact
    return {
        "format": EXPORT_FORMAT,
        "generated_at": generated_at,
        "contact_id": contact["id"],
        "pii_masked": not reveal_pii,
        "profile": present_contact(contact, reveal_pii=reveal_pii),
        "attributes": contact["attributes"],
        "tags": contact["tags"],
        "memberships": [_membership(m, reveal_pii=reveal_pii) for m in data.memberships],
        "consents": {**data.consents,
                     "events": [present_event(e, reveal_pii=reveal_pii) for e in data.consents["events"]]},
        "orders": [dict(o) for o in data.orders],
        "carts": [dict(c) for c in data.carts],
        "events": [present_contact_event(e, reveal_pii=reveal_pii) for e in data.events],
        "history": [present_history(h, reveal_pii=reveal_pii) for h in data.history],
    }


def _membership(row: Any, *, reveal_pii: bool) -> dict[str, Any]:
    out = {k: row[k] for k in ExportedMembership.model_fields}
    if out["pending_proof"] and not reveal_pii:
        out["pending_proof"] = {k: mask_text(v) if k in ("ip", "user_agent", "form_url") else v
                                for k, v in out["pending_proof"].items()}
    return out
