"""`GET /v1/contacts/{id}` answered ahead of FastAPI's router: the hot read, with the same answers.

Around this route FastAPI spends more CPU than the read itself (matching over the router tree, then dependency
injection: HTTPBearer, `authenticate`, the scope check, the connection generator, path validation; see
docs/performance.md). This pure ASGI layer, mounted inside RequestContext and BodySizeLimit, runs the same
pieces in the order the route's dependencies run them, and calls the route's own endpoint:

1. `bare_connection` (a dead connection → the 503 problem RequestContext renders, never a 500);
2. `authorize` with the scopes the route declares (the same 401/403/429 problems and headers);
3. the endpoint `get_contact` (`contacts.get_fast`, `present_contact` with masking, ETag, JSONBody);
4. an AppError goes to the handler the app installed for it (the same problem+json as FastAPI's path).

It answers only `GET /v1/contacts/<canonical UUID>`. Anything else (HEAD, a trailing slash, an id in another
spelling FastAPI may accept or refuse with a 422) falls through to FastAPI unchanged; the FastAPI route stays the
OpenAPI source and the fallback. Setting FAST_READ_PATH=false removes this layer (tests/test_fastpath.py compares).
"""

from __future__ import annotations

import inspect
import re
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Send
from starlette.types import Scope as ASGIScope

from app.db import bare_connection
from app.errors import AppError
from app.routers.contacts import get_contact
from app.security.principal import ScopeCheck, authorize
from app.security.scopes import Scope

__all__ = ["ContactReadFastPath", "contact_read_route"]

PATH_FORMAT = "/v1/contacts/{contact_id}"
# The canonical spelling only: pydantic reads it as FastAPI would; every other spelling is FastAPI's to judge.
_PATH = re.compile(r"/v1/contacts/([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})")


@dataclass(frozen=True, slots=True)
class ContactReadRoute:
    """The FastAPI route the fast path stands in for, checked to still be the one it knows how to answer."""

    route: APIRoute               # what FastAPI puts in scope["route"] (RequestContext's metrics and logs)
    needed: frozenset[Scope]      # the scopes the route requires


def contact_read_route(app: FastAPI) -> ContactReadRoute:
    """Find `GET /v1/contacts/{contact_id}` and refuse to start if it no longer has the shape answered here."""
    for context in iter_route_contexts(app.routes):
        route = context.original_route
        if context.path_format == PATH_FORMAT and "GET" in (context.methods or ()) and isinstance(route, APIRoute):
            break
    else:
        raise RuntimeError(f"app.fastpath: no GET {PATH_FORMAT} route")
    dependant = route.dependant
    checks = [d.call for d in dependant.dependencies if isinstance(d.call, ScopeCheck)]
    same_shape = (
        route.endpoint is get_contact
        and list(inspect.signature(get_contact).parameters) == ["contact_id", "connection", "caller"]
        and [p.name for p in dependant.path_params] == ["contact_id"]
        and [d.name for d in dependant.dependencies] == ["connection", "caller"]
        and len(checks) == 1
        and not (dependant.query_params or dependant.header_params or dependant.cookie_params or dependant.body_params)
        and not route.dependencies
    )
    if not same_shape:  # a new parameter or dependency would be skipped here: fail loudly instead
        raise RuntimeError(f"app.fastpath: GET {PATH_FORMAT} changed shape; update app/fastpath.py")
    return ContactReadRoute(route, checks[0].needed)


class ContactReadFastPath:
    """Pure ASGI: `GET /v1/contacts/<uuid>` without FastAPI's router and dependency injection."""

    def __init__(self, app: ASGIApp, *, read: ContactReadRoute) -> None:
        self.app = app
        self.route = read.route
        self.needed = read.needed

    async def __call__(self, scope: ASGIScope, receive: Receive, send: Send) -> None:
        match = None
        # With FastAPI's own OpenTelemetry on (an OTel provider configured), FastAPI names the route in its spans:
        # leave such requests to it. Carnet's metrics and logs come from RequestContext, labelled below.
        if (scope["type"] == "http" and scope["method"] == "GET" and not scope.get("root_path")
                and "fastapi.telemetry" not in scope):
            match = _PATH.fullmatch(scope["path"])
        if match is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route  # what FastAPI sets: RequestContext labels metrics and logs with it
        scope["endpoint"] = get_contact
        scope["path_params"] = {"contact_id": match[1]}
        request = Request(scope, receive)
        try:
            # The route's dependencies in their order: the connection (yield, scope="function"), then the caller.
            async with bare_connection(request) as connection:
                caller = await authorize(request, self.needed)
                response = await get_contact(uuid.UUID(match[1]), connection, caller)
        except AppError as exc:
            response = await _handler(request, exc)(request, exc)
        await response(scope, receive, send)


def _handler(request: Request, exc: AppError) -> Any:
    """The exception handler the app installed for this error, looked up as Starlette does (by the class's MRO)."""
    handlers = request.app.exception_handlers
    for cls in type(exc).__mro__:
        if cls in handlers:
            return handlers[cls]
    raise exc  # no handler: as in FastAPI's path, RequestContext answers it
