"""Bodies of the public pages' POSTs: JSON from a script or a plain HTML form, bounded before they are read."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from fastapi import Request
from pydantic import BaseModel, ValidationError

from app.errors import AppError, InvalidInput, PayloadTooLarge
from app.problems import validation_problem

__all__ = ["FORM", "JSON", "UnsupportedMediaType", "form_pairs", "json_object", "read_body", "read_model"]

Model = TypeVar("Model", bound=BaseModel)

JSON, FORM = "application/json", "application/x-www-form-urlencoded"


class UnsupportedMediaType(AppError):
    status, slug, title = 415, "unsupported-media-type", "Send JSON or a form (application/x-www-form-urlencoded)"


async def read_body(request: Request, *, max_bytes: int) -> tuple[str, bytes]:
    """(media type, body): JSON or a form only (415), at most `max_bytes` (413, before reading it all)."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in (JSON, FORM):
        raise UnsupportedMediaType(f"content-type {media[:100] or '(none)'} is not {JSON} or {FORM}")
    declared = request.headers.get("content-length", "")
    # ASCII digits only ("²" is a digit to isdigit(), not to int()), and few of them (int() refuses 4,300+)
    if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > max_bytes):
        raise PayloadTooLarge(f"this body is at most {max_bytes} bytes")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > max_bytes:
            raise PayloadTooLarge(f"this body is at most {max_bytes} bytes")
    return media, raw


async def read_model(request: Request, model: type[Model], *, max_bytes: int,
                     from_form: Callable[[bytes], dict[str, Any]]) -> Model:
    """The body as `model`, from JSON or from a form (`from_form` maps its fields); a 422 names each faulty one."""
    media, raw = await read_body(request, max_bytes=max_bytes)
    data = json_object(raw) if media == JSON else from_form(raw)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_problem(exc.errors()) from None


def json_object(raw: bytes) -> dict[str, Any]:
    """The body's JSON object; a key given twice is a 422 naming it, as a form field given twice is (json.loads
    alone keeps the last one silently)."""
    try:
        data = json.loads(raw, object_pairs_hook=_once_each)
    except (ValueError, RecursionError):
        raise InvalidInput.one("body", "the body is not valid JSON (UTF-8)", "json_invalid") from None
    if not isinstance(data, dict):
        raise InvalidInput.one("body", "a JSON object is expected", "model_type")
    return data


def _once_each(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:  # named as validation names a field: the caller's key, made printable
            raise validation_problem([{"loc": (key[:100],), "msg": "given more than once", "type": "duplicate_field"}])
        data[key] = value
    return data


def form_pairs(raw: bytes, *, max_fields: int) -> list[tuple[str, str]]:
    try:
        return parse_qsl(raw.decode("utf-8"), keep_blank_values=True, max_num_fields=max_fields)
    except (UnicodeDecodeError, ValueError):
        raise InvalidInput.one("body", f"not a form in UTF-8 with at most {max_fields} fields",
                               "form_invalid") from None
