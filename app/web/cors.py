"""CORS for the public signup: exact origins per list, no credentials, nothing for any other origin."""

from __future__ import annotations

from urllib.parse import urlsplit

from fastapi import Request

__all__ = ["PREFLIGHT_HEADERS", "allow_headers", "origin_of", "request_origin"]

PREFLIGHT_HEADERS = {
    "Access-Control-Allow-Methods": "POST",
    "Access-Control-Allow-Headers": "content-type",  # JSON bodies; form posts need no preflight
    "Access-Control-Max-Age": "600",
}


def request_origin(request: Request) -> str | None:
    """The page's origin: `Origin` (browsers send it on every cross-site POST), else the `Referer`'s."""
    origin = request.headers.get("origin")
    if origin is not None:
        return origin.strip().lower()[:300]
    referer = request.headers.get("referer")
    return origin_of(referer) if referer else None


def allow_headers(origin: str | None) -> dict[str, str]:
    """Headers of every answer to an allowed origin (the page's script may read them, Retry-After included)."""
    headers = {"Vary": "Origin"}
    if origin is not None:
        headers |= {"Access-Control-Allow-Origin": origin, "Access-Control-Expose-Headers": "Retry-After"}
    return headers


def origin_of(url: str) -> str | None:
    """`scheme://host[:port]` of a URL, as a browser writes it in `Origin`; None when it has none."""
    try:
        parts = urlsplit(url.strip()[:2000])
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    default = {"https": 443, "http": 80}[parts.scheme]
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default) else "")
