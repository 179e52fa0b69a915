"""What the current request reaches of personal data, for the access journal (app.journal writes it down).

A request handled under `JournalReads` has an `Access` in a context variable. The presenters that put personal
data in the clear into an answer call `reveal(contact_id)` (one place per kind of record, so a new route that
presents contacts is journaled without a word of its own); routes that answer something else personal
(an export, a reject report) `describe` it. Outside a request (worker, CLI) there is no Access and both are no-ops.
"""

from __future__ import annotations

import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from app.errors import ServiceUnavailable

__all__ = ["Access", "JournalUnavailable", "count_rows", "count_streamed", "current", "describe", "note", "reveal",
           "route"]


class JournalUnavailable(ServiceUnavailable):
    """The journal cannot take another entry (its buffer is full: the database is away): fail closed, since
    an access nobody could account for is what the journal exists to prevent."""

    slug, title = "journal-unavailable", "Personal data cannot be served while the access journal is unavailable"


@dataclass(slots=True)
class Access:
    request_id: str | None
    client_addr: str | None
    scope: dict[str, Any] = field(default_factory=dict, repr=False)  # the ASGI scope: method, matched route
    refused: bool = False                # the journal is full: revealing anything would go unrecorded
    refs: dict[str, None] = field(default_factory=dict)   # contact ids reached, in order, once each
    action: str | None = None            # set by `describe`; else derived from the route
    kind: str = "read"
    detail: dict[str, Any] | None = None
    rows: int | None = None              # rows streamed (exports), when counted
    streamed: int = 0                    # lines sent so far: what a stream cut short gave out, at most


_current: ContextVar[Access | None] = ContextVar("carnet_access", default=None)


def current() -> Access | None:
    return _current.get()


def begin(access: Access) -> Any:
    return _current.set(access)


def end(token: Any) -> None:
    _current.reset(token)


def _open() -> Access | None:
    access = _current.get()
    if access is not None and access.refused:
        raise JournalUnavailable("the access journal cannot record this access right now; retry shortly")
    return access


def reveal(*contact_ids: uuid.UUID | str) -> None:
    """These contacts' personal data goes out in the clear in this answer."""
    access = _open()
    if access is not None:
        for contact_id in contact_ids:
            access.refs[str(contact_id)] = None


def describe(action: str, *, kind: str = "read", **detail: Any) -> None:
    """Name what this answer reaches when it is not (only) contacts: an export, a reject report."""
    access = _open()
    if access is not None:
        access.action, access.kind, access.detail = action, kind, detail or None


def note(**detail: Any) -> None:
    """Add to what the entry says of this answer (a page's filter, a format); never personal data in clear."""
    access = _current.get()
    if access is not None:
        access.detail = {**(access.detail or {}), **detail}


def route(access: Access) -> str | None:
    """`GET /v1/contacts/{contact_id}`: the method and the route template, never the raw path."""
    template = getattr(access.scope.get("route"), "path", None)
    if not template:
        return None
    # A route of an included router knows its path below the prefix (`/contacts/{contact_id}`): the prefix is
    # what the request's path has in front of as many segments.
    segments = access.scope.get("path", "").split("/")
    prefix = "/".join(segments[: len(segments) - len(template.split("/")) + 1])
    return f"{access.scope.get('method')} {prefix}{template}"


def count_rows(rows: int) -> None:
    access = _current.get()
    if access is not None:
        access.rows = (access.rows or 0) + rows


def count_streamed(lines: int) -> None:
    """Lines about to go out: if the stream is cut short before `count_rows` is told the total, the entry says
    this many (a CSV cell holding a line break counts twice: at most, never fewer than the client got)."""
    access = _current.get()
    if access is not None:
        access.streamed += lines
