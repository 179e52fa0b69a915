"""Bodies of the public pages' POSTs: JSON from a script or a plain HTML form, bounded before they are read."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Request

from app.errors import AppError, InvalidInput, PayloadTooLarge

__all__ = ["FORM", "JSON", "UnsupportedMediaType", "form_pairs", "json_object", "read_body"]

JSON, FORM = "application/json", "application/x-www-form-urlencoded"


class UnsupportedMediaType(AppError):
    status, slug, title = 415, "unsupported-media-type", "Send JSON or a form (application/x-www-form-urlencoded)"


async def read_body(request: Request, *, max_bytes: int) -> tuple[str, bytes]:
    """(media type, body): JSON or a form only (415), at most `max_bytes` (413, before reading it all)."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in (JSON, FORM):
        raise UnsupportedMediaType(f"content-type {media[:100] or '(none)'} is not {JSON} or {FORM}")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"this body is at most {max_bytes} bytes")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > max_bytes:
            raise PayloadTooLarge(f"this body is at most {max_bytes} bytes")
    return media, raw


def json_object(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidInput.one("body", "the body is not valid JSON (UTF-8)", "json_invalid") from None
    if not isinstance(data, dict):
        raise InvalidInput.one("body", "a JSON object is expected", "model_type")
    return data


def form_pairs(raw: bytes, *, max_fields: int) -> list[tuple[str, str]]:
    try:
        return parse_qsl(raw.decode("utf-8"), keep_blank_values=True, max_num_fields=max_fields)
    except (UnicodeDecodeError, ValueError):
        raise InvalidInput.one("body", f"not a form in UTF-8 with at most {max_fields} fields",
                               "form_invalid") from None
