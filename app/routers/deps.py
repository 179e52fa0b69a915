"""Shared route plumbing: the JSON response class, ETag/If-Match, Idempotency-Key, the Problem schema."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, Path, Query, Request, Response
from pydantic import BaseModel, Field, ValidationError
from pydantic_core import to_json
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import WriteSession
from app.errors import AppError, InvalidInput, MissingScope, PreconditionFailed, Unauthenticated, problems
from app.problems import problem_fields, validation_problem
from app.schemas.types import NOT_NULLABLE, Declared
from app.security import Principal, authenticate
from app.services import idempotency as idempotency_service
from app.services.links import LinkBuilder, LinkCodec

__all__ = [
    "AUTH_PROBLEMS",
    "CursorParam",
    "Idempotency",
    "IdempotencyKey",
    "IfMatch",
    "JSONBody",
    "LinkToken",
    "Links",
    "Problem",
    "etag",
    "item_problem",
    "run_each",
]


class JSONBody(Response):
    """JSON rendered by pydantic-core: UUIDs, datetimes (RFC 3339) and Decimals (as strings) included."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return to_json(content)


class ProblemFieldError(BaseModel):
    field: str
    message: str
    code: str


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    instance: str
    errors: list[ProblemFieldError] | None = Field(
        default=None, description="422 (and 415, naming the Content-Type header): one entry per faulty field")
    existing_id: str | None = Field(default=None, description="409 duplicate-contact: the contact holding the key")
    missing_scopes: list[str] | None = Field(default=None, description="403 only")


AUTH_PROBLEMS = problems(Unauthenticated, MissingScope, InvalidInput)


def item_problem(error: AppError) -> dict[str, Any]:
    """The problem body of one failed item of a batch."""
    return problem_fields(error)


async def run_each(
    session: AsyncSession,
    items: Sequence[Any],
    schema: type[BaseModel],
    action: Callable[[Any], Awaitable[tuple[str, Any]]],
) -> list[dict[str, Any]]:
    """Validate and run each batch item in its own savepoint: one bad item never sinks the others.

    `action` returns (status, id) for an item that went through; a failed one gets its problem body.
    """
    results: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        try:
            payload = schema.model_validate(item)
            async with session.begin_nested():
                status, item_id = await action(payload)
        except ValidationError as exc:
            results.append({"index": index, "status": "error", "error": item_problem(validation_problem(exc.errors()))})
        except AppError as exc:
            results.append({"index": index, "status": "error", "error": item_problem(exc)})
        else:
            results.append({"index": index, "status": status, "id": item_id})
    return results


# A page's `next_cursor` (unpadded base64url of an encrypted position): only the server can tell one it issued.
CursorParam = Annotated[str | None, Declared(pattern=r"^[A-Za-z0-9_-]*$"), Query(
    max_length=1000, description="`next_cursor` of the previous page, as given. The server judges it: a cursor it "
                                 "did not issue, or issued for another sort, is a 422")]
# The token of a link Carnet sent by email (payload.signature, unpadded base64url): only the server can verify it;
# a longer or malformed one is "damaged" like a forged one (400, the links' own answer), so both are only declared.
LinkToken = Annotated[str, Declared(pattern=r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$", maxLength=512), Path(
    description="The link's token, as sent. The server judges it: damaged, forged or of another kind "
                                "of link → 400; expired → 410")]


def etag(version: int) -> str:
    return f'"v{version}"'


# The ETags this server issues (`"v3"`, weak or not), or `*`; anything else can match no version of anything.
_IF_MATCH_PATTERN = r'^(\*|(W/)?"v[0-9]{1,19}")$'  # an order's version is 16 digits long
_IF_MATCH = re.compile(_IF_MATCH_PATTERN)


async def _if_match(if_match: Annotated[str | None, NOT_NULLABLE, Declared(pattern=_IF_MATCH_PATTERN), Header(
        description='ETag from a GET, e.g. "v3", or *. The server judges whether it is current: 412 if stale '
                    '(or not one of its ETags)')] = None) -> int | None:
    """The version the caller expects, or None when it did not ask (or said `*`)."""
    match = _IF_MATCH.fullmatch(if_match.strip()) if if_match is not None else None
    if if_match is None or (match and match[1] == "*"):
        return None
    if match is None:
        raise PreconditionFailed("If-Match does not match any version of this resource")
    return int(if_match.strip().removeprefix("W/")[2:-1])


IfMatch = Annotated[int | None, Depends(_if_match)]


# The header's value as the contract declares it (its description is the route's: what a reuse means there).
IdempotencyKey = Annotated[str | None, NOT_NULLABLE, Declared(pattern=idempotency_service.KEY_PATTERN)]


@dataclass(slots=True)
class _IdempotencyScope:
    """The request's Idempotency-Key: `replay` is set when a stored first response must be answered."""

    session: AsyncSession
    subject: str
    key: str | None
    replay: Response | None

    async def respond(self, status_code: int, body: Any, headers: dict[str, str] | None = None) -> JSONBody:
        response = JSONBody(body, status_code=status_code, headers=headers)
        if self.key is not None:
            await idempotency_service.complete(
                self.session, subject=self.subject, key=self.key, status_code=status_code,
                body=json.loads(response.body), headers=headers or {},
            )
        return response


async def _idempotency(
    request: Request,
    session: WriteSession,
    caller: Annotated[Principal, Depends(authenticate)],
    idempotency_key: Annotated[IdempotencyKey, Header(
        description="Replays the first response for 24 h, to the same token only. The server judges reuse: the same "
                    "key with another body or path, or from another token → 422; a fresh random key (a UUID) per "
                    "intended request never collides")] = None,
) -> _IdempotencyScope:
    if idempotency_key is None:
        return _IdempotencyScope(session, caller.subject, None, None)
    fingerprint = idempotency_service.request_fingerprint(request.method, request.url.path, await request.body())
    stored = await idempotency_service.claim(
        session, subject=caller.subject, token_id=caller.token_id, key=idempotency_key, method=request.method,
        path=request.url.path, fingerprint=fingerprint,
    )
    replay = None
    if stored is not None:
        replay = JSONBody(stored.body, status_code=stored.status_code,
                          headers={**stored.headers, "Idempotent-Replayed": "true"})
    return _IdempotencyScope(session, caller.subject, idempotency_key, replay)


Idempotency = Annotated[_IdempotencyScope, Depends(_idempotency)]


def _links(request: Request) -> LinkBuilder:
    """Signed public links (confirm, unsubscribe) under PUBLIC_BASE_URL, as imports make them: the request's
    Host is the API's address as its caller reached it (behind a proxy, an internal one), not the emails'."""
    return LinkBuilder(LinkCodec(request.app.state.token_signer.secret), request.app.state.settings.public_base_url)


Links = Annotated[LinkBuilder, Depends(_links)]
