"""The preference center on the wire (JSON for scripts and tests; browsers get the page)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal, Self

from pydantic import BaseModel, Field, StringConstraints, model_validator

from app.schemas.base import InputSchema
from app.schemas.lists import MemberStatus
from app.schemas.strict import TrueOnly
from app.schemas.types import Uuid

__all__ = [
    "ErasureConfirmationRequired",
    "ErasureDone",
    "ErasureRequestSummary",
    "PreferenceList",
    "PreferencesChange",
    "PreferencesLinks",
    "PreferencesRead",
]

MAX_LISTS = 200


class PreferencesLinks(BaseModel):
    preferences_url: str = Field(description="The person's preference center: a signed link, no account needed. "
                                             "Never expires; a GET changes nothing")


class PreferenceList(BaseModel):
    id: uuid.UUID
    name: str = Field(description="The list's display name (else its name)")
    description: str | None
    status: MemberStatus | None = Field(description="null: never subscribed")


class ErasureRequestSummary(BaseModel):
    id: uuid.UUID
    status: str = Field(description="open | completed | refused")
    requested_at: datetime
    due_by: datetime | None = Field(default=None, description="GDPR art. 12(3): one month after the request")


class ErasureState(BaseModel):
    mode: Literal["self_service", "request"] = Field(description="self_service: a confirmed request erases at "
                                                                 "once; request: an admin answers it")
    request: ErasureRequestSummary | None = Field(description="The open request, if any")


class MarketingState(BaseModel):
    granted: bool


class PreferencesRead(BaseModel):
    email: str
    lists: list[PreferenceList] = Field(description="Lists taking public signups, and the lists the person is on")
    email_marketing: MarketingState
    erasure: ErasureState
    changed: int | None = Field(default=None, description="After a POST: memberships this request changed")


class ErasureConfirmationRequired(BaseModel):
    erasure: Literal["confirmation_required"]
    confirmation: str = Field(description="POST it back as `erase_confirmation` to go ahead")
    expires_at: datetime


class ErasureDone(BaseModel):
    erasure: Literal["completed", "requested"]
    request: ErasureRequestSummary


Confirmation = Annotated[str, StringConstraints(min_length=1, max_length=512)]


class PreferencesChange(InputSchema):
    """One change per POST: `lists`, `unsubscribe_all`, `export`, `erase` (first step) or `erase_confirmation`."""

    lists: dict[Uuid, Literal["subscribed", "unsubscribed"]] | None = Field(
        default=None, max_length=MAX_LISTS, description="Lists to set; lists not named are left as they are")
    unsubscribe_all: TrueOnly | None = Field(default=None, description="Withdraw email_marketing (every list)")
    export: TrueOnly | None = Field(default=None, description="Download everything held (GDPR art. 15)")
    erase: Literal["request"] | None = Field(default=None, description="Ask for erasure: answers a confirmation")
    erase_confirmation: Confirmation | None = Field(default=None, description="The confirmation from `erase`")

    @model_validator(mode="after")
    def _one_change(self) -> Self:
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("exactly one of lists, unsubscribe_all, export, erase, erase_confirmation")
        return self
