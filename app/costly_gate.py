"""Costly reads take their slot, or are refused, before FastAPI routes them (issue 15, class 3).

Under a flood of previews, most costly reads are refused (429 `costly-reads-per-token`, 503 `costly-reads-busy`).
Refused by the route's `costly(...)` dependency, each refusal cost the API about what a contact read costs (~1.3 ms:
routing, the 4 KB body read and parsed, dependency solving), and a crowd refused together made bursts that stalled
the event loop for everyone (docs/security.md, "Class 3"). `CostlyReadGate`, a pure ASGI layer mounted inside the
fast paths, runs for each route that has a `costly(...)` dependency, in the order the route's dependencies would:

    1. `authorize` with the scopes of that dependency (signature, claims, revocation, the token's rate limit, then
       the scopes: the same 401/403/429 problems, and the caller memoized so nothing is checked or counted twice);
    2. `CostlyReads.check`: 429 `costly-reads-per-token`, or 503 `costly-reads-busy` when the queue is full, at
       once: nothing of the body is read;
    3. for a route with a body (the preview), the body, read whole (a client that trickles it holds no slot
       meanwhile; a GET's body is left unread, as FastAPI leaves it); then a slot of `CostlyReads` (waiting in the
       queue if need be), held until the answer is sent;
    4. FastAPI, which routes, parses and validates as before; the route's `costly(...)` sees the slot is held.

A refusal is never journaled (the journal records answers below 400 only); JournalReads and BodySizeLimit, outside
this layer, work as before (a body over the limit goes to FastAPI as it would have: app.fastpath.buffered_body).
Routes are found by their `costly(...)` dependency, so a new costly route is gated without a word here; its path
parameters must be UUIDs (the canonical spelling is gated; any other goes to FastAPI, whose dependency still takes
the slot). COSTLY_READ_GATE=false removes the layer (tests/security/test_costly_read_flood.py and
bench/bench_refusal.py compare both ways).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Send
from starlette.types import Scope as ASGIScope

from app.errors import AppError
from app.fastpath import buffered_body, installed_handler, plain_http, routed_request
from app.security.costly import SLOT_HELD_BY, CostlyReads, costly_scopes
from app.security.principal import authorize
from app.security.scopes import Scope

__all__ = ["CostlyReadGate", "CostlyRoute", "costly_routes"]

_UUID = "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_PARAM = re.compile(r"\{([a-z_][a-z0-9_]*)\}")
_SAMPLE = "00000000-0000-4000-8000-000000000000"


@dataclass(frozen=True, slots=True)
class CostlyRoute:
    route: APIRoute
    method: str
    path: re.Pattern[str]         # the path format, each parameter a canonical UUID
    needed: frozenset[Scope]      # the scopes of its `costly(...)` dependency
    has_body: bool                # FastAPI reads a body for it (else the gate does not read one either)


def costly_routes(app: FastAPI) -> list[CostlyRoute]:
    """Every route with a `costly(...)` dependency; refuse to start when one cannot be gated exactly."""
    contexts = list(iter_route_contexts(app.routes))
    found = []
    for context in contexts:
        route = context.original_route
        if not isinstance(route, APIRoute):
            continue
        needed = [s for s in (costly_scopes(d.call) for d in route.dependant.dependencies) if s is not None]
        if not needed:
            continue
        path_format = context.path_format
        uuids = all(p.field_info.annotation is uuid.UUID for p in route.dependant.path_params)
        if len(needed) != 1 or len(context.methods or ()) != 1 or not uuids or route.dependencies:
            raise RuntimeError(f"app.costly_gate: {path_format} cannot be gated (one costly(...) dependency, one "
                               "method, UUID path parameters, no router-level dependencies); update app/costly_gate.py")
        (method,) = context.methods
        sample = _PARAM.sub(_SAMPLE, path_format)
        first = next(c for c in contexts if c.path_regex.match(sample) and method in (c.methods or {method}))
        if first.original_route is not route:  # another route would answer these paths: not ours to gate
            raise RuntimeError(f"app.costly_gate: {method} {sample} is routed elsewhere; update app/costly_gate.py")
        found.append(CostlyRoute(route, method, _pattern(path_format), needed[0], bool(route.dependant.body_params)))
    return found


def _pattern(path_format: str) -> re.Pattern[str]:
    """`/v1/segments/{segment_id}/count` → the literal parts escaped, each parameter a named canonical UUID."""
    parts = _PARAM.split(path_format)  # literal, name, literal, name, ...
    return re.compile("".join(f"(?P<{p}>{_UUID})" if i % 2 else re.escape(p) for i, p in enumerate(parts)))


class CostlyReadGate:
    """Pure ASGI: a costly read's token and scopes checked and its slot taken before FastAPI sees the request."""

    def __init__(self, app: ASGIApp, *, routes: list[CostlyRoute]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: ASGIScope, receive: Receive, send: Send) -> None:
        found = self._match(scope) if plain_http(scope) and scope["path"].startswith("/v1/") else None
        if found is None:
            await self.app(scope, receive, send)
            return
        costly, params = found
        request = routed_request(scope, receive, costly.route, costly.route.endpoint, params)
        reads: CostlyReads = request.app.state.costly_reads
        try:
            caller = await authorize(request, costly.needed)
            reads.check(caller.token_id)  # refused now, before the body is read
        except AppError as exc:
            await _refuse(request, exc, send)
            return
        if costly.has_body:  # the whole body before the slot: a client trickling its body must hold no slot meanwhile
            body, receive = await buffered_body(receive)
            if body is None:  # cut short, or over the limit: FastAPI's to answer (it never reaches the dependency)
                await self.app(scope, receive, send)
                return
        try:
            await reads.acquire(caller.token_id)
        except AppError as exc:
            await _refuse(request, exc, send)
            return
        try:
            setattr(request.state, SLOT_HELD_BY, caller.token_id)
            await self.app(scope, receive, send)
        finally:
            reads.release(caller.token_id)

    def _match(self, scope: ASGIScope) -> tuple[CostlyRoute, dict[str, str]] | None:
        for costly in self.routes:
            if scope["method"] == costly.method and (match := costly.path.fullmatch(scope["path"])):
                return costly, match.groupdict()
        return None


async def _refuse(request: Request, exc: AppError, send: Send) -> None:
    response = await installed_handler(request, exc)(request, exc)
    await response(request.scope, request.receive, send)
