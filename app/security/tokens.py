"""Issuing and verifying access tokens: the one wrapper around python-jose.

python-jose is lax by default (a token without `exp` never expires, a future `iat` passes, `kid` is
ignored, and CVE-2024-33663 let a public key act as an HMAC secret), so every rule is enforced here
before and after the library's own checks. A deployment uses exactly one algorithm: HS256 with a secret
(default), or RS256 or EdDSA (Ed25519, RFC 8037) with PEM keys chosen by `kid` (rotation: several public
keys, one signing key). The key is picked by the deployment's algorithm and the token's `kid`, never by
the token's `alg`.

python-jose has no EdDSA: those tokens are signed and verified here with `cryptography`'s Ed25519, and
their claims go through the same `_check_registered_claims` as every other token (for HS256 and RS256 it
runs after python-jose's own checks), so the claim rules cannot differ between algorithms.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
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
ALGORITHMS = ("HS256", "RS256", "EdDSA")
_KEY_FILE_ALGORITHMS = ("RS256", "EdDSA")  # a PEM private key signs, public keys verify by `kid`
MAX_TOKEN_BYTES = 4096
LEEWAY_SECONDS = 30
VERIFIED_CACHE_SIZE = 10_000
_REQUIRED = ("exp", "iat", "sub", "jti", "role")
_ALLOWED_TYP = {None, "JWT", "at+jwt"}
_LATEST_TIME = 253402300799  # 9999-12-31T23:59:59Z: later time claims are refused, not a crash in datetime
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


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
    private_key: str | None = None        # RS256/EdDSA: PEM of the signing key
    signing_kid: str | None = None
    public_keys: Mapping[str, str] = field(default_factory=dict)  # RS256/EdDSA: kid → PEM public key
    # Verified tokens by their exact text: python-jose costs ~200 µs a token, a dict lookup ~0.1 µs.
    # A hit re-checks expiry; revocation is checked by the caller on every request either way.
    _verified: dict[str, TokenClaims] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"JWT_ALGORITHM must be one of {', '.join(ALGORITHMS)}")
        if self.algorithm in _KEY_FILE_ALGORITHMS:
            if not self.private_key or not self.signing_kid or self.signing_kid not in self.public_keys:
                raise ValueError(
                    f"{self.algorithm} needs a private key, a signing kid, and that kid among the public keys")
            if any("PRIVATE" in pem for pem in self.public_keys.values()):
                raise ValueError("public key files must hold public keys only")
        if self.algorithm == "EdDSA":
            _check_ed25519_keys(self.private_key, self.signing_kid, self.public_keys)  # type: ignore[arg-type]

    def issue(self, *, subject: str, role: Role, scopes: frozenset[Scope] | None, ttl_seconds: int) -> IssuedToken:
        return issue_access_token(
            self.private_key if self.algorithm in _KEY_FILE_ALGORITHMS else self.secret,  # type: ignore[arg-type]
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
    """Sign a token whose scopes are the role's, or a narrower subset of them.

    `secret` is the HMAC secret for HS256, the PEM private key for RS256 and EdDSA.
    """
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
    if algorithm == "EdDSA":
        token = _eddsa_sign(claims, headers, secret)
    else:
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
    if not token.isascii():
        raise InvalidToken("malformed token")
    parts = token.split(".")
    if len(parts) != 3:  # a JWE has five parts; anything else is not a JWS compact token
        raise InvalidToken("malformed token")
    header = _decode_segment(parts[0])
    if header.get("alg") != algorithm:  # the deployment's algorithm, whatever the token claims
        raise InvalidToken("unexpected algorithm")
    key = secret
    if algorithm in _KEY_FILE_ALGORITHMS:
        kid = header.get("kid")
        if not isinstance(kid, str) or kid not in (public_keys or {}):
            raise InvalidToken("unknown key id")
        key = (public_keys or {})[kid]
    if header.get("typ") not in _ALLOWED_TYP or "crit" in header or "jku" in header or "jwk" in header:
        raise InvalidToken("unexpected token header")
    current = time.time() if now is None else now
    if algorithm == "EdDSA":
        return _claims(_eddsa_verified_claims(parts, key), current, issuer=issuer, audience=audience)
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
    except (JOSEError, ValueError, TypeError, OverflowError) as exc:  # OverflowError: `exp: 1e400` in jose
        raise InvalidToken("signature or claims invalid") from exc
    return _claims(claims, current, issuer=issuer, audience=audience)


def _claims(claims: dict[str, Any], now: float, *, issuer: str | None, audience: str | None) -> TokenClaims:
    for name in _REQUIRED:
        if claims.get(name) in (None, ""):
            raise InvalidToken(f"claim {name} missing")
    _check_registered_claims(claims, now, issuer=issuer, audience=audience)
    exp = claims["exp"]
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


def _check_registered_claims(claims: Mapping[str, Any], now: float, *, issuer: str | None,
                             audience: str | None) -> None:
    """The JWT claim rules, the same for every algorithm: python-jose's checks (exp, nbf, iat, iss, aud,
    sub, jti, with the leeway), made strict where it is lax (a future `iat`, a missing `aud` when an
    audience is configured, non-finite or out-of-range times). `exp`, `iat`, `sub`, `jti` are present."""
    times = [claims[name] for name in ("exp", "iat", "nbf") if name in claims]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in times):
        raise InvalidToken("time claims must be numbers")
    if any(not 0 <= v <= _LATEST_TIME for v in times):
        raise InvalidToken("time claims out of range")
    if claims["exp"] <= now - LEEWAY_SECONDS:
        raise InvalidToken("token expired")
    if claims.get("nbf", 0) > now + LEEWAY_SECONDS:
        raise InvalidToken("token not yet valid")
    if claims["iat"] > now + LEEWAY_SECONDS:
        raise InvalidToken("token issued in the future")
    if issuer is not None and claims.get("iss") != issuer:
        raise InvalidToken("wrong issuer")
    if audience is not None:
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud
        if not isinstance(audiences, list) or audience not in audiences:
            raise InvalidToken("wrong audience")
    if not isinstance(claims["sub"], str) or not isinstance(claims["jti"], str):
        raise InvalidToken("sub and jti must be strings")


def _eddsa_sign(claims: Mapping[str, Any], headers: Mapping[str, str], private_pem: str) -> str:
    header = {"alg": "EdDSA", **headers}
    signing_input = f"{_b64json(header)}.{_b64json(claims)}"
    signature = _ed25519_private_key(private_pem).sign(signing_input.encode("ascii"))
    return f"{signing_input}.{_b64(signature)}"


def _eddsa_verified_claims(parts: list[str], public_pem: str) -> dict[str, Any]:
    """The payload of a JWS compact token whose Ed25519 signature verifies under `public_pem`."""
    signature = _b64decode_strict(parts[2])
    try:
        _ed25519_public_key(public_pem).verify(signature, f"{parts[0]}.{parts[1]}".encode("ascii"))
    except InvalidSignature:
        raise InvalidToken("signature or claims invalid") from None
    return _decode_segment(parts[1])


def _check_ed25519_keys(private_pem: str, signing_kid: str, public_keys: Mapping[str, str]) -> None:
    """Refuse to boot unless every key is an Ed25519 PEM and the signing key is the kid's public key."""
    private = _ed25519_private_key(private_pem)
    for kid, pem in public_keys.items():
        try:
            _ed25519_public_key(pem)
        except ValueError:
            raise ValueError(f"EdDSA public key {kid!r} is not an Ed25519 PEM public key") from None
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    if private.public_key().public_bytes(*raw) != _ed25519_public_key(public_keys[signing_kid]).public_bytes(*raw):
        raise ValueError(f"the EdDSA private key does not match the public key of kid {signing_kid!r}")


def _ed25519_private_key(pem: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):  # TypeError: an encrypted key
        raise ValueError("the EdDSA private key is not an unencrypted Ed25519 PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the EdDSA private key is not an unencrypted Ed25519 PEM private key")
    return key


@lru_cache(maxsize=64)  # parsed once per configured key, not per request
def _ed25519_public_key(pem: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError("not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _b64json(value: Mapping[str, Any]) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode())


def _b64decode_strict(segment: str) -> bytes:
    """base64url without padding, in its one canonical spelling (no second text for the same signature)."""
    if not _B64URL.fullmatch(segment) or len(segment) % 4 == 1:
        raise InvalidToken("malformed token")
    raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    if _b64(raw) != segment:
        raise InvalidToken("malformed token")
    return raw


def _decode_segment(segment: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError) as exc:  # [[[...: past the parser
        raise InvalidToken("malformed token") from exc
    if not isinstance(value, dict):
        raise InvalidToken("malformed token")
    return value
