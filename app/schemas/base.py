"""Base classes for wire schemas."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["InputSchema", "OutputSchema"]


class InputSchema(BaseModel):
    # API.md: unknown fields are a 422, so a typo never silently drops data.
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class OutputSchema(BaseModel):
    model_config = ConfigDict(from_attributes=True)
