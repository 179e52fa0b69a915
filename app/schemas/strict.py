"""Strict request bodies: a JSON value of the wrong type is refused, never converted.

Request schemas (`InputSchema`) validate in pydantic's strict mode: `0` is not `false` (a `{"dry_run": 0}` once ran a
real retention), `"1"` is not `1`, `1.5` is not `1`. FastAPI validates the parsed body in Python mode, where strict
also refuses the text JSON carries for the types it has no literal for: UUIDs, enumerations, dates, timestamps,
decimals. A field of such a type is annotated with `FromJSON`: its value is then validated exactly as pydantic's
strict JSON mode validates it (an ISO 8601 string is a timestamp, a number is not; `"1.5"` and `1.5` are decimals).
An integer field is `Annotated[int, ..., WholeNumber]`: a number with a zero fraction (`2.0`) is an integer in JSON
Schema, so it is read as that integer; `2.5`, `"2"` and `true` are still refused.
`tests/security/test_non_boolean_dry_run_never_erases.py` walks every request schema and fails on a field that
misses either.
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, GetCoreSchemaHandler, TypeAdapter
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

__all__ = ["FromJSON", "TrueOnly", "WholeNumber", "is_guard"]


class _FromJSON:
    """A scalar of the annotated type as strict JSON validation reads it; anything else is left to the field's
    own (strict) validation: the instance itself from Python callers, a type error for the rest."""

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_before_validator_function(_JSONScalar(source), handler(source))

    def __repr__(self) -> str:
        return "FromJSON"


class _JSONScalar:
    def __init__(self, target: Any) -> None:
        self.target = target

    @cached_property
    def adapter(self) -> TypeAdapter[Any]:  # built on first use: the schema is generated at import time
        return TypeAdapter(self.target)

    def __call__(self, value: Any) -> Any:
        if not isinstance(value, str | int | float):  # bool included: refused with the type's own JSON message
            return value
        return self.adapter.validate_json(json.dumps(value), strict=True)


FromJSON = _FromJSON()


def _a_boolean(value: Any) -> Any:
    # `Literal[True]` takes 1 as True (1 == True), in strict mode and in JSON mode alike.
    if not isinstance(value, bool):
        raise PydanticCustomError("bool_type", "Input should be a valid boolean")
    return value


TrueOnly = Annotated[Literal[True], BeforeValidator(_a_boolean)]


def _whole_number(value: Any) -> Any:
    # JSON Schema's `integer` is any number with a zero fraction: `2.0` is one (and some JSON encoders write it so).
    # It becomes the int; `2.5`, `"2"`, `true`, NaN and infinities are left to strict int validation, which refuses
    # them.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


WholeNumber = BeforeValidator(_whole_number)


def is_guard(function: Any) -> bool:
    """Whether a core schema's before-validator function is one of these (the schema walk of the tests)."""
    return isinstance(function, _JSONScalar) or function in (_a_boolean, _whole_number)
