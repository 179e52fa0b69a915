"""`/v1/tokens` and `/v1/me`: issuing, listing and revoking access tokens."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request

from app.db import ReadSession, WriteSession
from app.errors import IdempotencyKeyReused, MissingScope, problems
from app.routers.deps import Idempotency, JSONBody
from app.schemas.tokens import Me, TokenCreate, TokenIssued, TokenRead
from app.schemas.types import Limit
from app.security import ROLE_SCOPES, Principal, Scope, require
from app.services import idempotency as idempotency_service
from app.services import tokens as tokens_service

__all__ = ["me_router", "router"]

router = APIRouter(prefix="/tokens", tags=["tokens"])
me_router = APIRouter(tags=["tokens"])

Admin = Annotated[Principal, require(Scope.TOKENS_ADMIN)]
TokenId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


@router.post("", status_code=201, response_model=TokenIssued,
             responses=problems(tokens_service.TokenAlreadyIssued, IdempotencyKeyReused))
async def create_token(
    payload: TokenCreate, request: Request, session: WriteSession, caller: Admin, idem: Idempotency
) -> Any:
    """The token is in this response only. With an `Idempotency-Key`, a repeat mints nothing and is a 409
    `token-already-issued` naming the first token's `jti`: the token itself is never stored, not even for a replay."""
    if idem.replay:
        raise tokens_service.already_issued(json.loads(idem.replay.body))
    # A token passes on only what it holds: one narrowed to tokens:admin must not mint itself the data scopes.
    wanted = frozenset(payload.scopes) if payload.scopes is not None else ROLE_SCOPES[payload.role]
    if beyond := sorted(scope.value for scope in wanted - caller.scopes):
        raise MissingScope(f"a token can only grant scopes it holds; it lacks {', '.join(beyond)}",
                           missing_scopes=beyond)
    settings = request.app.state.settings
    issued = await tokens_service.issue(
        session, request.app.state.token_signer, subject=payload.subject, role=payload.role,
        scopes=frozenset(payload.scopes) if payload.scopes is not None else None,
        ttl_seconds=payload.ttl_seconds or settings.jwt_default_ttl_seconds, actor=caller,
    )
    if idem.key is not None:
        await idempotency_service.complete(session, subject=idem.subject, key=idem.key, status_code=201,
                                           body=tokens_service.replay_record(issued), headers={})
    return JSONBody({"token": issued.token, "jti": issued.token_id, "expires_at": issued.expires_at}, status_code=201)


@router.get("", response_model=list[TokenRead])
async def list_tokens(session: ReadSession, _: Admin, limit: Limit = 100, include_expired: bool = False) -> Any:
    """Newest first, at most `limit`, as a bare array (not a cursor page; docs/decisions.md). The tokens themselves
    are never stored, only their ids and claims."""
    return JSONBody(await tokens_service.list_page(session, limit=limit, include_expired=include_expired))


@router.delete("/{jti}", response_model=TokenRead, responses=problems(tokens_service.TokenNotFound))
async def revoke_token(jti: TokenId, request: Request, session: WriteSession, caller: Admin) -> Any:
    """Takes effect on the next request, in every API process (LISTEN/NOTIFY, database fallback)."""
    row = await tokens_service.revoke(session, jti, actor=caller)
    request.app.state.revocations.add(jti)
    return JSONBody(row)


@me_router.get("/me", response_model=Me)
async def get_me(caller: Annotated[Principal, require()]) -> Any:
    return JSONBody({"subject": caller.subject, "role": caller.role, "scopes": sorted(caller.scopes),
                     "token_id": caller.token_id})
