"""Walks every input the OpenAPI document declares (parameters and request bodies, through $refs) and lists
those without a declared bound: arrays without maxItems, strings without maxLength (an enum, a const or a
format that cannot grow, such as uuid or date-time, bounds them too), objects open to any key without
maxProperties, numbers without both a minimum and a maximum. A constraint given next to an `anyOf` (an optional
header: `{"anyOf": [string, null], "maxLength": 255}`) applies to each branch, as in JSON Schema; a combinator
beside a schema with its own type or properties only narrows it (the contract's cross-field rules), so the base
schema's bounds are the ones that count."""

from __future__ import annotations

from typing import Any

__all__ = ["unbounded_inputs"]

_FIXED_FORMATS = frozenset({"uuid", "date", "date-time", "time", "ipv4", "ipv6", "ipvanyaddress", "binary"})
_INHERITED = ("maxItems", "maxLength", "maxProperties", "minimum", "maximum", "exclusiveMinimum",
              "exclusiveMaximum", "enum", "const", "pattern")


def unbounded_inputs(document: dict[str, Any]) -> list[str]:
    components = document.get("components", {}).get("schemas", {})
    found: set[str] = set()

    def walk(schema: Any, where: str, seen: frozenset[str], inherited: dict[str, Any]) -> None:
        if not isinstance(schema, dict):
            return
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            if name not in seen:
                walk(components[name], f"{where}→{name}", seen | {name}, inherited)
            return
        schema = {**inherited, **schema}
        passed = {k: schema[k] for k in _INHERITED if k in schema}
        # Beside a schema that has its own type or properties, a combinator only narrows what it allows (a rule
        # such as "one of email or phone is required"): the bounds are the base schema's. Alone, it is the schema.
        narrowing = "type" in schema or "properties" in schema
        for key in ("anyOf", "oneOf", "allOf"):
            for branch in [] if narrowing else schema.get(key, []):
                walk(branch, where, seen, passed)
        kind = schema.get("type")
        if kind == "array":
            if "maxItems" not in schema:
                found.add(f"array without maxItems: {where}")
            walk(schema.get("items", {}), f"{where}[]", seen, {})
            for item in schema.get("prefixItems", []):
                walk(item, f"{where}[]", seen, {})
        elif kind == "string":
            if not ({"maxLength", "enum", "const"} & schema.keys()) and schema.get("format") not in _FIXED_FORMATS:
                found.add(f"string without maxLength: {where}")
        elif kind in ("integer", "number"):
            keys = schema.keys()
            if not ({"maximum", "exclusiveMaximum"} & keys and {"minimum", "exclusiveMinimum"} & keys):
                found.add(f"{kind} without minimum and maximum: {where}")
        elif kind == "object" or "properties" in schema or "additionalProperties" in schema:
            for name, sub in schema.get("properties", {}).items():
                walk(sub, f"{where}.{name}", seen, {})
            extra = schema.get("additionalProperties")
            if (extra is True or isinstance(extra, dict) or (extra is None and "properties" not in schema)) \
                    and "maxProperties" not in schema:
                found.add(f"object without maxProperties: {where}")
            if isinstance(extra, dict):
                walk(extra, f"{where}.*", seen, {})
        elif kind is None and not ({"anyOf", "oneOf", "allOf", "enum", "const"} & schema.keys()):
            found.add(f"any JSON value: {where}")

    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            for parameter in operation.get("parameters", []):
                walk(parameter.get("schema", {}), f"{method.upper()} {path} {parameter['in']} {parameter['name']}",
                     frozenset(), {})
            for media_type, body in operation.get("requestBody", {}).get("content", {}).items():
                walk(body.get("schema", {}), f"{method.upper()} {path} ({media_type})", frozenset(), {})
    return sorted(found)
