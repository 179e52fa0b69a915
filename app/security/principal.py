"""The authenticated caller and the route guards built on it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.errors import MissingScope, RateLimited, Unauthenticated
from app.security.ratelimit import TokenBuckets
from app.security.revocation import RevocationList, revoked_in_database
from app.security.scopes import Role, Scope
from app.security.tokens import InvalidToken, TokenSigner

__all__ = ["Principal", "authenticate", "authorize", "check_member_filters", "check_scopes", "require"]

_bearer = HTTPBearer(auto_error=False, description="A JWT minted by `carnet token create` or POST /v1/tokens")


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    role: Role
    scopes: frozenset[Scope]
    token_id: str

    @property
    def sees_pii(self) -> bool:
        return Scope.PII_READ in self.scopes

    def reads(self, scope: Scope) -> bool:
        """Whether the token holds this read scope: a write answers its read model only then (security.md, 11)."""
        return scope in self.scopes


async def authenticate(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """Verify the bearer token once per request (memoized: FastAPI would run this per scope set).

    Signature and claims, then revocation, then the token's rate limit. Reads only.
    """
    cached: Principal | None = getattr(request.state, "principal", None)
    if cached is not None:
        return cached
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthenticated("a bearer token is required")
    signer: TokenSigner = request.app.state.token_signer
    try:
        claims = signer.verify(credentials.credentials)
    except InvalidToken as exc:
        raise Unauthenticated(str(exc)) from None
    revocations: RevocationList = request.app.state.revocations
    revoked = revocations.is_revoked(claims.token_id)
    if revoked is None:  # not listening right now: ask the database
        makers: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
        async with makers() as session:
            revoked = await revoked_in_database(session, claims.token_id)
    if revoked:
        raise Unauthenticated("token revoked")
    limiter: TokenBuckets = request.app.state.rate_limiter
    wait = limiter.take(claims.token_id)
    if wait is not None:
        raise RateLimited(wait)
    principal = Principal(claims.subject, claims.role, claims.scopes, claims.token_id)
    request.state.principal = principal
    return principal


@dataclass(frozen=True, slots=True)
class ScopeCheck:
    needed: frozenset[Scope]

    async def __call__(self, caller: Annotated[Principal, Depends(authenticate)]) -> Principal:
        return check_scopes(caller, self.needed)


def check_scopes(caller: Principal, needed: frozenset[Scope]) -> Principal:
    """The caller, if it holds every scope in `needed`; else a 403 naming the missing ones."""
    missing = sorted(needed - caller.scopes)
    if missing:
        raise MissingScope(f"missing scope: {', '.join(missing)}", missing_scopes=missing)
    return caller


def check_member_filters(caller: Principal, *, segment_id: object, list_id: object) -> None:
    """A `segment` or `list` filter answers what `/v1/segments/{id}/contacts` or `/v1/lists/{id}/members` answers
    (their members): it needs that route's scope, on every route that offers it (contacts, exports)."""
    check_scopes(caller, frozenset(scope for given, scope in ((segment_id, Scope.SEGMENTS_READ),
                                                              (list_id, Scope.LISTS_READ)) if given is not None))


async def authorize(request: Request, needed: frozenset[Scope]) -> Principal:
    """What `require(*needed)` runs, as one plain call for ASGI code outside FastAPI's dependency injection
    (app.fastpath): the same bearer parsing, `authenticate` and scope check, so the same 401/403/429."""
    return check_scopes(await authenticate(request, await _bearer(request)), needed)


def require(*needed: Scope) -> Any:
    """Dependency marker: the caller must hold every listed scope (shown in OpenAPI too)."""
    return Security(ScopeCheck(frozenset(needed)), scopes=sorted(needed))
