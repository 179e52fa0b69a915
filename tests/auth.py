"""Real tokens for tests, signed with the test settings' secret."""

from __future__ import annotations

from app.security import Role, Scope
from app.security.tokens import issue_access_token

__all__ = ["TEST_SECRET", "bearer"]

TEST_SECRET = "test-secret-" + "x" * 40


def bearer(role: Role = Role.ADMIN, *, scopes: set[Scope] | None = None, subject: str = "tester@shop.example") -> dict[str, str]:
    issued = issue_access_token(
        TEST_SECRET, subject=subject, role=role, scopes=frozenset(scopes) if scopes is not None else None,
        ttl_seconds=3600,
    )
    return {"Authorization": f"Bearer {issued.token}"}
