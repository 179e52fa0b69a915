"""Who is calling and what they may do: scopes, roles, the principal, and the route guards."""

from app.security.principal import Principal, authenticate, require
from app.security.scopes import ROLE_SCOPES, Role, Scope

__all__ = ["ROLE_SCOPES", "Principal", "Role", "Scope", "authenticate", "require"]
