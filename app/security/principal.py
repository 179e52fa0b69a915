"""The authenticated caller and the route guards built on it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.errors import MissingScope, Unauthenticated
from app.security.scopes import Role, Scope
from app.security.tokens import InvalidToken, verify_access_token

__all__ = ["Principal", "TokenVerifier", "authenticate", "require"]

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


@dataclass(frozen=True, slots=True)
class TokenVerifier:
    """What `authenticate` needs from the settings, resolved once at app creation."""

    secret: str
    issuer: str | None = None
    audience: str | None = None

    def principal(self, token: str) -> Principal:
        claims = verify_access_token(token, self.secret, issuer=self.issuer, audience=self.audience)
        return Principal(claims.subject, claims.role, claims.scopes, claims.token_id)


async def authenticate(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """Verify the bearer token once per request (memoized: FastAPI would run this per scope set)."""
    cached: Principal | None = getattr(request.state, "principal", None)
    if cached is not None:
        return cached
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthenticated("a bearer token is required")
    verifier: TokenVerifier = request.app.state.token_verifier
    try:
        principal = verifier.principal(credentials.credentials)
    except InvalidToken as exc:
        raise Unauthenticated(str(exc)) from None
    request.state.principal = principal
    return principal


@dataclass(frozen=True, slots=True)
class ScopeCheck:
    needed: frozenset[Scope]

    async def __call__(self, caller: Annotated[Principal, Depends(authenticate)]) -> Principal:
        missing = sorted(self.needed - caller.scopes)
        if missing:
            raise MissingScope(f"missing scope: {', '.join(missing)}", missing_scopes=missing)
        return caller


def require(*needed: Scope) -> Any:
    """Dependency marker: the caller must hold every listed scope (shown in OpenAPI too)."""
    return Security(ScopeCheck(frozenset(needed)), scopes=sorted(needed))
