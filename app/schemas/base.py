"""Base classes for wire schemas."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["InputSchema", "OutputSchema"]


class InputSchema(BaseModel):
    # API.md: unknown fields are a 422, so a typo never silently drops data. Strict: a value of the wrong JSON type
    # is a 422, never converted (`0` is not `false`); UUIDs, enumerations, dates, timestamps and decimals, which
    # JSON carries as text, are annotated `FromJSON` (app.schemas.strict).
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, strict=True)


class OutputSchema(BaseModel):
    model_config = ConfigDict(from_attributes=True)
