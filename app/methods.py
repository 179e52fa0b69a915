"""The method gate: which methods a path serves is decided from the app's routes before any path parameter is read.

Starlette routes a request to the first route whose path *and* method match; only when none does, it answers 405
naming the methods of the first route whose path matched. So `PATCH /v1/contacts/batch` reached
`PATCH /v1/contacts/{contact_id}` and was a 422 ("batch" is not an id), and a 405 or an `OPTIONS` named one route's
methods, not the path's. Here a path belongs to its most specific template (a literal segment beats a parameter at
the first place they differ, as OpenAPI matches paths), and that template's methods, over all its routes, are the
path's: another method is a 405 with the complete `Allow`, `OPTIONS` is a 204 with it (a route that answers
`OPTIONS` itself, the signup form's CORS preflight, still does, with `Allow` added).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from fastapi.routing import iter_route_contexts
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import AppError
from app.middleware import send_problem

__all__ = ["MethodGate", "MethodNotAllowed", "PathTemplates"]

_METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


class MethodNotAllowed(AppError):
    status, slug, title = 405, "method-not-allowed", "Method not allowed"


@dataclass(frozen=True, slots=True)
class _Template:
    regex: re.Pattern[str]
    specificity: tuple[int, ...]  # per segment: 0 literal, 1 parameter (smaller is more specific)
    methods: frozenset[str]
    allow: str  # the `Allow` header: these methods and OPTIONS
    options_route: bool  # a route answers OPTIONS itself


class PathTemplates:
    """The app's path templates and the methods each serves, built once from its routes."""

    def __init__(self, routes: Iterable[BaseRoute]) -> None:
        grouped: dict[str, tuple[re.Pattern[str], set[str]]] = {}
        for context in iter_route_contexts(list(routes)):
            methods, path_format = context.methods, context.path_format
            if not methods or not path_format:  # mounts (static files) keep their own answers
                continue
            grouped.setdefault(path_format, (context.path_regex, set()))[1].update(methods)
        self._templates = sorted((
            _Template(regex, tuple(int(s.startswith("{")) for s in path_format.split("/")),
                      frozenset(methods), _allow(methods), "OPTIONS" in methods)
            for path_format, (regex, methods) in grouped.items()), key=lambda t: t.specificity)
        # One alternation, most specific first: the first alternative that matches is the one (a single C-level
        # match per request, not one per route).
        self._any = re.compile("|".join(f"(?P<t{i}>{_bare(t.regex)})" for i, t in enumerate(self._templates)))

    def match(self, path: str) -> _Template | None:
        """The most specific template of `path`, None when no route serves it (a 404)."""
        found = self._any.fullmatch(path)
        return self._templates[int(found.lastgroup[1:])] if found and found.lastgroup else None


class MethodGate:
    """405 and `OPTIONS` answers with the path's complete `Allow`, ahead of routing (pure ASGI)."""

    def __init__(self, app: ASGIApp, *, routes: Iterable[BaseRoute]) -> None:
        self.app = app
        self.routes = routes
        self._templates: PathTemplates | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._templates is None:  # built on the first request: every route is registered by then
            self._templates = PathTemplates(self.routes)
        template = self._templates.match(_route_path(scope))
        method = scope["method"]
        if template is None or (method in template.methods and method != "OPTIONS"):
            await self.app(scope, receive, send)
        elif method == "OPTIONS" and template.options_route:
            await self.app(scope, receive, _with_allow(send, template.allow))
        elif method == "OPTIONS":
            await send({"type": "http.response.start", "status": 204,
                        "headers": [(b"allow", template.allow.encode())]})
            await send({"type": "http.response.body", "body": b""})
        else:
            error = MethodNotAllowed(f"{method} is not served here; this path serves {template.allow}")
            error.headers["Allow"] = template.allow
            await send_problem(scope, send, error)


def _bare(regex: re.Pattern[str]) -> str:
    """A route's `^...$` pattern as an alternative: unanchored, its named groups made plain."""
    return re.sub(r"\(\?P<\w+>", "(?:", regex.pattern.removeprefix("^").removesuffix("$"))


def _allow(methods: set[str]) -> str:
    def order(method: str) -> tuple[int, str]:
        return (_METHOD_ORDER.index(method) if method in _METHOD_ORDER else len(_METHOD_ORDER), method)
    return ", ".join(sorted(methods | {"OPTIONS"}, key=order))


def _with_allow(send: Send, allow: str) -> Send:
    async def send_with_allow(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"allow"]
            message["headers"] = [*headers, (b"allow", allow.encode())]
        await send(message)
    return send_with_allow


def _route_path(scope: Scope) -> str:
    """The path the routes see: without the deployment's `root_path` prefix, as Starlette strips it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path
