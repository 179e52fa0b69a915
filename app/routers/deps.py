"""Shared route plumbing: the JSON response class, ETag/If-Match, Idempotency-Key, the Problem schema."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, Query, Request, Response
from pydantic import BaseModel, Field, ValidationError
from pydantic_core import to_json
from sqlalchemy.ext.asyncio import AsyncSession

from app.access import reveal
from app.db import WriteSession
from app.errors import AppError, InvalidInput, MissingScope, Unauthenticated, problems
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
    "Links",
    "Problem",
    "batch_results",
    "etag",
    "item_problem",
    "run_each",
    "version_receipt",
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
        default=None, max_length=50,
        description="422 (and 415, naming the Content-Type header): one entry per faulty field, the first 50")
    more_errors: int | None = Field(
        default=None, description="422: how many faulty fields were found beyond those listed in `errors`")
    existing_id: str | None = Field(default=None, description="409 duplicate-contact: the contact holding the key")
    missing_scopes: list[str] | None = Field(default=None, description="403 only")


AUTH_PROBLEMS = problems(Unauthenticated, MissingScope, InvalidInput)


ITEM_ERRORS = 5  # a batch answers for up to 1000 items: each failed one lists its first 5 faulty fields


def item_problem(error: AppError) -> dict[str, Any]:
    """The problem body of one failed item of a batch, its `errors` cut to ITEM_ERRORS (the rest counted)."""
    fields = problem_fields(error)
    errors = fields.get("errors")
    if isinstance(errors, list) and len(errors) > ITEM_ERRORS:
        fields["errors"] = errors[:ITEM_ERRORS]
        fields["more_errors"] = int(fields.get("more_errors") or 0) + len(errors) - ITEM_ERRORS
    return fields


async def run_each(
    session: AsyncSession,
    items: Sequence[Any],
    schema: type[BaseModel],
    action: Callable[[Any], Awaitable[tuple[str, Any]]],
) -> list[dict[str, Any]]:
    """Validate and run each batch item in its own savepoint: one bad item never sinks the others.

    `action` returns (status, id) for an item that went through; a failed one gets its problem body. An item
    already validated (an instance of `schema`) is taken as it is: pydantic does not validate an instance again.
    """
    outcomes: list[tuple[str, Any] | ValidationError | AppError] = []
    for item in items:
        try:
            payload = schema.model_validate(item)
            async with session.begin_nested():
                outcomes.append(await action(payload))
        except (ValidationError, AppError) as exc:
            outcomes.append(exc)
    return batch_results(outcomes)


def batch_results(outcomes: Sequence[tuple[str, Any] | ValidationError | AppError]) -> list[dict[str, Any]]:
    """A batch's per-item results: `{index, status, id}`, or `{index, status: "error", error: <problem>}`."""
    results: list[dict[str, Any]] = []
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, ValidationError | AppError):
            error = (validation_problem(outcome.errors(), limit=ITEM_ERRORS)
                     if isinstance(outcome, ValidationError) else outcome)
            results.append({"index": index, "status": "error", "error": item_problem(error)})
        else:
            results.append({"index": index, "status": outcome[0], "id": outcome[1]})
    return results


# A page's `next_cursor` (unpadded base64url of an encrypted position): only the server can tell one it issued.
# 2,048: the longest the server issues is a `sort=last_name` cursor holding 255 four-byte letters (~1,600).
CursorParam = Annotated[str | None, Declared(pattern=r"^[A-Za-z0-9_-]*$"), Query(
    max_length=2048, description="`next_cursor` of the previous page, as given. The server judges it: a cursor it "
                                 "did not issue, or issued for another sort, is a 422")]



def etag(version: int) -> str:
    return f'"v{version}"'


def version_receipt(key: str, value: Any, version: int) -> JSONBody:
    """A definition's write answered to a token that may not read it: which one and its version, the ETag kept for
    If-Match, nothing the definition holds (docs/security.md, class 11)."""
    return JSONBody({key: value, "version": version}, headers={"ETag": etag(version)})


# The ETags this server issues (`"v3"`, weak or not), or `*`; anything else can match no version of anything.
_IF_MATCH_PATTERN = r'^(\*|(W/)?"v([0-9]{1,19})")$'  # an order's version is 16 digits long
_IF_MATCH = re.compile(_IF_MATCH_PATTERN)
# A version is a bigint: `"v` + at most 19 ASCII digits + `"` (str.isdigit() also takes `²`, and int() refuses
# more than 4,300 digits: both were 500s).
_MAX_VERSION = 2**63 - 1
# An ETag of the declared form that no version has (past 2^63-1): the write answers 412 where it compares versions.
# Not raised here: RFC 9110 §13.2.1 evaluates preconditions only on a request otherwise valid, so a bad body or id
# stays a 422 (docs/security.md, 9).
NO_VERSION = -1


async def _if_match(if_match: Annotated[str | None, NOT_NULLABLE, Declared(pattern=_IF_MATCH_PATTERN), Header(
        max_length=64, description='ETag from a GET, e.g. "v3", or *. The server judges whether it is current: 412 '
                                   'if stale; a value not of this form is a 422')] = None) -> int | None:
    """The version the caller expects (NO_VERSION for one that is none), or None when it did not ask (or said `*`)."""
    if if_match is None:
        return None
    match = _IF_MATCH.fullmatch(if_match.strip())
    if match is None:
        # Not of the form the contract declares: bad input naming the header, as a bad body is (a 412 would say a
        # malformed request was valid and only stale: found by the fuzzer once a cart body with `2.0` was valid).
        raise InvalidInput.one("If-Match", 'an ETag as this server gives them ("v3", W/"v3") or *', "invalid_etag")
    if match[1] == "*":
        return None
    return int(match[3]) if int(match[3]) <= _MAX_VERSION else NO_VERSION


IfMatch = Annotated[int | None, Depends(_if_match)]


# The header's value as the contract declares it (its description is the route's: what a reuse means there).
IdempotencyKey = Annotated[str | None, NOT_NULLABLE, Declared(pattern=idempotency_service.KEY_PATTERN, maxLength=255)]


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
        reveal(*_shown_in_clear(stored.body))  # an access again, journaled as the first answer was
        replay = JSONBody(stored.body, status_code=stored.status_code,
                          headers={**stored.headers, "Idempotent-Replayed": "true"})
    return _IdempotencyScope(session, caller.subject, idempotency_key, replay)


Idempotency = Annotated[_IdempotencyScope, Depends(_idempotency)]


def _shown_in_clear(body: Any) -> list[str]:
    """The contact a stored answer shows with personal data in clear (a create's, an upsert's, a merge's), which
    its presenter journaled when it was first sent. Only its own token gets a replay: the masking is the same."""
    if isinstance(body, dict) and body.get("pii_masked") is False and body.get("id"):
        return [str(body["id"])]
    return []


def _links(request: Request) -> LinkBuilder:
    """Signed public links (confirm, unsubscribe) under PUBLIC_BASE_URL, as imports make them: the request's
    Host is the API's address as its caller reached it (behind a proxy, an internal one), not the emails'."""
    return LinkBuilder(LinkCodec(request.app.state.token_signer.secret), request.app.state.settings.public_base_url)


Links = Annotated[LinkBuilder, Depends(_links)]
