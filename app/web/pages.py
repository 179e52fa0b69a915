"""Public HTML pages: templates, content negotiation (HTML or JSON, French or English) and the shop's brand.

The pages people reach from emails and forms (signup answer, confirmation, unsubscribe, preference center) are
server-rendered and work without JavaScript. Their URL often holds a credential (a signed link), so every page
is sent with headers that keep it to itself: no referrer, no framing, no caching, no script, forms only to itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, PackageLoader, select_autoescape

from app.web.messages import MESSAGES

__all__ = ["LANGUAGES", "PAGE_HEADERS", "Brand", "language", "render", "translate", "wants_html"]

LANGUAGES = ("en", "fr")
DEFAULT_LANGUAGE = "en"
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",      # the URL is the credential: never sent on to another site
    "Cache-Control": "no-store",           # personal data: not kept by browsers or proxies
    "X-Content-Type-Options": "nosniff",
    "X-Robots-Tag": "noindex",
}
_COLOR = re.compile(r"^#[0-9a-f]{6}$")
_FALLBACK_COLOR = "#1d4e89"

_env = Environment(
    loader=PackageLoader("app.web", "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)


@dataclass(frozen=True, slots=True)
class Brand:
    """The shop's name and accent colour, with the text colours that stay readable on it (WCAG AA)."""

    name: str | None
    color: str
    on_color: str   # text on the accent (buttons, header)
    ink: str        # the accent darkened until readable on white (links, borders)

    @classmethod
    def of(cls, settings: Any, the_list: Mapping[str, Any] | None = None) -> Brand:
        """A list's own colour and display name first, then the deployment's (PUBLIC_NAME, PUBLIC_COLOR)."""
        color = str((the_list or {}).get("color") or settings.public_color).lower()
        color = color if _COLOR.fullmatch(color) else _FALLBACK_COLOR
        on_color = "#ffffff" if _contrast(color, "#ffffff") >= _contrast(color, "#111111") else "#111111"
        return cls(settings.public_name, color, on_color, _ink(color))


def wants_html(request: Request) -> bool:
    """True when Accept ranks text/html above JSON (a browser); `*/*` alone means JSON."""
    ranks = _ranked(request.headers.get("accept", ""))
    html_rank = max(ranks.get("text/html", 0.0), ranks.get("text/*", 0.0))
    json_rank = max(ranks.get("application/json", 0.0), ranks.get("application/*", 0.0), ranks.get("*/*", 0.0))
    return html_rank > json_rank


def language(request: Request, fallback: str | None = None) -> str:
    """French or English, by the browser's Accept-Language; else the contact's own language; else English."""
    ranks = _ranked(request.headers.get("accept-language", ""))
    best, best_rank = None, 0.0
    for tag, rank in ranks.items():
        primary = tag.split("-")[0]
        if primary in LANGUAGES and rank > best_rank:
            best, best_rank = primary, rank
    if best is not None:
        return best
    fallback_primary = (fallback or "").lower().split("-")[0]
    return fallback_primary if fallback_primary in LANGUAGES else DEFAULT_LANGUAGE


def render(template: str, *, lang: str, brand: Brand, title_key: str, status_code: int = 200,
           **context: Any) -> HTMLResponse:
    """A page in `lang`; `t(key, **values)` in templates gives the sentence in that language."""
    def t(key: str, **values: Any) -> str:
        return translate(lang, key, **values)

    html = _env.get_template(template).render(lang=lang, brand=brand, t=t, title=t(title_key), **context)
    return HTMLResponse(html, status_code=status_code, headers=PAGE_HEADERS)


def translate(lang: str, key: str, **values: Any) -> str:
    text = MESSAGES[lang][key]
    return text.format(**values) if values else text


def _ranked(header: str) -> dict[str, float]:
    """`Accept`-style header → {lower-cased value: quality}; bounded (a header is at most 8 kB by the server)."""
    ranks: dict[str, float] = {}
    for part in header.split(",")[:50]:
        value, *params = (p.strip() for p in part.split(";"))
        quality = 1.0
        for param in params:
            if param.startswith("q="):
                try:
                    quality = float(param[2:])
                except ValueError:
                    quality = 0.0
        if value:
            ranks[value.lower()] = max(quality, ranks.get(value.lower(), 0.0))
    return ranks


def _luminance(color: str) -> float:
    channels = [int(color[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def _contrast(a: str, b: str) -> float:
    high, low = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def _ink(color: str) -> str:
    """The colour, darkened in steps until it reads on white at 4.5:1 (WCAG AA for text)."""
    channels = [int(color[i:i + 2], 16) for i in (1, 3, 5)]
    current = color
    while _contrast(current, "#ffffff") < 4.5:
        channels = [int(c * 0.9) for c in channels]
        current = "#" + "".join(f"{c:02x}" for c in channels)
    return current
