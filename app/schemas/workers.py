"""What the API says about the worker processes (`carnet worker`, or the one inside `carnet serve`)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

__all__ = ["WorkersSeen"]


class WorkersSeen(BaseModel):
    live: int = Field(ge=0, description="Worker processes heard from in the last 10 seconds")
    last_seen_at: datetime | None = Field(
        description="The newest heartbeat of any worker; null: none heard from since the last one stopped cleanly")
