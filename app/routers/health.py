"""Liveness, readiness and Prometheus metrics (outside /v1, no token)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from sqlalchemy import text

from app.errors import ServiceUnavailable, problems
from app.migrations import schema_state
from app.routers.deps import JSONBody
from app.schemas.workers import WorkersSeen
from app.services import workers as workers_service

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


class Readiness(BaseModel):
    status: Literal["ready"]
    schema_: str = Field(alias="schema", description="The database's migration revision")
    workers: WorkersSeen = Field(description="Worker processes (imports, deliveries); not part of readiness: the "
                                 "API serves without them, but queued work waits for one")


@router.get("/readyz", response_model=Readiness, responses=problems(ServiceUnavailable))
async def readyz(request: Request) -> Any:
    """The database answers and its schema is at this code's migration head (or ahead: a rolling upgrade); also
    says which workers were heard from."""
    makers = request.app.state.sessionmaker
    expected = request.app.state.schema_head
    try:
        async with makers() as session:
            # No such table: a database no `carnet migrate` ever ran on (not an unreachable one).
            exists = await session.scalar(text("SELECT to_regclass('alembic_version') IS NOT NULL"))
            current = await session.scalar(text("SELECT version_num FROM alembic_version")) if exists else None
            if current != expected and schema_state(current) == "behind":
                found = current or "nothing (no migration ran)"
                raise ServiceUnavailable(f"schema at {found}, code expects {expected}: run `carnet migrate`")
            workers = await workers_service.presence(session)
    except ServiceUnavailable:
        raise
    except Exception as exc:
        raise ServiceUnavailable("the database cannot be reached") from exc
    return JSONBody({"status": "ready", "schema": current, "workers": workers})


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
