"""Base classes for wire schemas."""

from __future__ import annotations

import uuid

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["InputSchema", "OutputSchema", "VersionReceipt"]


class InputSchema(BaseModel):
    # API.md: unknown fields are a 422, so a typo never silently drops data. Strict: a value of the wrong JSON type
    # is a 422, never converted (`0` is not `false`); UUIDs, enumerations, dates, timestamps and decimals, which
    # JSON carries as text, are annotated `FromJSON` (app.schemas.strict).
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, strict=True)


class OutputSchema(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class VersionReceipt(BaseModel):
    """A definition's write answered to a token without its read scope (a list, a segment, a destination): which
    one and its version, nothing it holds (docs/security.md, class 11)."""

    id: uuid.UUID
    version: int = Field(description="Its version after the write, as in the ETag (for If-Match)")
