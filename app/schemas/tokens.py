"""Access tokens on the wire."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.base import InputSchema
from app.schemas.strict import FromJSON
from app.schemas.types import NON_BLANK, ShortText, WholeNumber
from app.security import ROLE_SCOPES, Role, Scope

__all__ = ["Me", "TokenCreate", "TokenIssued", "TokenRead"]


class TokenCreate(InputSchema):
    # Which scopes each role may be narrowed to, for the contract (issue_access_token enforces it).
    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"properties": {"role": {"const": role.value},
                        "scopes": {"anyOf": [{"type": "array", "items": {"enum": sorted(ROLE_SCOPES[role])}},
                                             {"type": "null"}]}}}
        for role in Role]})
    subject: Annotated[ShortText, NON_BLANK] = Field(min_length=1,
                                                     description="Who the token is for, e.g. intern@shop.example")
    role: Annotated[Role, FromJSON]
    scopes: list[Annotated[Scope, FromJSON]] | None = Field(
        default=None, max_length=len(Scope), description="Narrow the role's scopes; never widen them")
    ttl_seconds: Annotated[int, Field(ge=60, le=366 * 24 * 3600), WholeNumber] | None = None


class TokenIssued(BaseModel):
    token: str = Field(description="Shown once; Carnet keeps only its id")
    jti: str
    expires_at: datetime


class TokenRead(BaseModel):
    jti: str
    subject: str
    role: str
    scopes: list[str]
    issued_at: datetime
    expires_at: datetime
    issued_by: str
    revoked_at: datetime | None
    revoked_by: str | None


class Me(BaseModel):
    subject: str
    role: Role
    scopes: list[Scope]
    token_id: str
