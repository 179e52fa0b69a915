"""Check a request against the vendor's OpenAPI document: operation, parameters, security header, JSON body.

The spec files live in `../shared/specs/` (their README lists their known defects). OpenAPI 3.0 schemas
are turned into JSON Schema draft 4 (`$ref`s inlined, `nullable`, `readOnly`), then checked with
`jsonschema_rs`. Two deliberate differences from a plain reading of the documents, both stricter or
corrections of documented defects:

- Objects that list `properties` and say nothing about others reject unknown properties: a misspelt
  field (`updateEnable`) is silently ignored by the vendor and would otherwise pass. This also makes
  Brevo's `oneOf` list bodies (`emails` | `ids` | `extIds`, none `required`) match exactly one branch.
- Mailchimp 3.0.55 declares each `merge_fields` value as `type: object` (a generator artefact); the
  current official spec (and Mailchimp's SDKs generated from it) says string | number | address object.
- Unknown query parameters are violations (a typo there is ignored by the vendor too).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema_rs
import yaml

__all__ = ["Operation", "Spec", "brevo_spec", "mailchimp_spec"]



def _specs_dir() -> Path:
    """CARNET_SPECS_DIR, else `shared/specs` beside the checkout (the team layout), else the machine's copy."""
    candidates = [Path(os.environ["CARNET_SPECS_DIR"])] if os.environ.get("CARNET_SPECS_DIR") else []
    candidates += [Path(__file__).resolve().parents[3] / "shared" / "specs", Path("/work/shared/specs")]
    for candidate in candidates:
        if (candidate / "brevo-v3.openapi.json").is_file():
            return candidate
    raise FileNotFoundError(f"vendor specs not found (set CARNET_SPECS_DIR); looked in {candidates}")


SPECS = _specs_dir()
_SKIP = frozenset({"discriminator", "xml", "externalDocs", "example", "examples", "deprecated", "writeOnly",
                   "x-title", "description", "title", "readOnly", "nullable"})


@dataclass
class Operation:
    method: str
    template: str
    operation_id: str
    regex: re.Pattern[str]
    path_names: list[str]
    parameters: dict[tuple[str, str], dict[str, Any]]          # (in, name) -> parameter object
    body: dict[str, Any] | None                                # requestBody object
    security: list[dict[str, Any]]                             # security schemes that may authorize it
    _validators: dict[str, Any] = field(default_factory=dict)


class Spec:
    def __init__(self, document: Mapping[str, Any], *, fixes: Mapping[str, Any] | None = None) -> None:
        self.document = document
        self.schemas: Mapping[str, Any] = document.get("components", {}).get("schemas", {})
        schemes = document.get("components", {}).get("securitySchemes", {})
        default_security = document.get("security", [])
        self._fixes = dict(fixes or {})
        self.operations: list[Operation] = []
        for template, item in document["paths"].items():
            shared = item.get("parameters", [])
            for method, op in item.items():
                if method not in ("get", "post", "put", "patch", "delete"):
                    continue
                names = re.findall(r"{([^}]+)}", template)
                pattern = "^" + re.sub(r"\\{[^}]+\\}", "([^/]+)", re.escape(template)) + "$"
                params = {(p["in"], p["name"]): p for p in (*shared, *op.get("parameters", []))}
                security = [schemes[name] for req in op.get("security", default_security) for name in req]
                self.operations.append(Operation(method.upper(), template, op.get("operationId", template),
                                                 re.compile(pattern), names, params, op.get("requestBody"), security))
        # Literal segments win over templates (`/contacts/lists` before `/contacts/{identifier}`).
        self.operations.sort(key=lambda o: (len(o.path_names), -len(o.template)))

    def match(self, method: str, path: str) -> tuple[Operation | None, dict[str, str]]:
        path_known = False
        for op in self.operations:
            found = op.regex.match(path)
            if found:
                path_known = True
                if op.method == method:
                    return op, dict(zip(op.path_names, found.groups(), strict=True))
        return None, {"__path_known__": "yes"} if path_known else {}

    def check(
        self, method: str, path: str, query: Sequence[tuple[str, str]], headers: Mapping[str, str], body: bytes
    ) -> tuple[Operation | None, dict[str, str], Any, list[str]]:
        """(operation, path parameters, parsed JSON body, violations) for one request."""
        op, path_params = self.match(method, path)
        if op is None:
            what = "method not allowed on" if path_params else "no operation for"
            return None, {}, None, [f"{what} {method} {path}"]
        problems: list[str] = []
        for (where, name), param in op.parameters.items():
            schema = param.get("schema", {})
            if where == "path":
                problems += _check_scalar(f"path parameter {name}", path_params.get(name, ""), schema, self)
            elif where == "query":
                values = [v for k, v in query if k == name]
                if param.get("required") and not values:
                    problems.append(f"missing required query parameter {name}")
                for value in values:
                    problems += _check_scalar(f"query parameter {name}", value, schema, self)
            elif where == "header" and param.get("required") and name.lower() not in headers:
                problems.append(f"missing required header {name}")
        known = {name for where, name in op.parameters if where == "query"}
        problems += [f"unknown query parameter {k}" for k, _ in query if k not in known]
        problems += _check_security(op.security, headers)
        payload: Any = None
        if op.body is None:
            if body:
                problems.append("a body was sent to an operation that takes none")
        elif not body:
            if op.body.get("required"):
                problems.append("missing required request body")
        else:
            content_type = headers.get("content-type", "").split(";")[0].strip().lower()
            media = op.body.get("content", {})
            if content_type not in media:
                problems.append(f"content-type {content_type or '(none)'} not in {sorted(media)}")
            else:
                try:
                    payload = json.loads(body)
                except ValueError:
                    problems.append("body is not valid JSON")
                else:
                    validator = op._validators.get(content_type)
                    if validator is None:
                        schema = self.to_json_schema(media[content_type].get("schema", {}))
                        validator = op._validators[content_type] = jsonschema_rs.Draft4Validator(
                            schema, validate_formats=True
                        )
                    for error in validator.iter_errors(payload):
                        where = "/".join(str(p) for p in error.instance_path) or "(root)"
                        problems.append(f"body {where}: {_describe(error)}")
        return op, path_params, payload, problems

    def to_json_schema(self, schema: Any, stack: tuple[str, ...] = ()) -> Any:
        """OpenAPI 3.0 schema object → JSON Schema draft 4, `$ref`s inlined (a cycle accepts anything)."""
        if isinstance(schema, list):
            return [self.to_json_schema(s, stack) for s in schema]
        if not isinstance(schema, dict):
            return schema
        ref = schema.get("$ref")
        if ref is not None:
            name = ref.rsplit("/", 1)[-1]
            if name in stack:
                return {}
            target = self._fixes.get(name, self.schemas[name])
            return self.to_json_schema(target, (*stack, name))
        out: dict[str, Any] = {}
        for key, value in schema.items():
            if key in _SKIP or key.startswith("x-"):
                continue
            if key == "properties":
                props = {}
                for prop, sub in value.items():
                    # readOnly properties must not be sent in a request.
                    props[prop] = {"not": {}} if isinstance(sub, dict) and sub.get("readOnly") else (
                        self.to_json_schema(sub, stack))
                out[key] = props
            elif key in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"):
                out[key] = self.to_json_schema(value, stack)
            else:
                out[key] = value
        if "properties" in out and "additionalProperties" not in out and "allOf" not in schema:
            out["additionalProperties"] = False
        if schema.get("nullable"):
            return {"anyOf": [out, {"type": "null"}]}
        return out


def _describe(error: Any) -> str:
    """The error without the whole instance; for oneOf/anyOf, what each branch objected to."""
    name = type(error.kind).__name__
    context = getattr(error.kind, "context", None)
    if context:
        branches = ["; ".join(_short(e.message) for e in branch) for branch in context]
        return f"{name}: " + " | ".join(branches)
    return f"{name}: {_short(error.message)}"


def _short(message: str) -> str:
    return message if len(message) <= 160 else message[:70] + " … " + message[-80:]


def _check_scalar(label: str, raw: str, schema: Mapping[str, Any], spec: Spec) -> list[str]:
    value: Any = raw
    kind = schema.get("type")
    if kind == "integer":
        if not re.fullmatch(r"-?\d+", raw):
            return [f"{label} is not an integer: {raw!r}"]
        value = int(raw)
    elif kind == "boolean":
        if raw not in ("true", "false"):
            return [f"{label} is not a boolean: {raw!r}"]
        value = raw == "true"
    elif kind is None and "oneOf" in schema:
        return []  # Brevo's identifier: string or integer, anything matches
    validator = jsonschema_rs.Draft4Validator(spec.to_json_schema(dict(schema)))
    return [f"{label}: {e.message}" for e in validator.iter_errors(value)]


def _check_security(schemes: list[dict[str, Any]], headers: Mapping[str, str]) -> list[str]:
    if not schemes:
        return []
    reasons = []
    for scheme in schemes:
        if scheme.get("type") == "apiKey" and scheme.get("in") == "header":
            if headers.get(scheme["name"].lower()):
                return []
            reasons.append(f"header {scheme['name']}")
        elif scheme.get("type") == "http":
            auth = headers.get("authorization", "")
            wanted = scheme.get("scheme", "").lower()
            kind, _, credentials = auth.partition(" ")
            if kind.lower() == wanted == "basic":
                try:
                    if ":" in base64.b64decode(credentials, validate=True).decode():
                        return []
                except (binascii.Error, UnicodeDecodeError):
                    pass
            elif kind.lower() == wanted and credentials:
                return []
            reasons.append(f"Authorization {wanted}")
    return [f"no credentials in the request ({' or '.join(reasons)})"]


@cache
def brevo_spec() -> Spec:
    document = json.loads((SPECS / "brevo-v3.openapi.json").read_text())
    schemas = document["components"]["schemas"]
    fixes = {}
    # Defect: createUpdateCategories.id says `format: email`, yet its own description is "Unique Category ID as saved
    # in the shop" and its example is "CAT123" (not an address): the format is a copy-paste slip.
    category = schemas["createUpdateCategories"]
    fixes["createUpdateCategories"] = dict(category, properties=dict(
        category["properties"], id={k: v for k, v in category["properties"]["id"].items() if k != "format"}))
    # Defect: event.event_properties values are declared string | integer | object | array, while the same
    # property's description says "The following field type are supported: string, number, boolean (true/false),
    # date" (and Brevo's own example in it has `"autoplayed": false`): numbers and booleans are added.
    event = schemas["event"]
    values = event["properties"]["event_properties"]["additionalProperties"]
    fixes["event"] = dict(event, properties=dict(event["properties"], event_properties=dict(
        event["properties"]["event_properties"], additionalProperties={
            "anyOf": [*values["anyOf"], {"type": "number"}, {"type": "boolean"}]})))
    return Spec(document, fixes=fixes)


_MERGE_VALUE = {"anyOf": [
    {"type": "string"}, {"type": "number"},
    {"type": "object", "required": ["addr1", "city", "state", "zip"], "properties": {
        k: {"type": "string"} for k in ("addr1", "addr2", "city", "state", "zip", "country")}},
]}


@cache
def mailchimp_spec() -> Spec:
    document = yaml.load((SPECS / "mailchimp-marketing-3.0.55.openapi.yaml").read_text(), Loader=yaml.CSafeLoader)
    fixes = {}
    for name, schema in document["components"]["schemas"].items():
        merge = schema.get("properties", {}).get("merge_fields")
        if merge is not None and merge.get("additionalProperties", {}).get("type") == "object":
            fixed = dict(schema, properties=dict(schema["properties"],
                                                 merge_fields={"type": "object", "additionalProperties": _MERGE_VALUE}))
            fixes[name] = fixed
    return Spec(document, fixes=fixes)
