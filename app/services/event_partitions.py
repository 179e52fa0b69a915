"""The monthly partitions of `event`: made ahead, split out of the default partition, dropped after retention.

`event` is partitioned by range of `occurred_at`, one partition per calendar month (UTC), named
`event_yYYYYmMM`, plus `event_default`, which takes any event whose month has no partition yet (late,
back-dated, or far in the future): an insert never fails for want of a partition, and no request ever runs DDL.
The worker's `EventPartitionUpkeep` then, once an hour:

- makes the partitions of this month and the next `AHEAD_MONTHS` (moving any row the default holds for them);
- splits out of the default every month it holds rows for inside the kept window (retention .. ahead);
- drops the partitions older than `EVENT_RETENTION_MONTHS` whole, with their dedupe keys (`event_key`), and
  deletes the default's rows (and keys) that old.

Partition DDL takes strong locks (ATTACH: SHARE ROW EXCLUSIVE on `contact` for the foreign key and ACCESS
EXCLUSIVE on the default partition; DROP: ACCESS EXCLUSIVE on `event`). Each step is its own short transaction
under `lock_timeout`: when readers or writers hold the table, the step gives way and is tried next round.
docs/operations.md ("Event partitions") tells the operator's side.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.logging import get_logger
from app.models.base import utc_now
from app.settings import Settings

__all__ = [
    "AHEAD_MONTHS",
    "PARTITION_NAME",
    "EventPartitionUpkeep",
    "Months",
    "add_months",
    "ensure_month",
    "month_of",
    "partition_name",
    "partitions",
    "run_upkeep",
]

log = get_logger("carnet.events")
AHEAD_MONTHS = 3
PARTITION_NAME = re.compile(r"event_(y(\d{4})m(\d{2})|default)")
_LOCK_TIMEOUT = "2s"  # a DDL step waiting longer gives way (it would queue every reader and writer behind it)
_UPKEEP_LOCK = 0x6576656E7473  # "events": one upkeep at a time across workers
_DEFERRED = object()


def month_of(moment: datetime) -> date:
    """The first day of the UTC month holding `moment`."""
    utc = moment.astimezone(UTC)
    return date(utc.year, utc.month, 1)


def add_months(month: date, count: int) -> date:
    index = month.year * 12 + month.month - 1 + count
    return date(index // 12, index % 12 + 1, 1)


def partition_name(month: date) -> str:
    return f"event_y{month.year:04d}m{month.month:02d}"


def _bounds(month: date) -> dict[str, datetime]:
    start = datetime(month.year, month.month, 1, tzinfo=UTC)
    following = add_months(month, 1)
    return {"lo": start, "hi": datetime(following.year, following.month, 1, tzinfo=UTC)}


@dataclass(frozen=True, slots=True)
class Months:
    """The window the upkeep keeps partitioned: `oldest` (retention cutoff) up to `newest` (ahead), inclusive."""

    oldest: date
    newest: date

    @classmethod
    def around(cls, now: datetime, *, retention_months: int) -> Months:
        current = month_of(now)
        return cls(add_months(current, -retention_months), add_months(current, AHEAD_MONTHS))

    def ahead(self) -> list[date]:
        """This month and the next AHEAD_MONTHS."""
        return [add_months(self.newest, -i) for i in range(AHEAD_MONTHS, -1, -1)]


async def partitions(session: AsyncSession) -> list[date]:
    """The months that have a partition, oldest first."""
    names = await session.scalars(text(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'event'::regclass"))
    found = [PARTITION_NAME.fullmatch(n) for n in names]
    return sorted(date(int(m[2]), int(m[3]), 1) for m in found if m is not None and m[2] is not None)


async def ensure_month(session: AsyncSession, month: date) -> bool:
    """Give `month` its partition (in the caller's transaction), moving the default's rows for it; False if it
    already had one. The caller holds the upkeep lock (`run_upkeep`), so two workers never race here."""
    if month in await partitions(session):
        return False
    name, bounds = partition_name(month), _bounds(month)
    await session.execute(text(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'"))
    await session.execute(text(f"CREATE TABLE {name} (LIKE event INCLUDING DEFAULTS)"))
    # Nothing may land in the default for this month between the move and the ATTACH (which checks it holds none).
    await session.execute(text("LOCK TABLE event_default IN ACCESS EXCLUSIVE MODE"))
    move = ("WITH moved AS (DELETE FROM event_default WHERE occurred_at >= :lo AND occurred_at < :hi RETURNING *) "  # noqa: S608
            f"INSERT INTO {name} SELECT * FROM moved")  # name: partition_name's digits
    await session.execute(text(move), bounds)
    await session.execute(text(
        f"ALTER TABLE event ATTACH PARTITION {name} "
        f"FOR VALUES FROM ('{bounds['lo'].isoformat()}') TO ('{bounds['hi'].isoformat()}')"))
    return True


async def _drop_month(session: AsyncSession, month: date) -> None:
    """Drop a month's partition whole, and its dedupe keys (a key lives in its event's month)."""
    name = partition_name(month)
    await session.execute(text(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'"))
    await session.execute(text(f"DELETE FROM event_key k USING {name} e WHERE k.event_id = e.event_id"))  # noqa: S608
    await session.execute(text(f"DROP TABLE {name}"))


async def _purge_default(session: AsyncSession, cutoff: datetime) -> int:
    """Delete the default partition's events older than the cutoff (back-dated beyond retention), and their keys."""
    result = await session.execute(text("""
        WITH gone AS (DELETE FROM event_default WHERE occurred_at < :cutoff RETURNING event_id)
        DELETE FROM event_key k USING gone WHERE k.event_id = gone.event_id
    """), {"cutoff": cutoff})
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


async def _default_months(session: AsyncSession, window: Months) -> list[date]:
    """The months the default partition holds rows for, inside the kept window."""
    lo, hi = _bounds(window.oldest)["lo"], _bounds(window.newest)["hi"]
    moments = await session.scalars(text(
        "SELECT DISTINCT date_trunc('month', occurred_at, 'UTC') FROM event_default "
        "WHERE occurred_at >= :lo AND occurred_at < :hi"), {"lo": lo, "hi": hi})
    return sorted({month_of(m) for m in moments})


async def run_upkeep(sessions: async_sessionmaker[AsyncSession], *, retention_months: int,
                     now: datetime | None = None) -> dict[str, Any]:
    """One round: make, split, drop. Each step commits alone; a step that cannot get its locks is left for the
    next round (reported in `deferred`)."""
    window = Months.around(now or utc_now(), retention_months=retention_months)
    report: dict[str, Any] = {"created": [], "dropped": [], "purged": 0, "deferred": []}

    async def step(kind: str, month: date | None, action: Any) -> Any:
        try:
            async with sessions.begin() as session:
                await session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _UPKEEP_LOCK})
                return await action(session)
        except DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) != "55P03":  # lock_not_available: busy table, next round
                raise
            report["deferred"].append(f"{kind} {month or ''}".strip())
            return _DEFERRED

    async with sessions() as session:
        wanted = set(window.ahead()) | set(await _default_months(session, window))
        existing = await partitions(session)
    for month in sorted(wanted - set(existing)):
        if await step("create", month, lambda s, m=month: ensure_month(s, m)):
            report["created"].append(partition_name(month))
    for month in (m for m in existing if m < window.oldest):
        if await step("drop", month, lambda s, m=month: _drop_month(s, m)) is not _DEFERRED:
            report["dropped"].append(partition_name(month))
    purged = await step("purge", None, lambda s: _purge_default(s, _bounds(window.oldest)["lo"]))
    report["purged"] = 0 if purged is _DEFERRED else purged
    return report


class EventPartitionUpkeep:
    """Worker job: `run_upkeep` once every `every_seconds` (and at the worker's start)."""

    def __init__(self, *, every_seconds: float = 3600.0) -> None:
        self.every_seconds = every_seconds
        self._next = 0.0

    async def __call__(self, sessions: async_sessionmaker[AsyncSession], settings: Settings) -> bool:
        if time.monotonic() < self._next:
            return False
        self._next = time.monotonic() + self.every_seconds
        report = await run_upkeep(sessions, retention_months=settings.event_retention_months)
        if report["created"] or report["dropped"] or report["purged"] or report["deferred"]:
            log.info("events.partitions", **report)
        return False
