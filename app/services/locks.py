"""Row locks on contacts, taken the same way by every write (docs/operations.md, "Locking rules").

A write locks the contacts it touches before it reads what decides it and before it inserts a row referencing
them (an order's, an event's foreign-key check takes a KEY SHARE lock: one taken first and "upgraded" later
deadlocks against another writer doing the same). It takes the mode it will need at once, never upgrading:
FOR UPDATE when it may change a contact's email or external_id or delete it, else FOR NO KEY UPDATE. Several
contacts are locked in one statement, in id order.

A contact merged away is followed to its survivor (`contact_merge`, merges of merges in one step), as emailed
links follow it: the merge moved the person's orders, events, consents and memberships there.
"""

from __future__ import annotations

import uuid
import zlib
from collections.abc import Iterable, Sequence

import asyncpg
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import Contact

__all__ = ["exclude_import_batches", "lock_contacts", "lock_following_merges", "lock_new_keys", "share_key_buckets",
           "share_with_erasures", "survivor_of"]

_contacts = Contact.__table__  # type: ignore[attr-defined]
# A merge committing while a writer waits for the merged contact's lock moves the writer on to the survivor; a
# few steps only ever cover merges racing that one write.
_MAX_FOLLOWS = 5
# New keys (emails, external ids) a batch is about to write, as buckets of pg_advisory_xact_lock(namespace, bucket):
# a few buckets bound the locks one transaction holds (the server's lock table is shared and finite).
NEW_KEY_NAMESPACE = 0x434E4B59  # "CNKY"
NEW_KEY_BUCKETS = 64
# Erasures against import batches (pg_advisory_xact_lock on this key): see share_with_erasures.
ERASURE_LOCK = 0x434E4552  # "CNER"


async def lock_contacts(
    session: AsyncSession, contact_ids: Iterable[uuid.UUID | None], *, key_change: bool = False
) -> set[uuid.UUID]:
    """Lock these contacts for this transaction, in id order; the ids that exist (a deleted one is skipped)."""
    wanted = sorted({i for i in contact_ids if i is not None})
    if not wanted:
        return set()
    query = select(_contacts.c.id).where(_contacts.c.id.in_(wanted)).order_by(_contacts.c.id)
    query = query.with_for_update() if key_change else query.with_for_update(key_share=True)  # FOR NO KEY UPDATE
    return set((await session.scalars(query)).all())


async def lock_following_merges(
    session: AsyncSession, contact_id: uuid.UUID, *, along: uuid.UUID | None = None, key_change: bool = False
) -> uuid.UUID | None:
    """Lock the contact, or the survivor it was merged into, with `along` (locked in the same statement); the id
    locked, or None when the person was erased (merged or not)."""
    for _ in range(_MAX_FOLLOWS):
        if contact_id in await lock_contacts(session, [contact_id, along], key_change=key_change):
            return contact_id
        survivor = await survivor_of(session, contact_id)
        if survivor is None:
            return None
        contact_id = survivor
    return None


async def survivor_of(session: AsyncSession, contact_id: uuid.UUID) -> uuid.UUID | None:
    """The contact that now carries a merged contact (following merges of merges), or None if never merged."""
    return await session.scalar(text("""
        WITH RECURSIVE chain(id, depth) AS (
            SELECT survivor_id, 1 FROM contact_merge WHERE merged_id = :id
            UNION ALL
            SELECT m.survivor_id, c.depth + 1 FROM contact_merge m JOIN chain c ON m.merged_id = c.id
            WHERE c.depth < 100
        )
        SELECT id FROM chain ORDER BY depth DESC LIMIT 1
    """), {"id": contact_id})


async def lock_new_keys(connection: asyncpg.Connection, *, emails: Sequence[str], external_ids: Sequence[str]) -> None:
    """Before a batch takes any contact lock: the buckets of its keys that no contact holds yet, in bucket order
    (docs/operations.md, "Locking rules"). A key's first insert holds it until commit (another insert of it waits on
    the unique index), so two batches creating the same new contacts in another order each waited for the other's
    insert; with their buckets taken first in one order, the second queues before its first write. A bucket is
    shared by many keys: batches creating unrelated contacts may queue too, never longer than one batch. The caller
    reads the holders of its keys afterwards (a contact created meanwhile by the batch it queued behind)."""
    if not emails and not external_ids:
        return
    held = {(kind, row[kind]) for row in await connection.fetch(_HOLDERS, list(emails), list(external_ids))
            for kind in ("email", "external_id")}
    new = [f"{kind}:{value}" for kind, values in (("email", emails), ("external_id", external_ids))
           for value in values if (kind, value) not in held]
    if buckets := _buckets(new):  # unnest gives the array's order, so the locks are taken in it
        await connection.execute(_LOCK_BUCKETS, NEW_KEY_NAMESPACE, buckets)


async def share_key_buckets(connection: asyncpg.Connection, *, emails: Iterable[str], external_ids: Iterable[str]
                            ) -> None:
    """An import batch's `lock_new_keys`: the buckets of all its keys, in bucket order, in SHARE mode.

    Its single INSERT meets its new keys in the file's order, so without them an API batch creating some of the
    same people in another order deadlocked with it (one of them failed: a 500 for the API). Shared, because two
    batches of one import are written at once (the later one inserts while it waits, in Python, for the earlier
    one's commit: PostgreSQL would not see such a wait in a cycle). All keys, not only the new ones: no query to
    tell them apart, and a batch of 10,000 rows covers the 64 buckets anyway."""
    keys = [f"email:{v}" for v in emails] + [f"external_id:{v}" for v in external_ids]
    if buckets := _buckets(keys):
        await connection.execute(_SHARE_BUCKETS, NEW_KEY_NAMESPACE, buckets)


async def share_with_erasures(connection: asyncpg.Connection, *, wait_ms: int) -> None:
    """An import batch, first (before its list, key buckets and contacts): SHARE of ERASURE_LOCK, until it commits;
    waiting for an erasure under way at most `wait_ms` (then LockNotAvailableError: a race, the batch is retried).

    A batch writes values naming people it takes no lock on: a row repeating an earlier batch's (`duplicate of row
    N`, the address as its value), every row of a dry run (its keys; a dry run locks no contact). An erasure
    committing while such a batch was open scrubbed the reports and keys without the batch's, which then named the
    person in clear (tests/services/test_import_erasure_race.py). With it, either the erasure waits for the batch's
    commit and scrubs its lines too, or the batch waits for the erasure's and finds the person suppressed.

    Before any other lock, in both (exclude_import_batches): a batch waiting for an erasure holds no key bucket nor
    contact (a retention run holds the lock a chunk of 1,000 people at a time: every API batch creating someone, and
    every write to the batch's contacts, queued behind it), and an erasure waiting for a batch holds no contact the
    batch is about to lock (tests/services/test_import_erasure_race.py). A batch asks after the one written before it
    holds it (`Turn` lets it start then), so an erasure queued between the two never waits on a batch that waits, in
    Python, for one queued behind it."""
    await connection.execute(f"SET LOCAL lock_timeout = {int(wait_ms)}; "
                             f"SELECT pg_advisory_xact_lock_shared({ERASURE_LOCK})")


async def exclude_import_batches(session: AsyncSession) -> None:
    """An erasure, before it locks its contacts (erase, retention, an erasure request, the preference center): the
    exclusive ERASURE_LOCK (share_with_erasures), until it commits. It waits for the import batches being written
    (seconds each), holding nothing they need, and batches starting meanwhile wait for it. Taken again by
    `gdpr.erase_many` (a no-op once held)."""
    await session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ERASURE_LOCK})


def _buckets(keys: Iterable[str]) -> list[int]:
    return sorted({zlib.crc32(key.encode()) % NEW_KEY_BUCKETS for key in keys})


_HOLDERS = "SELECT email, external_id FROM contact WHERE email = ANY($1::varchar[]) OR external_id = ANY($2::varchar[])"
_LOCK_BUCKETS = "SELECT count(pg_advisory_xact_lock($1, bucket)) FROM unnest($2::int[]) AS bucket"
_SHARE_BUCKETS = "SELECT count(pg_advisory_xact_lock_shared($1, bucket)) FROM unnest($2::int[]) AS bucket"
