"""Custom attribute definitions and tags on the wire."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.schemas.base import InputSchema
from app.schemas.strict import FromJSON
from app.schemas.types import AttributeName, LongText, ShortText, TagName

__all__ = ["AttributeCreate", "AttributePatch", "AttributeRead", "AttributeType", "TagCreate", "TagRead"]


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
    options: Options | None = Field(default=None, max_length=500, description="Required for enum and multi_enum")
    description: LongText | None = None

    @model_validator(mode="after")
    def _options_match_type(self) -> Self:
        if self.type in _ENUMS:
            if not self.options:
                raise ValueError("enum and multi_enum attributes need a non-empty options list")
            if len(set(self.options)) != len(self.options):
                raise ValueError("options must be distinct")
        elif self.options is not None:
            raise ValueError("options are only for enum and multi_enum attributes")
        return self


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


class TagCreate(InputSchema):
    name: TagName
    description: LongText | None = None


class TagRead(BaseModel):
    name: str
    description: str | None
    created_at: datetime
