"""Outbox retention: delivered outbox messages and deliveries are purged `OUTBOX_KEEP_DELIVERED_HOURS` after
delivery, so the two tables hold what is still owed plus a bounded window of history (docs/sync.md "Retention").

What is never purged:
- a delivery that is not `delivered` (pending, in flight, dead until an operator retries it);
- an outbox message not dispatched yet, or that any such delivery refers to (`message_id`): a webhook event's
  body and a merge's `address_retired` are read from it at send time, and a webhook's `webhook-id` (its
  dedupe key) is the message id, the same on every retry.
Per-contact order (head of line) and the erasure rule "any delivery at all for them" only look at deliveries
still pending or in flight, and every delivered push has written its `sync_link` in the transaction that
marked it delivered: history older than the window serves none of them.

Why it is safe beside running deliveries: a delivery never goes back from `delivered`, and no transaction
makes a pending delivery refer to a message dispatched before it (a coalesced push only moves to the newer
message being dispatched with it, a reschedule only to the message of the pending row it absorbs). So a
message every delivery of which was delivered, in the purge's snapshot, is needed by nothing, now or later.

The job works in batches (each its own short transaction, `SKIP LOCKED` on deliveries: nothing waits on it);
messages are walked by id from a cursor kept for one sweep, so the few held by dead letters are passed once.

Bytes: a purged row's space is reusable only once vacuumed. Both tables churn (a delivery is written three
times: pending, in flight, delivered), and autovacuum may lag them or be off, so after each sweep the job
vacuums a table whose dead rows passed autovacuum's own default threshold (`VACUUM (SKIP_LOCKED, TRUNCATE
false)`: never waits for a lock, and never takes the exclusive one that giving pages back to the system needs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from prometheus_client import Counter
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.logging import get_logger
from app.models.base import utc_now
from app.settings import Settings

__all__ = ["OutboxRetention", "purge_deliveries", "purge_messages"]

log = get_logger("carnet.outbox")
PURGED = Counter("carnet_outbox_purged_total", "Delivered outbox messages and deliveries purged", ["table"])

# Deletes by primary key from an array (`= ANY`), whatever plan a prepared statement settles on: a join with the
# subquery could become a scan of the whole table per row under a generic plan.
_PURGE_DELIVERIES = text("""
DELETE FROM delivery
WHERE id = ANY(ARRAY(SELECT id FROM delivery WHERE status = 'delivered' AND delivered_at < :cutoff
                     ORDER BY delivered_at, id LIMIT :limit FOR UPDATE SKIP LOCKED))
  AND status = 'delivered'
""")

# The next `limit` messages after the cursor; those dispatched before the cutoff that no undelivered delivery
# needs go. `all_old`: every scanned message was written before the cutoff (otherwise the rest, written later,
# is too young: the sweep ends there).
_PURGE_MESSAGES = text("""
WITH scanned AS MATERIALIZED (
    SELECT id, dispatched_at < :cutoff AS purgeable, created_at < :cutoff AS old FROM outbox_message
    WHERE id > :after ORDER BY id LIMIT :limit
), gone AS (
    DELETE FROM outbox_message m
    WHERE m.id = ANY(ARRAY(SELECT id FROM scanned WHERE purgeable)) AND m.dispatched_at < :cutoff
      AND NOT EXISTS (SELECT 1 FROM delivery d WHERE d.message_id = m.id AND d.status <> 'delivered')
    RETURNING m.id
)
SELECT (SELECT count(*) FROM gone) AS purged, count(*) AS scanned, coalesce(max(id), :after) AS last,
       coalesce(bool_and(old), false) AS all_old
FROM scanned
""")


async def purge_deliveries(session: AsyncSession, *, cutoff: datetime, limit: int) -> int:
    """Delivered deliveries delivered before `cutoff`, the oldest first, at most `limit`; how many went."""
    return (await session.execute(_PURGE_DELIVERIES, {"cutoff": cutoff, "limit": limit})).rowcount or 0


@dataclass(frozen=True, slots=True)
class MessageBatch:
    purged: int
    last_id: int    # the cursor for the next batch
    more: bool      # a full window of old messages: the next one may hold more


async def purge_messages(session: AsyncSession, *, cutoff: datetime, after: int, limit: int) -> MessageBatch:
    """Of the `limit` messages after id `after`: those dispatched before `cutoff` that no undelivered delivery
    refers to."""
    row = (await session.execute(_PURGE_MESSAGES, {"cutoff": cutoff, "after": after, "limit": limit})).one()
    return MessageBatch(purged=row.purged, last_id=row.last, more=row.scanned == limit and row.all_old)


# autovacuum's defaults (autovacuum_vacuum_threshold, autovacuum_vacuum_scale_factor)
VACUUM_THRESHOLD, VACUUM_SCALE = 50, 0.2


async def vacuum_if_due(sessions: async_sessionmaker[AsyncSession]) -> list[str]:
    """Vacuum each table whose dead rows passed the threshold (a role that does not own it gets PostgreSQL's
    warning and no vacuum: autovacuum does it); which were vacuumed."""
    async with sessions() as session:
        due = list((await session.scalars(text(
            "SELECT relname FROM pg_stat_user_tables WHERE relid IN ('outbox_message'::regclass, 'delivery'::regclass)"
            " AND n_dead_tup > :threshold + :scale * n_live_tup ORDER BY relname"),
            {"threshold": VACUUM_THRESHOLD, "scale": VACUUM_SCALE})).all())
    if due:
        async with sessions() as session:  # VACUUM runs outside a transaction
            connection = await session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
            for table in due:  # names from the fixed list above
                await connection.execute(text(f"VACUUM (SKIP_LOCKED, TRUNCATE false) {table}"))
    return due


class OutboxRetention:
    """A worker job: a sweep every `OUTBOX_PURGE_SECONDS`, one batch of each table per call; True while a sweep has
    more to do now (the worker calls again at once)."""

    def __init__(self, *, batch: int = 5000) -> None:
        self.batch = batch
        self._next_sweep = 0.0
        self._sweeping = False
        self._deliveries_left = self._messages_left = False
        self._after = 0
        self._purged = [0, 0]

    async def __call__(self, sessions: async_sessionmaker[AsyncSession], settings: Settings) -> bool:
        if not self._sweeping:
            if time.monotonic() < self._next_sweep:
                return False
            self._sweeping, self._deliveries_left, self._messages_left, self._after = True, True, True, 0
            self._purged = [0, 0]
        cutoff = utc_now() - timedelta(hours=settings.outbox_keep_delivered_hours)
        if self._deliveries_left:
            async with sessions.begin() as session:
                n = await purge_deliveries(session, cutoff=cutoff, limit=self.batch)
            self._purged[0] += n
            PURGED.labels("delivery").inc(n)
            self._deliveries_left = n == self.batch
        if self._messages_left:
            async with sessions.begin() as session:
                batch = await purge_messages(session, cutoff=cutoff, after=self._after, limit=self.batch)
            self._purged[1] += batch.purged
            PURGED.labels("outbox_message").inc(batch.purged)
            self._after, self._messages_left = batch.last_id, batch.more
        if self._deliveries_left or self._messages_left:
            return True
        self._sweeping = False
        self._next_sweep = time.monotonic() + settings.outbox_purge_seconds
        vacuumed = await vacuum_if_due(sessions)
        if any(self._purged) or vacuumed:
            log.info("outbox.purged", deliveries=self._purged[0], messages=self._purged[1], vacuumed=vacuumed)
        return False
