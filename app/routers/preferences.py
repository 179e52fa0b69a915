"""`/v1/public/preferences/{token}`: the person's preference center, and `GET /v1/contacts/{id}/links`.

The signed link is the credential (no account, no password). GET shows the page (HTML for a browser, JSON with
`Accept: application/json`) and changes nothing; every change is a POST to the same URL: JSON
(`PreferencesChange`) or the page's own form (`action=update|unsubscribe_all|export|erase|erase_confirm`).
A change that fails is rolled back whole (a savepoint) before the page says why.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Request, Response
from sqlalchemy.ext.asyncio import AsyncSession

from app.access import reveal
from app.db import ReadSession, WriteSession
from app.errors import AppError, ContactNotFound, FieldError, InvalidInput, PayloadTooLarge, problems
from app.models.base import utc_now
from app.routers.deps import JSONBody, Links
from app.routers.public import LinkToken, decode_link, link_error, proof_of
from app.schemas.gdpr import ContactExportRead, present_export
from app.schemas.preferences import (
    MAX_LISTS,
    ErasureConfirmationRequired,
    ErasureDone,
    PreferencesChange,
    PreferencesLinks,
    PreferencesRead,
)
from app.security import Principal, Scope, require
from app.services import contacts as contacts_service
from app.services import gdpr as gdpr_service
from app.services import lists as lists_service
from app.services import preferences as preferences_service
from app.services.links import ERASE_CONFIRM_TTL, Link, LinkCodec, LinkExpired, LinkInvalid, LinkKind
from app.web.forms import FORM, JSON, UnsupportedMediaType, form_pairs, read_model
from app.web.pages import Brand, language, render, translate, wants_html

__all__ = ["ErasureConfirmationInvalid", "PreferencesGone", "links_router", "router"]

router = APIRouter(prefix="/v1/public", tags=["public"])
links_router = APIRouter(prefix="/contacts", tags=["contacts"])

_HTML = {"content": {"text/html": {}}}
_MAX_BYTES = 32 * 1024          # MAX_LISTS list ids twice over, in a form
_BODY_SCHEMA = PreferencesChange.model_json_schema()  # inline: FastAPI lists only declared bodies in components
_FORM_SCHEMA = {"type": "object", "additionalProperties": False, "properties": {
    "action": {"type": "string", "enum": ["update", "unsubscribe_all", "export", "erase", "erase_confirm"]},
    "list": {"type": "array", "items": {"type": "string", "format": "uuid"}, "maxItems": MAX_LISTS},
    "subscribed": {"type": "array", "items": {"type": "string", "format": "uuid"}, "maxItems": MAX_LISTS},
    "confirmation": {"type": "string", "maxLength": 512},
}, "required": ["action"]}
_BODY = {"requestBody": {"required": True, "content": {JSON: {"schema": _BODY_SCHEMA},
                                                       FORM: {"schema": _FORM_SCHEMA}}}}


class PreferencesGone(AppError):
    status, slug, title = 410, "preferences-gone", "Nothing is held about this person any more"


class ErasureConfirmationInvalid(InvalidInput):
    slug, title = "invalid-confirmation", "This erasure confirmation was not given by this page"


@links_router.get("/{contact_id}/links", response_model=PreferencesLinks, responses=problems(ContactNotFound))
async def get_contact_links(
    contact_id: uuid.UUID, session: ReadSession, links: Links,
    _: Annotated[Principal, require(Scope.CONTACTS_READ, Scope.PII_READ)],
) -> Any:
    """The person's signed preference center link, to put in any email (also pushed to the emailing tools as
    the `preferences_url` field and carried in webhook payloads). A credential for that person: `pii:read`."""
    await contacts_service.get(session, contact_id)
    reveal(contact_id)  # a credential for the person's data: journaled like a read of it
    return JSONBody({"preferences_url": links.preferences_url(contact_id)})


@router.get("/preferences/{token}", response_model=PreferencesRead,
            responses={200: _HTML, **problems(LinkInvalid, PreferencesGone)})
async def show_preferences(token: LinkToken, request: Request, session: ReadSession) -> Any:
    """The preference center. Changes nothing (mail scanners follow links)."""
    try:
        link = await lists_service.follow_link(session, decode_link(request, token, LinkKind.PREFERENCES))
        view = await _view(request, session, link.contact_id)
    except AppError as exc:
        return link_error(request, exc)
    return _answer(request, view)


@router.post(
    "/preferences/{token}", openapi_extra=_BODY,
    response_model=PreferencesRead | ErasureConfirmationRequired | ErasureDone | ContactExportRead,
    responses={200: _HTML, 202: {"description": "Erasure request filed", "model": ErasureDone},
               **problems(LinkInvalid, LinkExpired, PreferencesGone, PayloadTooLarge, UnsupportedMediaType,
                          InvalidInput, ErasureConfirmationInvalid)},
)
async def change_preferences(token: LinkToken, request: Request, session: WriteSession) -> Any:
    """One change: lists, unsubscribe from everything, download my data (art. 15), erasure (art. 17, two steps).

    Joining a list records a `granted` email_marketing event, leaving one a `list_subscription` `withdrawn`
    event, each naming the list, with the request's proof; no other list changes.
    """
    try:
        link = decode_link(request, token, LinkKind.PREFERENCES)
        change = await read_model(request, PreferencesChange, max_bytes=_MAX_BYTES, from_form=_form_change)
        async with session.begin_nested():  # a refused change leaves nothing half written
            try:
                link = await lists_service.lock_link_holder(session, link)
            except ContactNotFound:
                raise PreferencesGone("there is no data about this person any more") from None
            return await _apply(request, session, link, change)
    except AppError as exc:
        return link_error(request, exc)


async def _apply(request: Request, session: AsyncSession, link: Link, change: PreferencesChange) -> Response:
    contact_id = link.contact_id
    proof = {**proof_of(request), "form_url": _page_url(request)}
    lang = language(request)
    if change.lists is not None:
        wording = {v["id"]: translate(lang, "subscribe_wording", list=v["name"])
                   for v in (await preferences_service.view(session, contact_id))["lists"]}
        changed = await preferences_service.change_lists(session, contact_id, change.lists, proof=proof,
                                                         wording=wording)
        return _answer(request, await _view(request, session, contact_id), notice="saved", changed=changed)
    if change.unsubscribe_all:
        changed = await preferences_service.unsubscribe_everything(session, contact_id, proof=proof)
        return _answer(request, await _view(request, session, contact_id), notice="everything_done", changed=changed)
    if change.export:
        return _export(await gdpr_service.export(session, contact_id))
    if change.erase:
        return _confirm_erasure(request, link)
    return await _erase(request, session, link, change.erase_confirmation or "")


# ---- the answers -------------------------------------------------------------------------------------------


async def _view(request: Request, session: AsyncSession, contact_id: uuid.UUID) -> dict[str, Any]:
    try:
        view = await preferences_service.view(session, contact_id)
    except ContactNotFound:  # erased (a merge would have been followed)
        raise PreferencesGone("there is no data about this person any more") from None
    mode = request.app.state.settings.preferences_erasure
    return {**view, "erasure": {"mode": mode, "request": view["erasure"]["request"]}}


def _answer(request: Request, view: dict[str, Any], *, notice: str | None = None,
            changed: int | None = None) -> Response:
    body = {k: view[k] for k in ("email", "lists", "email_marketing", "erasure")}
    request_row = view["erasure"]["request"]
    body["erasure"] = {"mode": view["erasure"]["mode"], "request": _summary(request_row) if request_row else None}
    if changed is not None:
        body["changed"] = changed
    if not wants_html(request):
        return JSONBody(body, headers=_PRIVATE)
    lang = language(request, view["language"])
    if request_row:
        body["erasure"]["request"] |= {"requested_on": _day(request_row["requested_at"], lang),
                                       "due_on": _day(request_row["due_by"], lang)}
    return render("preferences.html", lang=lang, brand=Brand.of(request.app.state.settings),
                  title_key="preferences_title", view=body, private=True,
                  notice=translate(lang, notice) if notice else None)


def _export(data: Any) -> Response:
    """The GDPR export, unmasked (it is the person's own data), as a file to keep."""
    now = utc_now()
    document = present_export(data, reveal_pii=True, generated_at=now)
    return JSONBody(document, headers={
        **_PRIVATE, "Content-Disposition": f'attachment; filename="my-data-{now:%Y-%m-%d}.json"'})


def _confirm_erasure(request: Request, link: Link) -> Response:
    """First step: nothing happens yet; the answer carries a confirmation valid for ERASE_CONFIRM_TTL."""
    expires = utc_now() + ERASE_CONFIRM_TTL
    token = _codec(request).encode(Link(LinkKind.ERASE, link.contact_id, None, int(expires.timestamp())))
    if not wants_html(request):
        return JSONBody({"erasure": "confirmation_required", "confirmation": token,
                         "expires_at": expires.replace(microsecond=0)}, headers=_PRIVATE)
    return render("erase_confirm.html", lang=language(request), brand=Brand.of(request.app.state.settings),
                  title_key="erase_confirm_title", confirmation=token, back_url=_page_url(request, token=True),
                  mode=request.app.state.settings.preferences_erasure, private=True)


async def _erase(request: Request, session: AsyncSession, link: Link, confirmation: str) -> Response:
    # The page exists (its link held): a confirmation it did not give is a bad field of the body, not a missing
    # link. One answer whether it is damaged, forged or another page's; an expired one is still a 410.
    try:
        confirmed = _codec(request).decode(confirmation, kind=LinkKind.ERASE)
    except LinkInvalid:
        confirmed = None
    if confirmed is None or confirmed.contact_id != link.contact_id:
        raise ErasureConfirmationInvalid(FieldError(
            "erase_confirmation", "not a confirmation this page gave: ask for erasure again", "invalid_confirmation"))
    self_service = request.app.state.settings.preferences_erasure == "self_service"
    outcome = await preferences_service.erase(session, link.contact_id, self_service=self_service)
    status = "completed" if outcome.erased else "requested"
    if not wants_html(request):
        return JSONBody({"erasure": status, "request": _summary(outcome.request)},
                        status_code=200 if outcome.erased else 202, headers=_PRIVATE)
    lang = language(request)
    brand = Brand.of(request.app.state.settings)
    if outcome.erased:
        return render("message.html", lang=lang, brand=brand, title_key="erased_title",
                      paragraphs=[translate(lang, "erased_text")])
    return render("message.html", lang=lang, brand=brand, title_key="requested_title", status_code=202,
                  paragraphs=[translate(lang, "requested_text", due=_day(outcome.request["due_by"], lang))])


# ---- helpers -------------------------------------------------------------------------------------------------

_PRIVATE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


def _form_change(raw: bytes) -> dict[str, Any]:
    """The page's form → the JSON shape: every list shown is sent (`list`), the ticked ones again (`subscribed`)."""
    fields: dict[str, list[str]] = {}
    for key, value in form_pairs(raw, max_fields=2 * MAX_LISTS + 5):
        fields.setdefault(key, []).append(value)
    unknown = sorted(set(fields) - {"action", "list", "subscribed", "confirmation"})
    if unknown:
        raise InvalidInput.one(unknown[0][:100], "unknown field", "extra_forbidden")
    action = (fields.get("action") or [""])[0]
    if action == "update":
        ticked = set(fields.get("subscribed", []))
        return {"lists": {list_id: "subscribed" if list_id in ticked else "unsubscribed"
                          for list_id in fields.get("list", [])}}
    simple = {"unsubscribe_all": {"unsubscribe_all": True}, "export": {"export": True},
              "erase": {"erase": "request"},
              "erase_confirm": {"erase_confirmation": (fields.get("confirmation") or [""])[0]}}
    if action not in simple:
        raise InvalidInput.one("action", "one of update, unsubscribe_all, export, erase, erase_confirm", "enum")
    return simple[action]


def _summary(row: Any) -> dict[str, Any]:
    return {"id": row["id"], "status": row["status"], "requested_at": row["requested_at"],
            "due_by": row.get("due_by")}


def _codec(request: Request) -> LinkCodec:
    return LinkCodec(request.app.state.token_signer.secret)


def _page_url(request: Request, *, token: bool = False) -> str:
    """The preference page's address; without its token (`token=False`) when it goes into a proof."""
    url = str(request.url.replace(query=""))
    return url if token else url.rsplit("/", 1)[0]


def _day(moment: datetime, lang: str) -> str:
    day = moment.astimezone(UTC)
    return f"{day:%d/%m/%Y}" if lang == "fr" else f"{day:%d %b %Y}"
