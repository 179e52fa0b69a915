"""`POST /v1/public/lists/{list_id}/signup`: the newsletter box on the shop's own pages. No token.

The browser posts JSON (with a CORS preflight) or a plain form (no script at all). Only the list's exact origins
get CORS headers; any other origin is a 403 without them. The answer is the same 202 for every address, given no
sooner than SIGNUP_ANSWER_SECONDS after the request arrived, so that neither its body nor its timing tells a
new address from a known, subscribed or suppressed one (app.services.signup decides what happens).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request, Response
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.types import Receive, Scope, Send

from app.db import ReadSession, WriteSession
from app.errors import AppError, InvalidInput, PayloadTooLarge, RateLimited, problems
from app.logging import get_logger
from app.models.base import utc_now
from app.routers.deps import JSONBody, Links
from app.routers.public import proof_of
from app.schemas.signup import HONEYPOT, MAX_SIGNUP_BYTES, SignupAccepted, SignupForm
from app.security.ratelimit import SignupLimits
from app.services import signup as signup_service
from app.services.lists import ListNotFound
from app.services.signup import open_list
from app.web.cors import PREFLIGHT_HEADERS, allow_headers, origin_of, request_origin
from app.web.forms import FORM, JSON, UnsupportedMediaType, form_pairs, read_model
from app.web.pages import Brand, language, render, translate, wants_html

__all__ = ["OriginNotAllowed", "router"]

log = get_logger("carnet.signup")

router = APIRouter(prefix="/v1/public", tags=["public"])

_TRUE = frozenset({"true", "on", "1", "yes"})
_FORM_SCHEMA = SignupForm.model_json_schema()
_BODY = {"requestBody": {"required": True, "content": {JSON: {"schema": _FORM_SCHEMA},
                                                       FORM: {"schema": _FORM_SCHEMA}}}}


class OriginNotAllowed(AppError):
    status, slug, title = 403, "origin-not-allowed", "Signups to this list are not accepted from this page"


@router.options("/lists/{list_id}/signup", status_code=204, response_class=Response,
                responses={204: {"description": "Allowed: CORS headers for this origin"},
                           **problems(ListNotFound, OriginNotAllowed, RateLimited)})
async def signup_preflight(list_id: uuid.UUID, request: Request, session: ReadSession) -> Response:
    """CORS preflight: `Access-Control-Allow-Origin` only for one of the list's `signup_origins`."""
    _refuse_after(request.app.state.signup_limits.client_wait(proof_of(request)["ip"]))  # it reads the database
    origin = _allowed_origin(request, await open_list(session, list_id))
    return Response(status_code=204, headers={**allow_headers(origin), **PREFLIGHT_HEADERS})


@router.post(
    "/lists/{list_id}/signup", status_code=202, response_model=SignupAccepted, openapi_extra=_BODY,
    responses={202: {"content": {"text/html": {}}},
               **problems(OriginNotAllowed, ListNotFound, PayloadTooLarge, UnsupportedMediaType, InvalidInput,
                          RateLimited)},
)
async def sign_up(list_id: uuid.UUID, request: Request, session: WriteSession, links: Links) -> Any:
    """Sign up to a list that takes browser signups (`public_signup`): always double opt-in.

    JSON or form-encoded `{email, first_name?, last_name?, consent: true, website?}` (`website` is the honeypot),
    at most 4 kB. The same 202 for every address. Limits per client address and per list: 429 + Retry-After.
    """
    answer_at = time.monotonic() + request.app.state.settings.signup_answer_seconds
    limits: SignupLimits = request.app.state.signup_limits
    proof = proof_of(request)
    try:
        _refuse_after(limits.client_wait(proof["ip"]))
    except RateLimited as exc:  # as every error of an allowed origin: the page's script may read Retry-After
        exc.headers.update(await _cors_if_allowed(request, session, list_id))
        raise
    the_list = await open_list(session, list_id)
    origin = _allowed_origin(request, the_list)
    cors = allow_headers(origin)
    try:
        _take(limits.per_list, str(list_id))
        form = await read_model(request, SignupForm, max_bytes=MAX_SIGNUP_BYTES, from_form=_form_fields)
        if limits.address_allows(list_id, form.email):
            outcome = await signup_service.sign_up(
                session, list_id, form, links=links, at=utc_now(),
                proof={**proof, "form_url": _form_url(request, origin)})
        else:
            outcome = "throttled"
    except AppError as exc:
        exc.headers.update(cors)  # the page's script may read why (a 422 names the field)
        raise
    log.info("signup.received", list_id=str(list_id), outcome=outcome)
    lang = language(request)
    body = {"status": "accepted", "detail": translate(lang, "signup_sent", list=_list_name(the_list))}
    if wants_html(request):
        page = render("message.html", lang=lang, brand=Brand.of(request.app.state.settings, the_list),
                      title_key="signup_title", status_code=202,
                      paragraphs=[body["detail"], translate(lang, "signup_next")],
                      back_url=_form_url(request, origin))
        page.headers.update(cors)
        return _NotBefore(page, answer_at)
    return _NotBefore(JSONBody(body, status_code=202, headers={**cors, "Cache-Control": "no-store"}), answer_at)


class _NotBefore(Response):
    """Sends the wrapped answer once `answer_at` (monotonic) has come: after the transaction committed and the
    connection went back to the pool, so the wait holds nothing."""

    def __init__(self, response: Response, answer_at: float) -> None:
        self.response, self.answer_at = response, answer_at
        self.status_code, self.background = response.status_code, None
        self.raw_headers = response.raw_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.sleep(max(0.0, self.answer_at - time.monotonic()))
        await self.response(scope, receive, send)


def _allowed_origin(request: Request, the_list: Any) -> str:
    origin = request_origin(request)
    if origin is None or origin not in the_list["signup_origins"]:
        raise OriginNotAllowed("this page's origin is not one of the list's signup_origins")
    return origin


async def _cors_if_allowed(request: Request, session: AsyncSession, list_id: uuid.UUID) -> dict[str, str]:
    """The CORS headers of a refusal decided before the list was read: only for one of its `signup_origins`."""
    try:
        return allow_headers(_allowed_origin(request, await open_list(session, list_id)))
    except AppError:  # unknown or closed list, another origin: the 429 goes without them
        return {}


def _take(buckets: Any, key: str) -> None:
    _refuse_after(buckets.take(key))


def _refuse_after(wait: int | None) -> None:
    if wait is not None:
        raise RateLimited(wait)


def _form_url(request: Request, origin: str) -> str:
    """The page the form was on: the Referer when it is on the allowed origin, else the origin itself."""
    referer = request.headers.get("referer", "")
    return referer[:2000] if referer and origin_of(referer) == origin else origin + "/"


def _form_fields(raw: bytes) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in form_pairs(raw, max_fields=20):
        if key in data:
            raise InvalidInput.one(key[:100], "given more than once", "duplicate_field")
        data[key] = value or None  # an empty field is an absent one
    if isinstance(data.get("consent"), str):
        data["consent"] = True if data["consent"].lower() in _TRUE else data["consent"]
    data.setdefault(HONEYPOT, None)
    return data


def _list_name(the_list: Any) -> str:
    return str(the_list["display_name"] or the_list["name"])
