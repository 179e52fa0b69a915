"""The two hot contact routes answered ahead of FastAPI's router, with the same answers.

Around `GET /v1/contacts/{id}` and `POST /v1/contacts/upsert` FastAPI spends more CPU than the work itself (matching
over the router tree, then dependency injection: HTTPBearer, `authenticate`, the scope check, the connection or
session generators, parameter and body validation; see docs/performance.md). These pure ASGI layers run the same
pieces in the order the routes' dependencies run them, and call the routes' own code. The read is mounted inside
RequestContext, JournalReads, MethodGate and BodySizeLimit; the upsert inside the first two only, as what the other
two would do to the requests it takes is known: MethodGate lets POST through on this path (its route serves it), and
BodySizeLimit lets through a body whose Content-Length it accepts (the server frames the body by that length; the
layer still stops reading past the limit, and hands what it read to them).

    ContactReadFastPath    GET /v1/contacts/<canonical UUID>
        1. `bare_connection` (a dead connection → the 503 problem RequestContext renders, never a 500);
        2. `authorize` with the scopes the route declares (the same 401/403/429 problems and headers);
        3. the endpoint `get_contact` (`contacts.get_fast`, `present_contact` with masking, ETag, JSONBody).
    ContactUpsertFastPath  POST /v1/contacts/upsert, `Content-Type: application/json`, no Idempotency-Key, a
                           Content-Length within BodySizeLimit's, no Transfer-Encoding
        1. the body, parsed and validated by the route's own body field; anything but a valid payload (bad JSON,
           a 422, a body cut short or over the limit) goes to FastAPI with the body replayed, so FastAPI answers
           it exactly as before (whether its auth errors or its body errors come first);
        2. `authorize`, as above (FastAPI's route opens a session first, which touches no database);
        3. the route's `upsert_in_autocommit` (`contacts.fast_upsert` on the bare connection). When it declines
           (attributes or tags, a lost race, a suppressed address: it wrote nothing), FastAPI's route runs with the
           body replayed: it tries the statements once more, then the transactional path. The caller is memoized
           on the request state, so the token is checked and counted once.

An AppError goes to the handler the app installed for it (the same problem+json as FastAPI's path). Any other
method, spelling or path falls through to FastAPI unchanged; the FastAPI routes stay the OpenAPI source and the
fallback. FAST_READ_PATH=false / FAST_UPSERT_PATH=false remove a layer (tests/test_fastpath.py compares both ways).
"""

from __future__ import annotations

import inspect
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, iter_route_contexts
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Send
from starlette.types import Scope as ASGIScope

from app.db import bare_connection
from app.errors import AppError
from app.middleware import declared_within
from app.routers.contacts import get_contact, upsert_contact, upsert_in_autocommit
from app.schemas.contacts import ContactUpsert
from app.security.principal import ScopeCheck, authorize
from app.security.scopes import Scope

__all__ = ["ContactReadFastPath", "ContactUpsertFastPath", "buffered_body", "contact_read_route",
           "contact_upsert_route", "find_route", "installed_handler", "plain_http", "routed_request"]

PATH_FORMAT = "/v1/contacts/{contact_id}"
UPSERT_PATH = "/v1/contacts/upsert"
# The canonical spelling only: pydantic reads it as FastAPI would; every other spelling is FastAPI's to judge.
_PATH = re.compile(r"/v1/contacts/([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})")


@dataclass(frozen=True, slots=True)
class ContactReadRoute:
    """The FastAPI route the fast path stands in for, checked to still be the one it knows how to answer."""

    route: APIRoute               # what FastAPI puts in scope["route"] (RequestContext's metrics and logs)
    needed: frozenset[Scope]      # the scopes the route requires


@dataclass(frozen=True, slots=True)
class ContactUpsertRoute:
    route: APIRoute
    needed: frozenset[Scope]
    body: Any                     # FastAPI's ModelField for the payload: its own validation, its own 422 errors


def contact_read_route(app: FastAPI) -> ContactReadRoute:
    """Find `GET /v1/contacts/{contact_id}` and refuse to start if it no longer has the shape answered here."""
    route = find_route(app, PATH_FORMAT, "GET")
    dependant = route.dependant
    same_shape = (
        route.endpoint is get_contact
        and list(inspect.signature(get_contact).parameters) == ["contact_id", "connection", "caller"]
        and [p.name for p in dependant.path_params] == ["contact_id"]
        and [d.name for d in dependant.dependencies] == ["connection", "caller"]
        and not dependant.body_params
        and _no_other_inputs(route)
    )
    needed = _scopes(dependant)
    if not same_shape or needed is None:  # a new parameter or dependency would be skipped here: fail loudly instead
        raise RuntimeError(f"app.fastpath: GET {PATH_FORMAT} changed shape; update app/fastpath.py")
    return ContactReadRoute(route, needed)


def contact_upsert_route(app: FastAPI) -> ContactUpsertRoute:
    """Find `POST /v1/contacts/upsert` and refuse to start if it no longer has the shape answered here."""
    route = find_route(app, UPSERT_PATH, "POST")
    dependant = route.dependant
    deps = {d.name: d for d in dependant.dependencies}
    body = dependant.body_params[0] if len(dependant.body_params) == 1 else None
    same_shape = (
        route.endpoint is upsert_contact
        and list(inspect.signature(upsert_contact).parameters) == ["payload", "request", "session", "caller", "idem"]
        and list(deps) == ["session", "caller", "idem"]
        and [p.name for p in deps["idem"].header_params] == ["idempotency_key"]  # present → FastAPI's path
        and body is not None and body.name == "payload" and body.field_info.annotation is ContactUpsert
        and not getattr(body.field_info, "embed", False)
        and not dependant.path_params
        and _no_other_inputs(route)
    )
    needed = _scopes(dependant)
    if not same_shape or needed is None:
        raise RuntimeError(f"app.fastpath: POST {UPSERT_PATH} changed shape; update app/fastpath.py")
    return ContactUpsertRoute(route, needed, body)


class ContactReadFastPath:
    """Pure ASGI: `GET /v1/contacts/<uuid>` without FastAPI's router and dependency injection."""

    def __init__(self, app: ASGIApp, *, read: ContactReadRoute) -> None:
        self.app = app
        self.route = read.route
        self.needed = read.needed

    async def __call__(self, scope: ASGIScope, receive: Receive, send: Send) -> None:
        match = _PATH.fullmatch(scope["path"]) if _ours(scope, "GET") else None
        if match is None:
            await self.app(scope, receive, send)
            return
        request = routed_request(scope, receive, self.route, get_contact, {"contact_id": match[1]})
        try:
            # The route's dependencies in their order: the connection (yield, scope="function"), then the caller.
            async with bare_connection(request) as connection:
                caller = await authorize(request, self.needed)
                response = await get_contact(uuid.UUID(match[1]), connection, caller)
        except AppError as exc:
            response = await installed_handler(request, exc)(request, exc)
        await response(scope, receive, send)


class ContactUpsertFastPath:
    """Pure ASGI: `POST /v1/contacts/upsert` without FastAPI, when the autocommit statements can answer it."""

    def __init__(self, app: ASGIApp, *, upsert: ContactUpsertRoute, max_bytes: int) -> None:
        self.app = app                # MethodGate, BodySizeLimit, then FastAPI
        self.route = upsert.route
        self.needed = upsert.needed
        self.body = upsert.body
        self.max_bytes = max_bytes    # BodySizeLimit's

    async def __call__(self, scope: ASGIScope, receive: Receive, send: Send) -> None:
        if not (_ours(scope, "POST") and scope["path"] == UPSERT_PATH
                and _plain_json_without_key(scope["headers"], self.max_bytes)):
            await self.app(scope, receive, send)
            return
        body, replay = await buffered_body(receive, limit=self.max_bytes)
        payload = self._payload(body)
        if payload is None:  # FastAPI's to answer (its auth errors come before its 422)
            await self.app(scope, replay, send)
            return
        request = routed_request(scope, replay, self.route, upsert_contact, {})
        try:
            # The route's session dependency comes first but touches no database until used; then the caller.
            caller = await authorize(request, self.needed)
            response = await upsert_in_autocommit(request, payload, caller)
        except AppError as exc:
            response = await installed_handler(request, exc)(request, exc)
        if response is None:  # the transactional path: FastAPI's route, the caller already memoized
            await self.app(scope, replay, send)
            return
        await response(scope, replay, send)

    def _payload(self, body: bytes | None) -> ContactUpsert | None:
        """The body as the route's parameter, validated as FastAPI validates it; None for anything else."""
        if not body:
            return None
        try:
            value = json.loads(body)  # what Starlette's request.json() does
        except (ValueError, RecursionError):
            return None
        payload, errors = self.body.validate(value, {}, loc=("body",))
        return None if errors else payload  # type: ignore[no-any-return]


# ---- helpers ---------------------------------------------------------------------------------------------------


def find_route(app: FastAPI, path_format: str, method: str) -> APIRoute:
    for context in iter_route_contexts(app.routes):
        route = context.original_route
        if context.path_format == path_format and method in (context.methods or ()) and isinstance(route, APIRoute):
            return route
    raise RuntimeError(f"app.fastpath: no {method} {path_format} route")


def _scopes(dependant: Dependant) -> frozenset[Scope] | None:
    """The scopes of the route's one scope check, None when it has none or several."""
    checks = [d.call for d in dependant.dependencies if isinstance(d.call, ScopeCheck)]
    return checks[0].needed if len(checks) == 1 else None


def _no_other_inputs(route: APIRoute) -> bool:
    dependant = route.dependant
    return not (dependant.query_params or dependant.header_params or dependant.cookie_params or route.dependencies)


def _ours(scope: ASGIScope, method: str) -> bool:
    return plain_http(scope) and scope["method"] == method


def plain_http(scope: ASGIScope) -> bool:
    """An HTTP request a layer ahead of FastAPI may answer itself."""
    # With FastAPI's own OpenTelemetry on (an OTel provider configured), FastAPI names the route in its spans:
    # leave such requests to it. Carnet's metrics and logs come from RequestContext, labelled by routed_request.
    return scope["type"] == "http" and not scope.get("root_path") and "fastapi.telemetry" not in scope


def routed_request(scope: ASGIScope, receive: Receive, route: APIRoute, endpoint: Callable[..., Any],
                   path_params: dict[str, str]) -> Request:
    """The request as FastAPI's router hands it over: RequestContext labels metrics and logs with scope["route"]."""
    scope["route"] = route
    scope["endpoint"] = endpoint
    scope["path_params"] = path_params
    return Request(scope, receive)


def _plain_json_without_key(headers: list[tuple[bytes, bytes]], max_bytes: int) -> bool:
    """`Content-Type: application/json` (the first one, as Starlette reads it), no Idempotency-Key, and a body
    BodySizeLimit would let through: its Content-Length (the first one, as it reads it) within `max_bytes`, and no
    Transfer-Encoding (with one, the length is not what frames the body)."""
    content_type = length = None
    for name, value in headers:
        if name in (b"idempotency-key", b"transfer-encoding"):
            return False
        if name == b"content-type" and content_type is None:
            content_type = value
        elif name == b"content-length" and length is None:
            length = value
    return (content_type == b"application/json" and length is not None
            and declared_within(length.decode("latin-1"), max_bytes))


async def buffered_body(receive: Receive, *, limit: int | None = None) -> tuple[bytes | None, Receive]:
    """The whole body (None unless it arrived complete), and a receive that replays what was read, then goes on.

    An error raised while reading (BodySizeLimit's 413 mid-stream) is raised again at the same point of the replay,
    so FastAPI meets exactly what it would have met. Past `limit` bytes it stops reading (None: the layers after it
    meet the rest).
    """
    messages: list[Message] = []
    failure: Exception | None = None
    received = 0
    try:
        while not messages or (messages[-1]["type"] == "http.request" and messages[-1].get("more_body", False)):
            messages.append(await receive())
            received += len(messages[-1].get("body", b""))
            if limit is not None and received > limit:
                break
    except Exception as exc:  # handed to FastAPI unchanged, through the replay
        failure = exc
    complete = failure is None and messages[-1]["type"] == "http.request" and not messages[-1].get("more_body", False)
    body = b"".join(m.get("body", b"") for m in messages) if complete else None

    async def replay() -> Message:
        if messages:
            return messages.pop(0)
        if failure is not None:
            raise failure
        return await receive()

    return body, replay


def installed_handler(request: Request, exc: AppError) -> Any:
    """The exception handler the app installed for this error, looked up as Starlette does (by the class's MRO)."""
    handlers = request.app.exception_handlers
    for cls in type(exc).__mro__:
        if cls in handlers:
            return handlers[cls]
    raise exc  # no handler: as in FastAPI's path, RequestContext answers it
