"""Errors the API reports on purpose, each rendered as RFC 9457 problem+json.

AppError
 ├── BadRequest (400)
 ├── Unauthenticated (401, WWW-Authenticate)
 ├── MissingScope (403)
 ├── NotFound (404) ── ContactNotFound, AttributeNotFound, TagNotFound
 ├── Conflict (409) ── DuplicateContact, DuplicateAttribute, AttributeInUse
 ├── PayloadTooLarge (413)
 ├── UnsupportedMediaType (415)
 ├── PreconditionFailed (412)
 ├── InvalidInput (422, errors[{field, message, code}]) ── IdempotencyKeyReused
 ├── RateLimited (429, Retry-After)
 └── ServiceUnavailable (503, Retry-After)
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "MAX_FIELD_ERRORS",
    "AppError",
    "AttributeInUse",
    "AttributeNotFound",
    "BadRequest",
    "Conflict",
    "ContactNotFound",
    "DuplicateAttribute",
    "DuplicateContact",
    "FieldError",
    "IdempotencyKeyReused",
    "InvalidInput",
    "MissingScope",
    "NotFound",
    "PayloadTooLarge",
    "PreconditionFailed",
    "RateLimited",
    "ServiceUnavailable",
    "TagNotFound",
    "Unauthenticated",
    "UnsupportedMediaType",
    "clip",
    "problems",
]

PROBLEM_BASE = "https://carnet.dev/problems/"


class AppError(Exception):
    status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str | None = None, /, **members: Any) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.members = members
        self.headers: dict[str, str] = {}

    @classmethod
    def type_uri(cls) -> str:
        return PROBLEM_BASE + cls.slug


class BadRequest(AppError):
    status, slug, title = 400, "bad-request", "Bad request"


class Unauthenticated(AppError):
    status, slug, title = 401, "unauthenticated", "Missing, invalid, expired or revoked token"

    def __init__(self, detail: str | None = None, /, **members: Any) -> None:
        super().__init__(detail, **members)
        self.headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'


class MissingScope(AppError):
    status, slug, title = 403, "missing-scope", "The token lacks a required scope"


class NotFound(AppError):
    status, slug, title = 404, "not-found", "Not found"


class ContactNotFound(NotFound):
    slug, title = "contact-not-found", "No such contact"


class AttributeNotFound(NotFound):
    slug, title = "attribute-not-found", "No such attribute definition"


class TagNotFound(NotFound):
    slug, title = "tag-not-found", "No such tag"


class Conflict(AppError):
    status, slug, title = 409, "conflict", "Conflict"


class DuplicateContact(Conflict):
    slug, title = "duplicate-contact", "A contact already holds this email or external_id"


class DuplicateAttribute(Conflict):
    slug, title = "duplicate-attribute", "An attribute with this name already exists"


class AttributeInUse(Conflict):
    slug, title = "attribute-in-use", "Contacts still hold a value for this attribute"


class PreconditionFailed(AppError):
    status, slug, title = 412, "precondition-failed", "The resource changed since the given ETag"


class PayloadTooLarge(AppError):
    status, slug, title = 413, "payload-too-large", "The request body is too large"


class UnsupportedMediaType(AppError):
    status, slug, title = 415, "unsupported-media-type", "The body's Content-Type is not one this route reads"


# An error answer stays small whatever the request held (issue 15, class 2): at most MAX_FIELD_ERRORS entries, each
# field and message clipped, the rest counted in `more_errors` and said in `detail` ("and 1,234 more").
# 50 entries of at most ~800 bytes: under 64 KB (the renderer checks it too: app.problems.problem_body).
MAX_FIELD_ERRORS = 50
MAX_FIELD_CHARS = 200
MAX_MESSAGE_CHARS = 500


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


class FieldError(dict[str, str]):
    """One entry of a 422's `errors` array (its texts clipped: a field path may hold a caller's key)."""

    def __init__(self, field: str, message: str, code: str = "invalid") -> None:
        super().__init__(field=clip(field, MAX_FIELD_CHARS), message=clip(message, MAX_MESSAGE_CHARS),
                         code=clip(code, 64))


class InvalidInput(AppError):
    status, slug, title = 422, "invalid-input", "The request is not valid"

    def __init__(self, *errors: FieldError, detail: str | None = None, more: int = 0,
                 limit: int = MAX_FIELD_ERRORS) -> None:
        """`more`: errors found beyond `errors` that the caller did not even build (validation_problem)."""
        shown = list(errors[:limit])
        more += len(errors) - len(shown)
        first = shown[0] if shown else None
        super().__init__(detail or (f"{first['field']}: {first['message']}" if first else None))
        self.members["errors"] = shown
        if more:
            self.detail += f"; and {more:,} more {'error' if more == 1 else 'errors'} not listed"
            self.members["more_errors"] = more

    @classmethod
    def one(cls, field: str, message: str, code: str = "invalid") -> InvalidInput:
        return cls(FieldError(field, message, code))


class IdempotencyKeyReused(InvalidInput):
    slug, title = "idempotency-key-reused", "This Idempotency-Key was used with another request"


class RateLimited(AppError):
    status, slug, title = 429, "rate-limited", "Too many requests"

    def __init__(self, retry_after: int, /) -> None:
        super().__init__(f"retry after {retry_after} s")
        self.headers["Retry-After"] = str(retry_after)


class ServiceUnavailable(AppError):
    status, slug, title = 503, "service-unavailable", "The service is temporarily unavailable"

    def __init__(self, detail: str | None = None, /, *, retry_after: int = 2, **members: Any) -> None:
        super().__init__(detail, **members)
        self.headers["Retry-After"] = str(retry_after)  # every 503 says when to retry (the outage drill checks it)


def problems(*classes: type[AppError]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` documenting the problems a route may answer, from the classes themselves."""
    out: dict[int | str, dict[str, Any]] = {}
    for cls in classes:
        entry = out.setdefault(
            cls.status,
            {"description": cls.title, "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}},
        )
        if cls.title not in entry["description"]:
            entry["description"] += f"; {cls.title}"
    return out
