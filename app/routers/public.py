"""`/v1/public`: the links people follow from emails. No bearer token: the signed link is the credential.

JSON by default; a page (app.web) when the Accept header prefers text/html (a browser). A GET never changes
anything (mail scanners and previews follow every link): it shows what a POST to the same URL would do.
Expected errors on these routes are raised before anything is written, so answering them as a page
(instead of raising) never commits a half-done change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import ReadSession, WriteSession
from app.errors import AppError, problems
from app.routers.deps import JSONBody
from app.schemas.lists import ConfirmPreview, ConfirmResult, UnsubscribePreview, UnsubscribeResult
from app.schemas.types import Declared
from app.services import lists as lists_service
from app.services.links import MAX_TOKEN_CHARS, Link, LinkCodec, LinkExpired, LinkInvalid, LinkKind
from app.services.lists import ConfirmationCancelled
from app.web.pages import Brand, language, render, translate, wants_html

__all__ = ["LinkToken", "decode_link", "link_error", "proof_of", "router"]

router = APIRouter(prefix="/v1/public", tags=["public"])

All = Annotated[bool, Query(alias="all", description="1: withdraw email_marketing consent (every list)")]
_HTML = {"content": {"text/html": {}}}
_MAX_USER_AGENT = 1000
# Declared, and refused by LinkCodec.decode past it: a longer token gets the "invalid link" page, not a JSON 422.
# The token of a link Carnet sent by email (payload.signature, unpadded base64url): only the server can verify it;
# a longer or malformed one names no link, like a forged one (404, the links' own answer), so both are only declared.
LinkToken = Annotated[str, Declared(pattern=r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$", maxLength=MAX_TOKEN_CHARS), Path(
    description="The link's token, as sent. The server judges it: a token it did not issue for this page (damaged, "
                "forged, or of another kind of link) names nothing → 404 `invalid-link`; expired → 410")]


@router.get("/confirm/{token}", response_model=ConfirmPreview,
            responses={200: _HTML, **problems(LinkInvalid, LinkExpired)})
async def show_confirmation(token: LinkToken, request: Request, session: ReadSession) -> Any:
    """The double opt-in link from the email: a page with the confirm button. Changes nothing (mail scanners
    open every link, and a scanner is not the person's proof); the button POSTs to the same URL."""
    try:
        link = decode_link(request, token, LinkKind.CONFIRM)
    except AppError as exc:
        return link_error(request, exc)
    target = await lists_service.link_target(session, link)
    url = str(request.url.replace(query=""))
    if not wants_html(request):
        return JSONBody({**target, "confirm_url": url}, headers=_NO_STORE)
    brand, name = await _face(request, session, target)
    return render("message.html", lang=language(request), brand=brand, title_key="confirm_title",
                  paragraphs=[_t(request, "confirm_question", list=name)],
                  forms=[{"action": url, "label": _t(request, "confirm_button"), "style": "primary"}])


@router.post("/confirm/{token}", response_model=ConfirmResult,
             responses={200: _HTML, **problems(LinkInvalid, LinkExpired, ConfirmationCancelled)})
async def confirm_subscription(token: LinkToken, request: Request, session: WriteSession) -> Any:
    """Confirm: `pending` → `subscribed`, and a `confirmed` ledger event with the clicker's IP and user agent.
    Following it again changes nothing."""
    try:
        link = decode_link(request, token, LinkKind.CONFIRM)
        result = await lists_service.confirm(session, link, **proof_of(request))
    except AppError as exc:
        return link_error(request, exc)
    if not wants_html(request):
        return JSONBody(result, headers=_NO_STORE)
    brand, name = await _face(request, session, result)
    key = "already_confirmed_text" if result["result"] == "already_confirmed" else "confirmed_text"
    return render("message.html", lang=language(request), brand=brand, title_key="confirmed_title",
                  paragraphs=[_t(request, key, list=name)])


@router.get("/unsubscribe/{token}", response_model=UnsubscribePreview, responses={200: _HTML, **problems(LinkInvalid)})
async def show_unsubscribe(token: LinkToken, request: Request, session: ReadSession) -> Any:
    """What the link would do. Changes nothing: mail scanners and previews follow links."""
    try:
        link = decode_link(request, token, LinkKind.UNSUBSCRIBE)
    except AppError as exc:
        return link_error(request, exc)
    target = await lists_service.link_target(session, link)
    url = str(request.url.replace(query=""))
    if not wants_html(request):
        return JSONBody({**target, "unsubscribe_url": url, "unsubscribe_all_url": url + "?all=1"}, headers=_NO_STORE)
    brand, name = await _face(request, session, target)
    return render("message.html", lang=language(request), brand=brand, title_key="unsubscribe_title",
                  paragraphs=[_t(request, "unsubscribe_question", list=name)],
                  forms=[{"action": url, "label": _t(request, "unsubscribe_one", list=name), "style": "primary"},
                         {"action": url + "?all=1", "label": _t(request, "unsubscribe_every"), "style": "secondary"}])


@router.post("/unsubscribe/{token}", response_model=UnsubscribeResult, responses={200: _HTML, **problems(LinkInvalid)})
async def unsubscribe_by_link(token: LinkToken, request: Request, session: WriteSession,
                              everything: All = False) -> Any:
    """RFC 8058 one-click unsubscribe (`List-Unsubscribe=One-Click` body accepted, not required)."""
    try:
        link = decode_link(request, token, LinkKind.UNSUBSCRIBE)
    except AppError as exc:
        return link_error(request, exc)
    result = await lists_service.unsubscribe_by_link(session, link, everything=everything, **proof_of(request))
    body = {"result": "unsubscribed", **result}
    if not wants_html(request):
        return JSONBody(body, headers=_NO_STORE)
    brand, name = await _face(request, session, result)
    text = _t(request, "unsubscribed_all_text") if everything else _t(request, "unsubscribed_text", list=name)
    return render("message.html", lang=language(request), brand=brand, title_key="unsubscribed_title",
                  paragraphs=[text])


# ---- shared by the public routers --------------------------------------------------------------------------

_NO_STORE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


def decode_link(request: Request, token: str, kind: LinkKind) -> Link:
    return LinkCodec(request.app.state.token_signer.secret).decode(token, kind=kind)


def proof_of(request: Request) -> dict[str, str | None]:
    """Who acted: the client address (the proxy's, unless FORWARDED_ALLOW_IPS trusts it) and the user agent."""
    user_agent = request.headers.get("user-agent")
    return {
        "ip": request.client.host if request.client else None,
        "user_agent": user_agent[:_MAX_USER_AGENT] if user_agent else None,
    }


# What a person reads for the errors of the public links (the problem's detail is for developers, in English).
_ERROR_PAGES = {"invalid-link": ("error_title", "link_invalid_text"),
                "link-expired": ("error_title", "link_expired_text"),
                "confirmation-cancelled": ("error_title", "confirmation_cancelled_text"),
                "preferences-gone": ("gone_title", "gone_text"),
                "invalid-confirmation": ("error_title", "erase_confirmation_invalid_text")}


def link_error(request: Request, error: AppError) -> Response:
    """A browser gets the error as a page (in its language); anything else gets the problem (no-store and
    no-referrer, as every problem: app.problems)."""
    if not wants_html(request):
        raise error
    lang = language(request)
    title_key, text_key = _ERROR_PAGES.get(error.slug, ("error_title", ""))
    return render("message.html", lang=lang, brand=Brand.of(request.app.state.settings), title_key=title_key,
                  paragraphs=[translate(lang, text_key) if text_key else error.detail], status_code=error.status)


async def _face(request: Request, session: AsyncSession, target: Mapping[str, Any]) -> tuple[Brand, str]:
    """The brand and the name people know the link's list by (its display name)."""
    settings = request.app.state.settings
    face = await lists_service.public_face(session, target["list"]["id"]) if target.get("list") else None
    if face is None:
        return Brand.of(settings), _t(request, "this_list")
    return Brand.of(settings, face), face["display_name"] or face["name"]


def _t(request: Request, key: str, **values: Any) -> str:
    return translate(language(request), key, **values)
