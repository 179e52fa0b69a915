"""RFC 9457 problem+json rendering and the exception handlers that use it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import (
    MAX_FIELD_ERRORS,
    AppError,
    FieldError,
    InvalidInput,
    ServiceUnavailable,
    UnsupportedMediaType,
)
from app.logging import get_logger, where
from app.timeouts import StatementTimeout, is_statement_timeout

__all__ = [
    "MAX_PROBLEM_BYTES",
    "ProblemResponse",
    "install_problem_handlers",
    "problem_body",
    "problem_fields",
    "unexpected_problem",
    "validation_problem",
]

log = get_logger("carnet.errors")

INTERNAL_DETAIL = "An unexpected error occurred; it has been logged with this request's id."
_CONNECTION_SQLSTATES = ("08", "57P")  # connection exceptions, operator intervention (shutdown)
MAX_PROBLEM_BYTES = 64 * 1024  # an error answer never grows with the request (issue 15, class 2)


class ProblemResponse(Response):
    media_type = "application/problem+json"


def problem_fields(error: AppError, *, instance: str | None = None) -> dict[str, Any]:
    """The RFC 9457 members of an error; `instance` is omitted for a batch item (it has no URL of its own)."""
    fields: dict[str, Any] = {"type": error.type_uri(), "title": error.title, "status": error.status,
                              "detail": error.detail}
    if instance is not None:
        fields["instance"] = instance
    return {**fields, **error.members}


def problem_body(error: AppError, *, instance: str) -> bytes:
    """The JSON body, under MAX_PROBLEM_BYTES: InvalidInput's clipping keeps it there; should a problem still be
    larger (a member no class bounds), its `errors` are shortened until it fits, and counted as more."""
    fields = problem_fields(error, instance=instance)
    body = json.dumps(fields, ensure_ascii=False, default=str).encode()
    errors = list(fields.get("errors") or [])
    while len(body) > MAX_PROBLEM_BYTES and errors:
        dropped = max(1, len(errors) // 2)
        errors = errors[:-dropped]
        fields["errors"] = errors
        fields["more_errors"] = int(fields.get("more_errors") or 0) + dropped
        body = json.dumps(fields, ensure_ascii=False, default=str).encode()
    if len(body) > MAX_PROBLEM_BYTES:  # pragma: no cover (a detail or member of unbounded size: a bug to fix)
        log.error("problem.too_large", problem=error.slug, size=len(body))
        fields = {k: fields[k] for k in ("type", "title", "status", "instance") if k in fields}
        body = json.dumps({**fields, "detail": "the error answer was too large to send"}).encode()
    return body


# Every problem: kept by no cache (a 404 or 410 is cacheable by default, RFC 9111 4.2.2) and sent on as no referrer.
# Its `instance` is the request's path, which for a public link is the credential (docs/api.md "Public links").
_NOT_KEPT = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


def _render(request: Request, error: AppError) -> ProblemResponse:
    headers = {**_NOT_KEPT, **error.headers}
    return ProblemResponse(problem_body(error, instance=request.url.path), status_code=error.status, headers=headers)


_HTTP_SLUGS = {404: ("not-found", "Not found"), 405: ("method-not-allowed", "Method not allowed"),
               400: ("bad-request", "Bad request")}


def _http_problem(exc: StarletteHTTPException) -> AppError:
    if isinstance(exc.__cause__, AppError):  # e.g. PayloadTooLarge raised while FastAPI read the body
        return exc.__cause__
    if exc.status_code == 400 and isinstance(exc.__cause__, ValueError | RecursionError):
        # FastAPI's "error parsing the body" (bytes that are not UTF-8, or JSON nested past the parser's limit):
        # malformed JSON, like json_invalid.
        return InvalidInput.one("body", "the body is not valid JSON (UTF-8), or is nested too deep", "json_invalid")
    slug, title = _HTTP_SLUGS.get(exc.status_code, ("http-error", "HTTP error"))
    cls = type("HttpProblem", (AppError,), {"status": exc.status_code, "slug": slug, "title": title})
    error = cls(str(exc.detail) if exc.detail else title)
    error.headers.update(exc.headers or {})
    return error


def _printable(part: Any) -> str:
    """A location part as printable text: unknown keys are the caller's own, NUL and controls included
    (PostgreSQL's jsonb refuses \\u0000, so a stored idempotent response holding one would fail)."""
    text = str(part)
    return text if text.isprintable() else "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)


def _field(loc: tuple[Any, ...]) -> str:
    parts = [_printable(p) for p in loc]
    if parts and parts[0] in {"body", "query", "path", "header", "cookie"}:
        parts = parts[1:]
    return ".".join(parts) or "body"


def validation_problem(raw_errors: Sequence[Any], *, prefix: tuple[str, ...] = (),
                       limit: int = MAX_FIELD_ERRORS) -> InvalidInput:
    """pydantic/FastAPI validation errors as one 422 naming each field (under `prefix`: a nested document); the
    first `limit` only, the others counted ("and 1,234 more")."""
    errors = []
    for err in raw_errors[:limit]:
        message = str(err.get("msg", "invalid value"))
        if message.startswith("Value error, "):
            message = message[len("Value error, "):]
        code = str(err.get("type", "invalid"))
        if code == "extra_forbidden":
            message = "unknown field"
        field = "body" if code == "json_invalid" else _field((*prefix, *err.get("loc", ())))  # loc: a char offset
        errors.append(FieldError(field, message, code))
    return InvalidInput(*errors, more=max(0, len(raw_errors) - limit), limit=limit)


def _media_type_problem(request: Request, raw_errors: Sequence[Any]) -> UnsupportedMediaType | None:
    """FastAPI parses a body as JSON only when Content-Type says JSON; otherwise the whole body fails validation
    ("Input should be a valid dictionary"), which hides the real mistake. Name the header instead."""
    if not any(tuple(e.get("loc", ())) == ("body",) and e.get("type") != "missing" for e in raw_errors):
        return None
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";")[0].strip().lower()
    if media_type.startswith("application/") and (media_type == "application/json" or media_type.endswith("+json")):
        return None  # it was JSON: a real validation error about the body's shape
    had = f"Content-Type {_printable(content_type[:80])!r}" if content_type.strip() else "no Content-Type"
    message = f"this route reads a JSON body: send it with `Content-Type: application/json` (the request had {had})"
    return UnsupportedMediaType(message, errors=[
        FieldError("Content-Type", message, "missing" if not content_type.strip() else "unsupported")])


def _is_connection_problem(exc: BaseException) -> bool:
    if isinstance(exc, PoolTimeout | InterfaceError | ConnectionError | OSError | asyncio.TimeoutError):
        return True
    if isinstance(exc, OperationalError | DBAPIError):
        if exc.connection_invalidated:
            return True
        state = getattr(exc.orig, "sqlstate", None) or ""
        return state.startswith(_CONNECTION_SQLSTATES)
    return False


def unexpected_problem(exc: Exception) -> AppError:
    """A 503 when the database is out of reach or stopped a statement at its timeout, else a logged 500."""
    if is_statement_timeout(exc):  # the interactive default (costly reads say their own limit: app.timeouts.within)
        log.warning("database.statement_timeout")
        return StatementTimeout("it ran past the statement timeout of interactive requests; retry later")
    if _is_connection_problem(exc):
        log.warning("database.unavailable", error=type(exc).__name__)
        error = ServiceUnavailable("the database cannot be reached; retry shortly")
        error.headers["Retry-After"] = "2"
        return error
    log.error("request.crashed", **where(exc))
    return AppError(INTERNAL_DETAIL)


def install_problem_handlers(app: FastAPI) -> None:
    """Expected errors; unexpected ones are answered by RequestContext (so no server logs their text)."""
    async def app_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, AppError)
        if exc.status >= 500:  # a 503 sheds load on purpose (busy, timeout): worth a look, not a page
            (log.warning if isinstance(exc, ServiceUnavailable) else log.error)("request.failed", problem=exc.slug)
        return _render(request, exc)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return _render(request, _media_type_problem(request, exc.errors()) or validation_problem(exc.errors()))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return _render(request, _http_problem(exc))

    app.add_exception_handler(AppError, app_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)

