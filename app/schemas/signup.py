"""The public signup form on the wire (JSON or form-encoded) and its one answer."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, StringConstraints

from app.schemas.base import InputSchema
from app.schemas.strict import TrueOnly
from app.schemas.types import Email, ShortText

__all__ = ["HONEYPOT", "MAX_SIGNUP_BYTES", "SignupAccepted", "SignupForm"]

HONEYPOT = "website"          # hidden from people by the shop's form; a bot fills it in
MAX_SIGNUP_BYTES = 4096       # a form this size holds every field at its longest; larger is a 413

Name = Annotated[ShortText, StringConstraints(max_length=100)]


class SignupForm(InputSchema):
    email: Email
    first_name: Name | None = None
    last_name: Name | None = None
    consent: TrueOnly = Field(description="The person ticked the consent box (the list's signup_wording); "
                                               "form encoding: true, on, 1 or yes")
    website: Annotated[str, StringConstraints(max_length=200)] | None = Field(
        default=None, description="Honeypot: keep it empty and hidden from people (CSS, tabindex=-1, "
                                  "autocomplete=off). A filled one is answered like any signup, and nothing happens")


class SignupAccepted(BaseModel):
    """The same answer for every address: whether one was subscribed is never told (no enumeration)."""

    status: Literal["accepted"] = "accepted"
    detail: str = Field(description="What happens next, for the person")
