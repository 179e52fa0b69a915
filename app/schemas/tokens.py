"""Access tokens on the wire."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, Field

from app.schemas.base import InputSchema
from app.schemas.strict import FromJSON
from app.schemas.types import ShortText
from app.security import Role, Scope

__all__ = ["Me", "TokenCreate", "TokenIssued", "TokenRead"]


class TokenCreate(InputSchema):
    subject: ShortText = Field(min_length=1, description="Who the token is for, e.g. intern@shop.example")
    role: Annotated[Role, FromJSON]
    scopes: list[Annotated[Scope, FromJSON]] | None = Field(
        default=None, max_length=len(Scope), description="Narrow the role's scopes; never widen them")
    ttl_seconds: int | None = Field(default=None, ge=60, le=366 * 24 * 3600)


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
