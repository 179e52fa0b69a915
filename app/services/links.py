"""Signed links sent to people: confirm a double opt-in, unsubscribe in one click (RFC 8058), and the
preference center.

A token is `base64url(JSON {k, c, l?, exp?}) . base64url(HMAC-SHA256)`: compact, tamper-evident, and
readable without a database lookup. Confirmation links expire; unsubscribe and preference links never do (a
person must always be able to leave, even from a years-old email). An erasure confirmation (the second step
of "erase my data" in the preference center) is valid for minutes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from app.errors import AppError, NotFound

__all__ = [
    "CONFIRM_LINK_TTL",
    "ERASE_CONFIRM_TTL",
    "MAX_TOKEN_CHARS",
    "Link",
    "LinkBuilder",
    "LinkCodec",
    "LinkExpired",
    "LinkInvalid",
    "LinkKind",
]

# How long a double opt-in confirmation link stays valid (a setting later: CONFIRM_LINK_TTL_DAYS).
CONFIRM_LINK_TTL = timedelta(days=7)
# How long the "yes, erase my data" step of the preference center waits for the person's second click.
ERASE_CONFIRM_TTL = timedelta(minutes=15)
_MAC_BYTES = 16  # 128-bit tag: plenty against forgery, keeps the URL short
MAX_TOKEN_CHARS = 512


class LinkInvalid(NotFound):
    # A token the server did not issue names nothing: 404, whether it was damaged, forged or made for another kind
    # of link, with one detail for all three (the answer never tells which part was wrong, nor that a signature
    # held). Only a genuine link can be told apart, when it has expired (410).
    slug, title = "invalid-link", "This link is not valid"


class LinkExpired(AppError):
    status, slug, title = 410, "link-expired", "This link has expired"


class LinkKind(StrEnum):
    CONFIRM = "confirm"
    UNSUBSCRIBE = "unsubscribe"
    PREFERENCES = "preferences"    # no list: the person's whole preference center
    ERASE = "erase"                # no list: the second step of an erasure asked for in the preference center


_LISTLESS = frozenset({LinkKind.PREFERENCES, LinkKind.ERASE})
_NOT_ISSUED = "this link is damaged or was not issued by this service for this page"


@dataclass(frozen=True, slots=True)
class Link:
    kind: LinkKind
    contact_id: uuid.UUID
    list_id: uuid.UUID | None  # None only for the kinds that act on the whole person
    expires_at: int | None = None  # Unix seconds; None never expires


class LinkCodec:
    """Encodes and verifies link tokens with a key derived from the deployment secret."""

    def __init__(self, secret: str) -> None:
        # A key of its own: a link token can never pass as a cursor or an access token.
        self._key = hashlib.sha256(b"carnet-link:" + secret.encode()).digest()

    def encode(self, link: Link) -> str:
        claims: dict[str, object] = {"k": link.kind.value, "c": str(link.contact_id)}
        if link.list_id is not None:
            claims["l"] = str(link.list_id)
        if link.expires_at is not None:
            claims["exp"] = link.expires_at
        payload = json.dumps(claims, separators=(",", ":")).encode()
        return f"{_b64(payload)}.{_b64(self._mac(payload))}"

    def decode(self, token: str, *, kind: LinkKind, now: float | None = None) -> Link:
        """The link a token stands for; LinkInvalid if forged, malformed or of another kind, LinkExpired if too
        old."""
        try:
            if len(token) > MAX_TOKEN_CHARS:
                raise ValueError("too long")
            encoded_payload, encoded_mac = token.split(".")
            payload, mac = _unb64(encoded_payload), _unb64(encoded_mac)
            if not hmac.compare_digest(mac, self._mac(payload)):
                raise ValueError("bad signature")
            claims = json.loads(payload)
            link_kind = LinkKind(claims["k"])
            link = Link(
                link_kind, uuid.UUID(claims["c"]),
                None if link_kind in _LISTLESS else uuid.UUID(claims["l"]), _expiry(claims.get("exp")),
            )
        except (ValueError, TypeError, KeyError, AttributeError, binascii.Error):
            raise LinkInvalid(_NOT_ISSUED) from None
        if link.kind is not kind:
            raise LinkInvalid(_NOT_ISSUED)
        if link.expires_at is not None and link.expires_at < (time.time() if now is None else now):
            raise LinkExpired("this link has expired; ask for a new one")
        return link

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()[:_MAC_BYTES]


@dataclass(frozen=True, slots=True)
class LinkBuilder:
    """Absolute URLs for the public routes, from the request's base URL (`https://api.shop.example/`)."""

    codec: LinkCodec
    base_url: str

    def confirm_url(self, contact_id: uuid.UUID, list_id: uuid.UUID, *, expires_at: datetime) -> str:
        return self._url("confirm", Link(LinkKind.CONFIRM, contact_id, list_id, int(expires_at.timestamp())))

    def unsubscribe_url(self, contact_id: uuid.UUID, list_id: uuid.UUID) -> str:
        return self._url("unsubscribe", Link(LinkKind.UNSUBSCRIBE, contact_id, list_id))

    def preferences_url(self, contact_id: uuid.UUID) -> str:
        return self._url("preferences", Link(LinkKind.PREFERENCES, contact_id, None))

    def _url(self, route: str, link: Link) -> str:
        return f"{self.base_url.rstrip('/')}/v1/public/{route}/{self.codec.encode(link)}"


def _expiry(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("exp must be an integer")
    return value


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    if not text or not text.replace("-", "").replace("_", "").isalnum() or not text.isascii():
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
