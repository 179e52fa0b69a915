"""Worker processes as the database knows them, from the heartbeats each one writes while it runs (app.worker)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

__all__ = ["LIVE_SECONDS", "presence"]

LIVE_SECONDS = 10.0  # a worker not heard from for this long no longer counts (it beats every 2 s)

_PRESENCE = text("""
SELECT count(*) FILTER (WHERE seen_at > now() - make_interval(secs => :live)) AS live, max(seen_at) AS last_seen_at
FROM worker_heartbeat
""")


async def presence(session: AsyncSession) -> dict[str, Any]:
    """`{live, last_seen_at}`: workers heard from in the last LIVE_SECONDS, and the newest heartbeat of any (a
    worker that stops cleanly signs off, so this is about the running ones and the ones that died)."""
    row = (await session.execute(_PRESENCE, {"live": LIVE_SECONDS})).mappings().one()
    return {"live": int(row["live"]), "last_seen_at": row["last_seen_at"]}
