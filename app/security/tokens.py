"""Issuing and verifying access tokens: the one wrapper around python-jose.

python-jose is lax by default (a token without `exp` never expires, a future `iat` passes, `kid` is
ignored, and CVE-2024-33663 let a public key act as an HMAC secret), so every rule is enforced here
before and after the library's own checks. A deployment uses exactly one algorithm: HS256 with a secret
(default) or RS256 with PEM keys chosen by `kid` (rotation: several public keys, one signing key). The
key handed to python-jose is picked by the deployment's algorithm, never by the token's header.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from jose import jwt
from jose.exceptions import JOSEError

from app.security.scopes import ROLE_SCOPES, Role, Scope

__all__ = [
    "ALGORITHM",
    "ALGORITHMS",
    "InvalidToken",
    "IssuedToken",
    "TokenClaims",
    "TokenSigner",
    "issue_access_token",
    "verify_access_token",
]

ALGORITHM = "HS256"
ALGORITHMS = ("HS256", "RS256")
MAX_TOKEN_BYTES = 4096
LEEWAY_SECONDS = 30
VERIFIED_CACHE_SIZE = 10_000
_REQUIRED = ("exp", "iat", "sub", "jti", "role")
_ALLOWED_TYP = {None, "JWT", "at+jwt"}


class InvalidToken(Exception):
    """Any reason to refuse a token; the message is safe to show (it never echoes the token)."""


@dataclass(frozen=True, slots=True)
class TokenClaims:
    subject: str
    role: Role
    scopes: frozenset[Scope]
    token_id: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    token_id: str
    expires_at: datetime
    scopes: frozenset[Scope]


@dataclass(frozen=True, slots=True)
class TokenSigner:
    """The deployment's keys and claims policy, resolved once from the settings.

    `secret` always exists: it signs tokens in HS256 mode and keys Carnet's own HMACs (cursors, links).
    """

    secret: str
    issuer: str | None = None
    audience: str | None = None
    algorithm: str = ALGORITHM
    private_key: str | None = None        # RS256: PEM of the signing key
    signing_kid: str | None = None
    public_keys: Mapping[str, str] = field(default_factory=dict)  # RS256: kid → PEM public key
    # Verified tokens by their exact text: python-jose costs ~200 µs a token, a dict lookup ~0.1 µs.
    # A hit re-checks expiry; revocation is checked by the caller on every request either way.
    _verified: dict[str, TokenClaims] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"JWT_ALGORITHM must be one of {', '.join(ALGORITHMS)}")
        if self.algorithm == "RS256":
            if not self.private_key or not self.signing_kid or self.signing_kid not in self.public_keys:
                raise ValueError("RS256 needs a private key, a signing kid, and that kid among the public keys")
            if any("PRIVATE" in pem for pem in self.public_keys.values()):
                raise ValueError("public key files must hold public keys only")

    def issue(self, *, subject: str, role: Role, scopes: frozenset[Scope] | None, ttl_seconds: int) -> IssuedToken:
        return issue_access_token(
            self.private_key if self.algorithm == "RS256" else self.secret,  # type: ignore[arg-type]
            subject=subject, role=role, scopes=scopes, ttl_seconds=ttl_seconds, issuer=self.issuer,
            audience=self.audience, algorithm=self.algorithm, kid=self.signing_kid,
        )

    def verify(self, token: str) -> TokenClaims:
        claims = self._verified.get(token)
        if claims is not None:
            if claims.expires_at.timestamp() <= time.time() - LEEWAY_SECONDS:
                self._verified.pop(token, None)
                raise InvalidToken("token expired")
            return claims
        claims = verify_access_token(token, self.secret, issuer=self.issuer, audience=self.audience,
                                     algorithm=self.algorithm, public_keys=self.public_keys)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            self._verified.clear()  # bounded; a miss only costs one more verification
        self._verified[token] = claims
        return claims


def issue_access_token(
    secret: str,
    *,
    subject: str,
    role: Role,
    scopes: frozenset[Scope] | None = None,
    ttl_seconds: int,
    issuer: str | None = None,
    audience: str | None = None,
    algorithm: str = ALGORITHM,
    kid: str | None = None,
) -> IssuedToken:
    """Sign a token whose scopes are the role's, or a narrower subset of them."""
    allowed = ROLE_SCOPES[role]
    granted = allowed if scopes is None else frozenset(scopes)
    if not granted <= allowed:
        extra = ", ".join(sorted(granted - allowed))
        raise ValueError(f"role {role} cannot hold: {extra}")
    now = int(time.time())
    jti = uuid.uuid4().hex
    claims: dict[str, Any] = {
        "sub": subject,
        "role": role.value,
        "scopes": sorted(granted),
        "iat": now,
        "nbf": now,
        "exp": now + ttl_seconds,
        "jti": jti,
    }
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    headers = {"typ": "JWT", **({"kid": kid} if kid else {})}
    token = jwt.encode(claims, secret, algorithm=algorithm, headers=headers)
    return IssuedToken(token, jti, datetime.fromtimestamp(now + ttl_seconds, UTC), granted)


def verify_access_token(
    token: str,
    secret: str,
    *,
    issuer: str | None = None,
    audience: str | None = None,
    now: float | None = None,
    algorithm: str = ALGORITHM,
    public_keys: Mapping[str, str] | None = None,
) -> TokenClaims:
    """Return the claims of a valid token or raise InvalidToken; never trust the token's own header."""
    if not token or len(token) > MAX_TOKEN_BYTES:
        raise InvalidToken("token missing or too large")
    parts = token.split(".")
    if len(parts) != 3:  # a JWE has five parts; anything else is not a JWS compact token
        raise InvalidToken("malformed token")
    header = _decode_segment(parts[0])
    if header.get("alg") != algorithm:  # the deployment's algorithm, whatever the token claims
        raise InvalidToken("unexpected algorithm")
    key = secret
    if algorithm == "RS256":
        kid = header.get("kid")
        if not isinstance(kid, str) or kid not in (public_keys or {}):
            raise InvalidToken("unknown key id")
        key = (public_keys or {})[kid]
    if header.get("typ") not in _ALLOWED_TYP or "crit" in header or "jku" in header or "jwk" in header:
        raise InvalidToken("unexpected token header")
    current = time.time() if now is None else now
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[algorithm],
            issuer=issuer,
            audience=audience,
            options={
                "require_exp": True,
                "require_iat": True,
                "require_sub": True,
                "require_jti": True,
                "verify_aud": audience is not None,
                "verify_iss": issuer is not None,
                "leeway": LEEWAY_SECONDS,
            },
        )
    except (JOSEError, ValueError, TypeError) as exc:
        raise InvalidToken("signature or claims invalid") from exc
    return _claims(claims, current)


def _claims(claims: dict[str, Any], now: float) -> TokenClaims:
    for name in _REQUIRED:
        if claims.get(name) in (None, ""):
            raise InvalidToken(f"claim {name} missing")
    iat, exp = claims["iat"], claims["exp"]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (iat, exp)):
        raise InvalidToken("time claims must be numbers")
    if iat > now + LEEWAY_SECONDS:
        raise InvalidToken("token issued in the future")
    if exp <= now - LEEWAY_SECONDS:  # python-jose checks this too; kept so the rule lives here
        raise InvalidToken("token expired")
    if not isinstance(claims["sub"], str) or not isinstance(claims["jti"], str):
        raise InvalidToken("sub and jti must be strings")
    try:
        role = Role(claims["role"])
        raw_scopes = claims.get("scopes")
        if not isinstance(raw_scopes, list):
            raise InvalidToken("scopes must be a list")
        scopes = frozenset(Scope(s) for s in raw_scopes)
    except (ValueError, TypeError) as exc:
        raise InvalidToken("unknown role or scope") from exc
    if not scopes <= ROLE_SCOPES[role]:
        raise InvalidToken("scopes exceed the role")
    return TokenClaims(claims["sub"], role, scopes, claims["jti"], datetime.fromtimestamp(exp, UTC))


def _decode_segment(segment: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise InvalidToken("malformed token") from exc
    if not isinstance(value, dict):
        raise InvalidToken("malformed token")
    return value
