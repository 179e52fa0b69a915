"""structlog configuration: JSON lines with request_id; events are dotted names with ids, never personal data."""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Any

import structlog

__all__ = ["configure_logging", "get_logger", "where"]

get_logger = structlog.stdlib.get_logger


def where(exc: BaseException) -> dict[str, Any]:
    """Where an unexpected error happened, never what it says: a message may quote personal data (a driver's
    "Key (email)=(...) already exists", a statement's parameters). Groups list their leaves' types."""
    fields: dict[str, Any] = {
        "error": type(exc).__name__,
        "frames": [f"{f.filename}:{f.lineno} {f.name}" for f in traceback.extract_tb(exc.__traceback__)],
    }
    if isinstance(exc, BaseExceptionGroup):
        fields["errors"] = [type(e).__name__ for e in exc.exceptions]
    sqlstate = _sqlstate(exc)
    if sqlstate:  # a code, never text: tells a deadlock (40P01) from a foreign-key violation (23503)
        fields["sqlstate"] = sqlstate
    return fields


def _sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a database error (asyncpg's, possibly wrapped by SQLAlchemy), else None."""
    for candidate in (exc, getattr(exc, "orig", None), getattr(getattr(exc, "orig", None), "__cause__", None)):
        state = getattr(candidate, "sqlstate", None)
        if isinstance(state, str):
            return state
    return None


def configure_logging(*, json: bool = True, level: str = "INFO") -> None:
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        # filter first: a disabled level costs nothing more than this check
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    handler.set_name("carnet")
    root = logging.getLogger()
    # Replace our own handler only: others (a test's log capture, an APM agent) stay.
    root.handlers[:] = [h for h in root.handlers if h.get_name() != "carnet"] + [handler]
    root.setLevel(level.upper())
    # uvicorn's access log prints full URLs (query strings may hold emails): ours logs the route instead.
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("httpx").setLevel(logging.WARNING)  # logs full URLs at INFO
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
