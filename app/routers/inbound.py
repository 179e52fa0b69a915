"""`/v1/inbound/*`: webhooks from the emailing tools. No bearer JWT: each destination's own secret.

Mailchimp: verified by `X-Mailchimp-Signature` when the destination has `config.signing_secret`, otherwise by
`?secret=<inbound_secret>` in the URL pasted into Mailchimp. Brevo: `Authorization: Bearer <inbound_secret>`
(Brevo's webhook `auth` setting).
"""

from __future__ import annotations

import hmac
import json
import uuid
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Header, Query, Request
from pydantic import BaseModel, Field

from app.db import WriteSession
from app.errors import BadRequest, Unauthenticated, problems
from app.routers.deps import JSONBody
from app.schemas.freeform import MAX_JSON_DEPTH, json_problem
from app.services import destinations as destinations_service
from app.services import inbound
from app.services.destinations import DestinationNotFound

__all__ = ["router"]

router = APIRouter(prefix="/v1/inbound", tags=["inbound"])


class InboundResult(BaseModel):
    """The same for every address: what was read from the payload, never what Carnet holds or changed (a
    compromised vendor must not learn which addresses are in the file; docs/security.md, class 10)."""

    received: int = Field(description="Events read from the payload that Carnet takes back (unsubscribes, "
                                      "complaints, bounces, address changes, confirmations). Each is applied "
                                      "to the people this destination was given, on its mapped lists, and is "
                                      "a no-op otherwise; the answer does not say which.")


class BadSignature(Unauthenticated):
    slug, title = "bad-inbound-signature", "The webhook's secret or signature does not match this destination"


async def _destination(session: Any, request: Request, destination_id: uuid.UUID, kind: str) -> Any:
    loaded = await destinations_service.load(session, destination_id, box=request.app.state.secret_box)
    if loaded.kind != kind:
        raise DestinationNotFound(f"no {kind} destination with id {destination_id}")
    return loaded


def _same(given: str | None, expected: str | None) -> bool:
    return given is not None and expected is not None and hmac.compare_digest(given.encode(), expected.encode())


@router.get("/mailchimp/{destination_id}", response_model=InboundResult)
async def mailchimp_url_check(destination_id: uuid.UUID) -> Any:
    """Mailchimp checks the URL with a GET before saving the webhook: 200, nothing else."""
    return JSONBody({"received": 0})


@router.post("/mailchimp/{destination_id}", response_model=InboundResult,
             responses=problems(DestinationNotFound, BadSignature, BadRequest))
async def mailchimp_webhook(
    destination_id: uuid.UUID, request: Request, session: WriteSession,
    secret: Annotated[str | None, Query(max_length=500, description="The destination's inbound_secret")] = None,
    x_mailchimp_signature: Annotated[str | None, Header(max_length=500)] = None,
) -> Any:
    """Form-encoded `type=unsubscribe|cleaned|upemail|subscribe|profile&data[...]=...`."""
    destination = await _destination(session, request, destination_id, "mailchimp")
    try:
        pairs = parse_qsl((await request.body()).decode(), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise BadRequest("the body is not UTF-8 form data") from None
    signing_secret = destination.secrets.get("signing_secret")
    if signing_secret:
        url = request.app.state.settings.public_base_url.rstrip("/") + request.url.path
        if request.url.query:
            url += "?" + request.url.query
        if not _same(x_mailchimp_signature, inbound.mailchimp_signature(signing_secret, url, pairs)):
            raise BadSignature("X-Mailchimp-Signature does not match")
    elif not _same(secret, destination.secrets.get("inbound_secret")):
        raise BadSignature("the ?secret= of this URL does not match the destination's inbound_secret")
    events = inbound.parse_mailchimp(dict(pairs))
    await inbound.apply(session, destination.row, events, vendor="mailchimp")
    return JSONBody({"received": len(events)})


@router.post("/brevo/{destination_id}", response_model=InboundResult,
             responses=problems(DestinationNotFound, BadSignature, BadRequest))
async def brevo_webhook(
    destination_id: uuid.UUID, request: Request, session: WriteSession,
    authorization: Annotated[str | None, Header(max_length=600)] = None,
) -> Any:
    """JSON: one event, or a list of them (Brevo's batched webhooks)."""
    destination = await _destination(session, request, destination_id, "brevo")
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not _same(token.strip(), destination.secrets.get("inbound_secret")):
        raise BadSignature("Authorization: Bearer <inbound_secret> is missing or does not match")
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested past the parser's limit
        raise BadRequest("the body is not JSON (or is nested too deep)") from None
    # Brevo's events are flat: deeper is not Brevo. Their number is the body limit's business (a batch is large).
    if json_problem(body, max_values=None, text=False) is not None:
        raise BadRequest(f"the body is nested more than {MAX_JSON_DEPTH} levels deep")
    events = inbound.parse_brevo(body)
    await inbound.apply(session, destination.row, events, vendor="brevo")
    return JSONBody({"received": len(events)})
