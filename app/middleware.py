"""Pure ASGI middleware: request context + access log + metrics, and the body size limit."""

from __future__ import annotations

import logging
import os
import re
import time
import traceback
from collections.abc import Iterable, Mapping
from typing import Any

import structlog
from fastapi.routing import iter_route_contexts
from prometheus_client import Counter, Histogram
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import AppError, PayloadTooLarge
from app.logging import get_logger
from app.problems import problem_body, unexpected_problem

__all__ = ["BodySizeLimit", "RequestContext", "declared_within", "send_problem"]

log = get_logger("carnet.http")

REQUEST_SECONDS = Histogram(
    "carnet_http_request_duration_seconds",
    "HTTP request latency by route template",
    ["method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
REQUESTS_TOTAL = Counter("carnet_http_requests_total", "HTTP requests by status class", ["status_class"])
_SERIES_CACHED = 1024  # (method, route, status) series whose metric children are kept
_series: dict[tuple[str, str, int], tuple[Any, Any]] = {}


class RequestContext:
    """Binds request_id (incoming X-Request-ID or new) to the log context and answers it back."""

    def __init__(self, app: ASGIApp, *, routes: Iterable[BaseRoute] = ()) -> None:
        self.app = app
        # Each route's template as the client calls it: FastAPI puts in scope["route"] the route of the included
        # router, whose path lacks the prefixes it was included under (`/contacts/{contact_id}`, not `/v1/...`).
        self._templates = {id(c.original_route): c.path_format for c in iter_route_contexts(list(routes))}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_request_id(scope) or _new_request_id()
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500
        started_response = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                status, started_response = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            # Answered here, not re-raised: the server would log the exception's text (personal data risk).
            if started_response:
                log.error("response.interrupted", error=type(exc).__name__)
            else:
                await send_problem(scope, send_with_id, unexpected_problem(exc))
        finally:
            elapsed = time.perf_counter() - started
            route = _route_template(scope, self._templates)
            seconds, requests = _metrics(scope["method"], route, status)
            seconds.observe(elapsed)
            requests.inc()
            # The route template, never the raw path or query string: those may carry personal data.
            # Successes at debug (the latency histogram counts them all); problems at info. The level is asked first
            # as structlog's filter_by_level asks it: a dropped event is not built.
            if status >= 400 or _http_log.isEnabledFor(logging.DEBUG):
                emit = log.debug if status < 400 else log.info
                emit("http.request", method=scope["method"], route=route, status=status, ms=round(elapsed * 1000, 2))


class BodySizeLimit:
    """Refuses bodies over `max_bytes` by Content-Length at once, and while streaming otherwise."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, uploads: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.uploads = uploads or {}  # POST path → its own cap (file uploads: POST /v1/imports)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload_cap = self.uploads.get(scope["path"]) if scope["method"] == "POST" else None
        if upload_cap is not None:
            await BodySizeLimit(self.app, max_bytes=upload_cap)(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and not declared_within(declared, self.max_bytes):
            await send_problem(scope, send, PayloadTooLarge(f"the body limit is {self.max_bytes} bytes"))
            return
        received = 0
        refused: list[PayloadTooLarge] = []

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused.append(PayloadTooLarge(f"the body limit is {self.max_bytes} bytes"))
                    raise refused[-1]
            return message

        try:
            await self.app(scope, limited_receive, send)
        finally:
            for error in refused:
                # The app buffered up to max_bytes before the refusal; that buffer hangs on the frames of this
                # error's traceback, kept in a reference cycle (FastAPI raises its 400 `from` it) until the next
                # full GC. Free it now: else each oversized chunked body held ~max_bytes (tests/test_body_limits.py).
                traceback.clear_frames(error.__traceback__)


async def send_problem(scope: Scope, send: Send, error: AppError) -> None:
    body = problem_body(error, instance=scope.get("path", ""))
    headers = [(b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


_DIGITS = re.compile(r"[0-9]{1,18}")


def declared_within(declared: str, max_bytes: int) -> bool:
    """A Content-Length that BodySizeLimit lets through."""
    # ASCII digits, and few of them, before int(): str.isdigit() takes "²", int() refuses 4,300+ digits (500s)
    return bool(_DIGITS.fullmatch(declared)) and int(declared) <= max_bytes


_http_log = logging.getLogger("carnet.http")  # the stdlib logger under `log`, whose level structlog filters by
# uuid.uuid4().hex without building a UUID: 122 random bits, the version (4) and variant (10) bits set
_UUID4_CLEAR, _UUID4_SET = ~((0xF000 << 64) | (0xC000 << 48)), (0x4000 << 64) | (0x8000 << 48)


def _new_request_id() -> str:
    return f"{int.from_bytes(os.urandom(16)) & _UUID4_CLEAR | _UUID4_SET:032x}"


# The methods Carnet serves (and HEAD, OPTIONS); any other is the label `other`: the method is the client's, and each
# new label value is another 15 series in every scrape, for as long as the process lives.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _metrics(method: str, route: str, status: int) -> tuple[Any, Any]:
    """The histogram and counter children of this series (`labels()` costs a lock and a lookup every call)."""
    if method not in _METHODS:
        method = "other"
    children = _series.get((method, route, status))
    if children is None:
        children = REQUEST_SECONDS.labels(method, route, str(status)), REQUESTS_TOTAL.labels(f"{status // 100}xx")
        if len(_series) < _SERIES_CACHED:
            _series[method, route, status] = children
    return children


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _incoming_request_id(scope: Scope) -> str | None:
    value = _header(scope, b"x-request-id")
    if value and len(value) <= 64 and value.replace("-", "").isalnum():
        return value
    return None


def _route_template(scope: dict[str, Any], templates: Mapping[int, str]) -> str:
    """The metrics' and log's `route`: a template of the app's (a bounded set), or `unmatched`."""
    route = scope.get("route")
    path = templates.get(id(route)) or getattr(route, "path", None)
    return str(path) if path else "unmatched"
