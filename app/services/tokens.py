"""Issuing, listing and revoking access tokens; every issuance and revocation is recorded."""

from __future__ import annotations

from datetime import UTC
from typing import Any

from sqlalchemy import and_, func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import Conflict, InvalidInput, NotFound
from app.models import AccessToken
from app.models.base import utc_now
from app.security import Principal, Role, Scope
from app.security.revocation import REVOCATION_CHANNEL
from app.security.tokens import IssuedToken, TokenSigner
from app.services import journal

__all__ = [
    "TokenAlreadyIssued", "TokenNotFound", "already_issued", "bootstrap_admin", "issue", "list_page", "replay_record",
    "revoke",
]
_t = AccessToken.__table__  # type: ignore[attr-defined]
BOOTSTRAP_LOCK = 0x6361726E6574_02  # pg advisory lock key: "carnet" + 2


class TokenNotFound(NotFound):
    slug, title = "token-not-found", "No such token"


class TokenAlreadyIssued(Conflict):
    slug, title = "token-already-issued", "This Idempotency-Key already issued a token"


def replay_record(issued: IssuedToken) -> dict[str, Any]:
    """What an Idempotency-Key keeps of an issuance: its id and expiry, never the token itself.

    A stored copy of the response would be a usable bearer token in clear in `idempotency_record` for 24 h,
    while Carnet keeps no token anywhere else (docs/decisions.md, "Idempotency").
    """
    return {"jti": issued.token_id, "expires_at": issued.expires_at.astimezone(UTC).isoformat().replace("+00:00", "Z")}


def already_issued(record: Any) -> TokenAlreadyIssued:
    """The answer to a repeat of a keyed issuance: a 409 naming the token the key issued (to use or revoke)."""
    jti = record.get("jti") if isinstance(record, dict) else None
    return TokenAlreadyIssued(
        f"this Idempotency-Key already issued token {jti}; a token is shown only once and is not kept for "
        "replays: use the token from the first response, or revoke it and ask again with a new key",
        jti=jti, expires_at=record.get("expires_at") if isinstance(record, dict) else None,
    )


async def issue(
    session: AsyncSession,
    signer: TokenSigner,
    *,
    subject: str,
    role: Role,
    scopes: frozenset[Scope] | None,
    ttl_seconds: int,
    actor: Principal,
) -> IssuedToken:
    try:
        issued = signer.issue(subject=subject, role=role, scopes=scopes, ttl_seconds=ttl_seconds)
    except ValueError as exc:
        raise InvalidInput.one("scopes", str(exc), "scope_not_in_role") from None
    await session.execute(
        insert(_t).values(jti=issued.token_id, subject=subject, role=role.value, scopes=sorted(issued.scopes),
                          issued_at=utc_now(), expires_at=issued.expires_at, issued_by=actor.subject)
    )
    await journal.record(session, journal.act(actor, "tokens.created", detail={
        "jti": issued.token_id, "for_subject": subject, "role": role.value, "scopes": sorted(issued.scopes),
        "expires_at": issued.expires_at.isoformat()}))
    return issued


async def bootstrap_admin(
    session: AsyncSession, signer: TokenSigner, *, ttl_seconds: int, actor: Principal
) -> IssuedToken | None:
    """An admin token for a database that never had one (the first `carnet serve` against it prints it), else None.

    Decided by the database, not by the machine: a checkout switched to another DATABASE_URL gets its token. "Never
    had one" counts revoked and expired admin tokens too, so a server's log shows at most one admin token in its
    whole life; later ones come from `carnet token create`. Processes booting together: the lock is taken before
    the check, in the transaction that inserts, so exactly one of them issues.
    """
    await session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": BOOTSTRAP_LOCK})
    if await session.scalar(select(select(_t.c.jti).where(_t.c.role == Role.ADMIN.value).exists())):
        return None
    return await issue(session, signer, subject="bootstrap-admin", role=Role.ADMIN, scopes=None,
                       ttl_seconds=ttl_seconds, actor=actor)


async def list_page(session: AsyncSession, *, limit: int, include_expired: bool) -> list[dict[str, Any]]:
    query = select(_t)
    if not include_expired:
        query = query.where(_t.c.expires_at > func.now())
    rows = await session.execute(query.order_by(_t.c.issued_at.desc()).limit(limit))
    return [dict(r) for r in rows.mappings()]


async def revoke(session: AsyncSession, jti: str, *, actor: Principal) -> dict[str, Any]:
    """Revoke (idempotent) and tell every API process at commit, through NOTIFY."""
    row = (
        await session.execute(
            update(_t).where(and_(_t.c.jti == jti, _t.c.revoked_at.is_(None)))
            .values(revoked_at=utc_now(), revoked_by=actor.subject).returning(*_t.c)
        )
    ).mappings().first()
    if row is None:
        row = (await session.execute(select(_t).where(_t.c.jti == jti))).mappings().first()
        if row is None:
            raise TokenNotFound(f"no token with id {jti}")
        return dict(row)
    await session.execute(text("SELECT pg_notify(:channel, :jti)"), {"channel": REVOCATION_CHANNEL, "jti": jti})
    await journal.record(session, journal.act(actor, "tokens.revoked", detail={"jti": jti}))
    return dict(row)
