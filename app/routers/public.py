"""`/v1/public`: the links people follow from emails. No bearer token: the signed link is the credential.

JSON by default; a minimal HTML page when the Accept header prefers text/html (a browser).
Expected errors on these routes are raised before anything is written, so answering them as a page
(instead of raising) never commits a half-done change.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import HTMLResponse
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import ReadSession, WriteSession
from app.errors import AppError, problems
from app.routers.deps import JSONBody
from app.schemas.lists import ConfirmResult, UnsubscribePreview, UnsubscribeResult
from app.services import lists as lists_service
from app.services.links import Link, LinkCodec, LinkExpired, LinkInvalid, LinkKind
from app.services.lists import ConfirmationCancelled

__all__ = ["router"]

router = APIRouter(prefix="/v1/public", tags=["public"])

All = Annotated[bool, Query(alias="all", description="1: withdraw email_marketing consent (every list)")]
_HTML = {"content": {"text/html": {}}}
_MAX_USER_AGENT = 1000


@router.get("/confirm/{token}", response_model=ConfirmResult,
            responses={200: _HTML, **problems(LinkInvalid, LinkExpired, ConfirmationCancelled)})
async def confirm_subscription_link(token: str, request: Request, session: WriteSession) -> Any:
    """Double opt-in confirmation, from the emailed link. Following it again changes nothing."""
    return await _confirm(token, request, session)


@router.post("/confirm/{token}", response_model=ConfirmResult,
             responses={200: _HTML, **problems(LinkInvalid, LinkExpired, ConfirmationCancelled)})
async def confirm_subscription(token: str, request: Request, session: WriteSession) -> Any:
    return await _confirm(token, request, session)


@router.get("/unsubscribe/{token}", response_model=UnsubscribePreview, responses={200: _HTML, **problems(LinkInvalid)})
async def show_unsubscribe(token: str, request: Request, session: ReadSession) -> Any:
    """What the link would do. Changes nothing: mail scanners and previews follow links."""
    try:
        link = _decode(request, token, LinkKind.UNSUBSCRIBE)
    except AppError as exc:
        return _error(request, exc)
    target = await lists_service.link_target(session, link)
    url = str(request.url.replace(query=""))
    body = {**target, "unsubscribe_url": url, "unsubscribe_all_url": url + "?all=1"}
    if not _wants_html(request):
        return JSONBody(body)
    name = _list_name(target)
    return _page(
        "Unsubscribe",
        f"<p>Stop receiving <strong>{name}</strong>?</p>"
        f'<form method="post" action="{html.escape(url)}"><button>Unsubscribe from {name}</button></form>'
        f'<form method="post" action="{html.escape(url)}?all=1"><button>Unsubscribe from every list</button></form>',
    )


@router.post("/unsubscribe/{token}", response_model=UnsubscribeResult, responses={200: _HTML, **problems(LinkInvalid)})
async def unsubscribe_by_link(token: str, request: Request, session: WriteSession, everything: All = False) -> Any:
    """RFC 8058 one-click unsubscribe (`List-Unsubscribe=One-Click` body accepted, not required)."""
    try:
        link = _decode(request, token, LinkKind.UNSUBSCRIBE)
    except AppError as exc:
        return _error(request, exc)
    result = await lists_service.unsubscribe_by_link(session, link, everything=everything, **_proof(request))
    body = {"result": "unsubscribed", **result}
    if not _wants_html(request):
        return JSONBody(body)
    what = "every list" if everything else _list_name(result)
    return _page("Unsubscribed", f"<p>You are unsubscribed from {what}.</p>")


async def _confirm(token: str, request: Request, session: AsyncSession) -> Response:
    try:
        link = _decode(request, token, LinkKind.CONFIRM)
        result = await lists_service.confirm(session, link, **_proof(request))
    except AppError as exc:
        return _error(request, exc)
    if not _wants_html(request):
        return JSONBody(result)
    message = "was already confirmed" if result["result"] == "already_confirmed" else "is confirmed"
    return _page("Subscription confirmed", f"<p>Your subscription to {_list_name(result)} {message}.</p>")


def _decode(request: Request, token: str, kind: LinkKind) -> Link:
    return LinkCodec(request.app.state.token_signer.secret).decode(token, kind=kind)


def _proof(request: Request) -> dict[str, str | None]:
    """Who followed the link: the client address (the proxy's, unless uvicorn trusts forwarded headers)."""
    user_agent = request.headers.get("user-agent")
    return {
        "ip": request.client.host if request.client else None,
        "user_agent": user_agent[:_MAX_USER_AGENT] if user_agent else None,
    }


def _error(request: Request, error: AppError) -> Response:
    if not _wants_html(request):
        raise error
    return _page(error.title, f"<p>{html.escape(error.detail)}</p>", status_code=error.status)


def _wants_html(request: Request) -> bool:
    """True when Accept ranks text/html above JSON (a browser); `*/*` alone means JSON."""
    ranks: dict[str, float] = {}
    for part in request.headers.get("accept", "").split(","):
        media, *params = (p.strip() for p in part.split(";"))
        quality = 1.0
        for param in params:
            if param.startswith("q="):
                try:
                    quality = float(param[2:])
                except ValueError:
                    quality = 0.0
        ranks[media.lower()] = max(quality, ranks.get(media.lower(), 0.0))
    html_rank = max(ranks.get("text/html", 0.0), ranks.get("text/*", 0.0))
    json_rank = max(ranks.get("application/json", 0.0), ranks.get("application/*", 0.0), ranks.get("*/*", 0.0))
    return html_rank > json_rank


def _list_name(target: Mapping[str, Any]) -> str:
    return html.escape(target["list"]["name"]) if target.get("list") else "this list"


def _page(title: str, body: str, *, status_code: int = 200) -> HTMLResponse:
    return HTMLResponse(
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="robots" content="noindex">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title>'
        f"</head><body><h1>{html.escape(title)}</h1>{body}</body></html>",
        status_code=status_code,
    )
