"""Liveness, readiness and Prometheus metrics (outside /v1, no token)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.errors import ServiceUnavailable, problems
from app.migrations import schema_state
from app.routers.deps import JSONBody

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", responses=problems(ServiceUnavailable))
async def readyz(request: Request) -> Any:
    """The database answers and its schema is at this code's migration head (or ahead: a rolling upgrade)."""
    makers = request.app.state.sessionmaker
    expected = request.app.state.schema_head
    try:
        async with makers() as session:
            current = await session.scalar(text("SELECT version_num FROM alembic_version"))
    except Exception as exc:
        raise ServiceUnavailable("the database cannot be reached") from exc
    if current != expected and schema_state(current) == "behind":
        raise ServiceUnavailable(f"schema at {current}, code expects {expected}: run `carnet migrate`")
    return JSONBody({"status": "ready", "schema": current})


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
