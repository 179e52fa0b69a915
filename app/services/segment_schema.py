"""The segment filter grammar as JSON Schema, for the contract: built from the compiler's own tables (FIELDS, OPS),
so that what openapi/openapi.json declares is what app.services.segments accepts.

What JSON Schema cannot say is in the descriptions: an `attributes.<name>` condition needs a defined attribute
(whose type decides its ops and value), groups nest at most MAX_DEPTH deep, a filter holds at most MAX_CONDITIONS
conditions.
"""

from __future__ import annotations

from typing import Any

from app.schemas.segments import FILTER_REF, MAX_CONDITIONS, MAX_DEPTH
from app.schemas.types import ATTRIBUTE_NAME_PATTERN
from app.services.segments import (
    BOOLEAN,
    CONSENT,
    COUNT_OPS,
    DATE,
    ENUM,
    EVENT_TYPE,
    FIELDS,
    INTEGER,
    LISTS,
    MAX_DAYS,
    MAX_TEXT,
    MAX_VALUES,
    MONEY_DIGITS,
    MONEY_PLACES,
    NUMBER,
    OPS,
    ORDER_COUNT,
    ORDER_ITEM,
    TAGS,
    TEXT,
    TIMESTAMP,
    WITH_COUNT,
    WITH_WINDOW,
    FieldSpec,
)

__all__ = ["filter_components"]

_CONDITION_REF = "#/components/schemas/SegmentCondition"
_COUNT_REF = "#/components/schemas/SegmentCount"

# What PostgreSQL text holds: no NUL, no lone surrogate (not UTF-8).
_TEXT: dict[str, Any] = {"type": "string", "maxLength": MAX_TEXT, "pattern": r"^[^\x00\ud800-\udfff]*$"}
_DAYS: dict[str, Any] = {"type": "integer", "minimum": 0, "maximum": MAX_DAYS}
_COUNT: dict[str, Any] = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_SCALARS: dict[str, dict[str, Any]] = {
    TEXT: _TEXT, ENUM: _TEXT, TAGS: _TEXT, ORDER_ITEM: _TEXT, EVENT_TYPE: _TEXT,
    # the contact's money columns (numeric(14, 2)): an integer, or a decimal string (a JSON float with at most 2
    # decimals is read too, and not declared: a binary float such as 0.57000000000000001 has more)
    NUMBER: {"anyOf": [{"type": "integer", "minimum": 1 - 10**MONEY_DIGITS, "maximum": 10**MONEY_DIGITS - 1},
                       {"type": "string", "maxLength": MONEY_DIGITS + MONEY_PLACES + 2,
                        "pattern": rf"^-?[0-9]{{1,{MONEY_DIGITS}}}(\.[0-9]{{1,{MONEY_PLACES}}})?$"}]},
    INTEGER: _COUNT, ORDER_COUNT: _COUNT,
    TIMESTAMP: {"anyOf": [{"type": "string", "format": "date-time", "maxLength": 40},
                          {"type": "string", "format": "date"}]},
    DATE: {"type": "string", "format": "date"},
    BOOLEAN: {"type": "boolean"}, CONSENT: {"type": "boolean"},
    LISTS: {"type": "string", "format": "uuid"},
}


# A custom attribute's value, whatever its type (the server checks it against the type): bounded text, a number
# within what a number attribute stores, a flag, or a list of those for in / nin / between.
_ATTRIBUTE_NUMBER: dict[str, Any] = {"type": "number", "exclusiveMinimum": -10.0**15, "exclusiveMaximum": 10.0**15}
_ATTRIBUTE_SCALAR: dict[str, Any] = {"anyOf": [_TEXT, _ATTRIBUTE_NUMBER, {"type": "boolean"}]}
_ATTRIBUTE_VALUE: dict[str, Any] = {"anyOf": [
    _TEXT, _ATTRIBUTE_NUMBER, {"type": "boolean"},
    {"type": "array", "minItems": 1, "maxItems": MAX_VALUES, "items": _ATTRIBUTE_SCALAR}]}


def _scalar(spec: FieldSpec) -> dict[str, Any]:
    return {"type": "string", "enum": list(spec.choices)} if spec.choices else _SCALARS[spec.kind]


def _value(spec: FieldSpec, op: str) -> dict[str, Any]:
    """The value an op takes on this field (the compiler's _scalar, _values, _pair, _days, _exists)."""
    if op == "exists":
        return {"type": "boolean"}
    if op in ("within_days", "older_than_days"):
        return _DAYS
    if op in ("in", "nin"):
        return {"type": "array", "minItems": 1, "maxItems": MAX_VALUES, "items": _scalar(spec)}
    if op == "between":
        return {"type": "array", "minItems": 2, "maxItems": 2, "items": _scalar(spec)}
    return _scalar(spec)


def _conditions(name: str, spec: FieldSpec) -> list[dict[str, Any]]:
    """One schema per value shape of the field's ops (eq and gt take one value, in a list, ...)."""
    by_value: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for op in OPS[spec.kind]:
        value = _value(spec, op)
        by_value.setdefault(repr(value), (value, []))[1].append(op)
    extra: dict[str, Any] = {}
    if spec.kind in WITH_WINDOW:
        extra["within_days"] = _DAYS
    if spec.kind in WITH_COUNT:
        extra["count"] = {"$ref": _COUNT_REF}
    return [{
        "type": "object", "additionalProperties": False,
        "required": ["field", "op"] if ops == ["exists"] else ["field", "op", "value"],
        "properties": {"field": {"const": name}, "op": {"type": "string", "enum": ops}, "value": value, **extra},
    } for value, ops in by_value.values()]


def _group(name: str, member: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": [name], "properties": {name: member}}


def filter_components() -> dict[str, Any]:
    """`SegmentFilter` (a group or a condition), its groups `SegmentAll`, `SegmentAny`, `SegmentNot`,
    `SegmentCondition` and `SegmentCount`, for components/schemas. Each a named component, so that client generators
    (openapi-python-client) name one model each and follow the recursion through `$ref`."""
    group_of = {"type": "array", "minItems": 1, "maxItems": MAX_CONDITIONS, "items": {"$ref": FILTER_REF}}
    attribute_ops = sorted({op for ops in OPS.values() for op in ops})
    conditions = [schema for name, spec in FIELDS.items() for schema in _conditions(name, spec)]
    conditions.append({
        "type": "object", "additionalProperties": False, "required": ["field", "op"],
        "description": "A custom attribute: it must be defined (/v1/attributes), and its type decides the ops and "
                       "the value, as for the fields of the same type (the server judges)",
        "properties": {"field": {"type": "string", "maxLength": 74,  # "attributes." and a name of 63
                                 "pattern": "^attributes\\." + ATTRIBUTE_NAME_PATTERN[1:]},
                       "op": {"type": "string", "enum": attribute_ops}, "value": _ATTRIBUTE_VALUE},
    })
    return {
        "SegmentFilter": {
            "description": f"A group (all, any: a non-empty array; not: one node) or a condition. Groups nest at "
                           f"most {MAX_DEPTH} deep and a filter holds at most {MAX_CONDITIONS} conditions (the "
                           "server counts: 422 too_deep, too_many_conditions). Grammar: docs/api.md, Segments",
            "anyOf": [{"$ref": f"#/components/schemas/{name}"}
                      for name in ("SegmentAll", "SegmentAny", "SegmentNot", "SegmentCondition")],
        },
        "SegmentAll": {"description": "Every member matches", **_group("all", group_of)},
        "SegmentAny": {"description": "At least one member matches", **_group("any", group_of)},
        "SegmentNot": {"description": "Its member does not match", **_group("not", {"$ref": FILTER_REF})},
        "SegmentCondition": {"description": "{field, op, value}, and within_days, count for orders and events",
                             "anyOf": conditions},
        "SegmentCount": {"description": "The number of matching orders or events, compared with `value` by `op`",
                         "type": "object", "additionalProperties": False, "required": ["op", "value"],
                         "properties": {"op": {"type": "string", "enum": list(COUNT_OPS)}, "value": _COUNT}},
    }
