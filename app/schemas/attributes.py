"""Custom attribute definitions and tags on the wire."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from app.schemas.base import InputSchema
from app.schemas.strict import FromJSON
from app.schemas.types import AttributeName, LongText, ShortText, TagName

__all__ = ["AttributeCreate", "AttributePatch", "AttributeRead", "AttributeReceipt", "AttributeType", "TagCreate",
           "TagRead"]


class AttributeType(StrEnum):
    TEXT = "text"
    NUMBER = "number"
    BOOLEAN = "boolean"
    DATE = "date"
    ENUM = "enum"
    MULTI_ENUM = "multi_enum"


_ENUMS = {AttributeType.ENUM, AttributeType.MULTI_ENUM}
Options = list[ShortText]


class AttributeCreate(InputSchema):
    # _options_match_type, for the contract: distinct options for the enums, none for the other types. Each branch
    # typed (object, string enum, string items) though the properties already say so: openapi-python-client
    # refuses an untyped union member.
    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"type": "object", "required": ["options"], "properties": {
            "type": {"type": "string", "enum": sorted(_ENUMS)},
            "options": {"type": "array", "minItems": 1, "uniqueItems": True, "items": {"type": "string"}}}},
        {"type": "object", "properties": {
            "type": {"type": "string", "enum": sorted(set(AttributeType) - _ENUMS)}, "options": {"type": "null"}}},
    ]})

    name: AttributeName
    type: Annotated[AttributeType, FromJSON]
    options: Options | None = Field(default=None, max_length=500, validate_default=True,  # absent: judged too
                                    description="Required for enum and multi_enum")
    description: LongText | None = None

    @field_validator("options")
    @classmethod
    def _options_match_type(cls, options: list[str] | None, info: ValidationInfo) -> list[str] | None:
        """A fault is the field's (a 422 on `options`, as PATCH answers); `type` is judged first (declared first)."""
        if "type" not in info.data:  # the type was refused: its own error says it
            return options
        if info.data["type"] in _ENUMS:
            if not options:
                raise ValueError("enum and multi_enum attributes need a non-empty options list")
            if len(set(options)) != len(options):
                raise ValueError("options must be distinct")
        elif options is not None:
            raise ValueError("options are only for enum and multi_enum attributes")
        return options


class AttributePatch(InputSchema):
    """The type cannot change (stored values would no longer match); options may only grow."""

    options: Options | None = Field(default=None, max_length=500)
    description: LongText | None = None


class AttributeRead(BaseModel):
    name: str
    type: AttributeType
    options: list[str] | None
    description: str | None
    created_at: datetime
    updated_at: datetime


class AttributeReceipt(BaseModel):
    """PATCH /v1/attributes/{name}'s answer to a token without contacts:read: which definition, its version."""

    name: str
    version: int = Field(description="Its version after the write, as in the ETag (for If-Match)")


class TagCreate(InputSchema):
    name: TagName
    description: LongText | None = None


class TagRead(BaseModel):
    name: str
    description: str | None
    created_at: datetime
