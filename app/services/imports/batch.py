"""One import batch: its rows written set-based in one transaction that also commits the job's checkpoint.

Per batch (at most `IMPORT_BATCH_ROWS` rows), in the caller's transaction:
  1. the import's list is locked (FOR KEY SHARE) and read: it cannot be deleted while the batch subscribes to it;
     so are the attribute definitions the file fills and the job's tags (created again if deleted meanwhile);
  2. rows already validated by a worker process (app.services.imports.rows) arrive as records; duplicates inside
     the file (keys seen in earlier rows, `import_key`) are rejected;
  3. COPY into a staging table that lives for this transaction only (ON COMMIT DROP); the rows' key buckets taken
     (SHARE: locks.share_key_buckets);
  4. the contacts holding the rows' external_ids and emails are locked, in id order (FOR NO KEY UPDATE), and read
     as they are once locked; matching (external_id, else email, as the API's upsert) decides among them, then the
     suppression check (HMAC digests) overrides it;
  5. the batch's time is taken after those locks, so that it dates its writes after every write they overwrite;
     one INSERT for new contacts (again with ON CONFLICT DO NOTHING after a unique violation), one UPDATE ... FROM
     for changed ones, with history rows and outbox messages written by the same statements;
  6. the list subscription (list_id + consent), decided on the locked contacts, the reject report, the counters
     and the checkpoint.

Two batches are written at once, on two connections (`Turn`): the later one looks for duplicates among the earlier
one's rows too, takes its locks only once the earlier one holds its own, and writes its report lines (so that they
keep the file's order) and its checkpoint only after the earlier one committed (a contact both want waits for that
commit; the earlier one never waits on the later one).

The lock order (list, then contacts by id) is the API's (docs/operations.md, "Locking rules"). A contact created
after the lock with one of the file's keys (by a writer taking no key bucket: a single create, upsert or signup) is
met by the unique indexes: the new rows' insert, run again with ON CONFLICT DO NOTHING, leaves the rows it holds
to be matched to it (_match_the_winners), an updated row whose new email it holds is refused (`email_held`), as in
the API. A race that the transaction cannot settle itself (a deadlock, a lock held past the lock timeout) raises,
and the runner writes the whole batch again.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from app.logging import get_logger
from app.models.base import utc_now
from app.services import locks
from app.services.imports.rows import STAGE_COLUMNS, Spec, Validated
from app.services.links import CONFIRM_LINK_TTL, LinkBuilder
from app.settings import Settings

__all__ = ["EarlierRolledBack", "Job", "JobProblem", "LeaseLost", "Raced", "Turn", "write_batch"]

log = get_logger("carnet.imports")

# staging column → (wire field for history, SQL type)
_STAGE_TYPES = {
    "row_number": "integer", "new_id": "uuid", "external_id": "text", "email": "text", "phone": "text",
    "first_name": "text", "last_name": "text", "company": "text", "job_title": "text", "sector": "text",
    "gender": "text", "birth_date": "date", "address_line1": "text", "address_line2": "text", "postal_code": "text",
    "city": "text", "region": "text", "country": "text", "language": "text", "source": "text", "kind": "text",
    "first_contact_channel": "text", "attributes": "jsonb", "blank_attributes": "text[]", "email_digest": "text",
    "phone_digest": "text", "mailbox_digest": "text", "external_id_digest": "text",
}
_FIELD_COLUMN = {
    "address.line1": "address_line1", "address.line2": "address_line2", "address.postal_code": "postal_code",
    "address.city": "city", "address.region": "region", "address.country": "country",
}
_COLUMN_FIELD = {v: k for k, v in _FIELD_COLUMN.items()}
_EMAIL_DIGEST, _PHONE_DIGEST = STAGE_COLUMNS.index("email_digest"), STAGE_COLUMNS.index("phone_digest")
_MAILBOX_DIGEST, _EXTERNAL_ID_DIGEST = STAGE_COLUMNS.index("mailbox_digest"), STAGE_COLUMNS.index("external_id_digest")
_EMAIL, _EXTERNAL = STAGE_COLUMNS.index("email"), STAGE_COLUMNS.index("external_id")
_CONTACT_COLUMNS = [c for c in STAGE_COLUMNS if c not in {
    "row_number", "new_id", "attributes", "blank_attributes", "email_digest", "phone_digest", "mailbox_digest",
    "external_id_digest"}]
# `action` is what the batch does with a row. It starts as 'create' and a statement rewrites a staged row only
# when it decides otherwise (suppressed, matched, skipped, ...): on a file of new contacts nothing is rewritten.
# Once the writes are done, 'create' rows were created (their contact id is `new_id`), 'update' rows were
# matched and left unchanged, 'updated' rows changed. `target_id` is the matched contact. The table lives for the
# batch's transaction only (dropped at its end, and by PostgreSQL on commit or rollback): a pooled connection keeps
# no staged row, which would be out of an erasure's reach and in the way of the next batch.
_STAGE_DDL = (
    "CREATE TEMP TABLE import_stage ("
    + ", ".join(f"{name} {_STAGE_TYPES[name]}" for name in STAGE_COLUMNS)
    + ", target_id uuid, action text NOT NULL DEFAULT 'create', duplicate_of integer, PRIMARY KEY (row_number))"
    " ON COMMIT DROP"
)
_REASONS = {
    "suppressed": "skipped: this person was erased (GDPR); the address is on the suppression list",
    # the same skip, found by the customer number alone (`by_address` false in _REPORTED_SQL)
    "suppressed_external_id": "skipped: this person was erased (GDPR); the external_id is on the suppression list",
    "skip_exists": "skipped: a contact with this email or external_id exists (mode create_only)",
    "skip_missing": "skipped: no contact with this email or external_id (mode update_only)",
    "other_external_id": "this email belongs to a contact with another external_id",
    "email_held": "another contact already holds this email",
    "conflict": "another writer created a contact with this email or external_id meanwhile; import the row again",
}
_SKIPS = ("suppressed", "skip_exists", "skip_missing")
_REJECTS = ("other_external_id", "email_held", "conflict")
_KEY_RACES = 20  # UPDATE attempts, each after a contact took one of its new keys: each settles at least one row
_LOCK_TIMEOUT = "10s"


class LeaseLost(RuntimeError):
    """Another runner took the job over (our lease expired): stop without writing."""


class JobProblem(Exception):
    """The job cannot go on (its list or an attribute was deleted meanwhile): it fails with this message."""


class Raced(Exception):
    """The batch lost a race it cannot settle in its own transaction: roll it back and write it again."""


class EarlierRolledBack(Exception):
    """The batch written before this one rolled back: this one rolls back too (the checkpoint is a row count)."""


@dataclass(slots=True, eq=False)
class Turn:
    """A batch's place when two are written at once: what the next batch waits for, and what it reads of this one.

    `keys`: this batch's kept rows' emails and external_ids → row number, and the contacts they matched ('m:<id>'),
    known once it holds its locks and matched its rows (the next batch rejects its rows sharing one as duplicates:
    it cannot read them from the database before this commits).
    """

    earlier: Turn | None = None
    keys: dict[str, int] | None = None
    _locked: asyncio.Event = field(default_factory=asyncio.Event)
    _outcome: asyncio.Future[bool] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def hold(self, keys: dict[str, int]) -> None:
        """This batch holds its locks, and these are its rows' keys: the next one may go on."""
        self.keys = keys
        self._locked.set()

    def settle(self, *, committed: bool) -> None:
        """Committed or rolled back. Once committed its rows are the database's to show; the chain is cut so that
        an import keeps two batches' keys in memory, not every batch's."""
        self._locked.set()
        if not self._outcome.done():
            self._outcome.set_result(committed)
        self.keys = self.earlier = None

    async def held(self) -> None:
        await self._locked.wait()

    async def committed(self) -> bool:
        return await asyncio.shield(self._outcome)


@dataclass(slots=True)
class Job:
    row: dict[str, Any]
    owner: str
    settings: Settings
    spec: Spec
    columns_by_field: dict[str, str]       # field → the file's column name
    links: LinkBuilder | None              # set when the job subscribes to a list
    counts: dict[str, int] = field(default_factory=dict)
    # False while no earlier row left its email and external_id in import_key (a file of new contacts):
    # then a batch does not look its keys up there.
    row_keys_kept: bool = True

    @property
    def id(self) -> uuid.UUID:
        return self.row["id"]  # type: ignore[no-any-return]


async def write_batch(
    connection: asyncpg.Connection, job: Job, validated: Validated, processed: int, turn: Turn | None = None
) -> dict[str, int]:
    """Write one validated batch and the checkpoint `processed`, in the caller's transaction; the counts.

    `turn`: when another batch, `turn.earlier`, is written at the same time, ahead of this one (see the module's
    docstring); this batch calls `turn.hold` once it holds its locks. The caller settles it after the commit."""
    turn = turn or Turn()
    earlier = turn.earlier
    if earlier is not None:
        await earlier.held()
    # The batch and its checkpoint commit together, so a commit that a PostgreSQL crash loses takes its checkpoint
    # with it and the job resumes before that batch: not waiting for the WAL flush loses nothing. No statement
    # outlasts the lease (nor may the batch, after its date: see the end), nor waits on another writer's lock past
    # _LOCK_TIMEOUT (the API holds a contact for milliseconds: the runner writes the batch again).
    # No JIT: each statement of a batch runs once, and the generic plans' estimates for thousands of staged keys
    # passed PostgreSQL's JIT thresholds, so the earlier-keys lookup compiled itself with LLVM every batch (230-490 ms
    # each by auto_explain; docs/performance.md, "(a) and (b) at 1M").
    statement_ms = int(job.settings.import_lease_seconds * 1000)
    await connection.execute(f"SET LOCAL synchronous_commit = off; SET LOCAL statement_timeout = {statement_ms}; "
                             f"SET LOCAL jit = off")
    # An erasure under way (a retention run may take minutes) is waited for first, holding no lock another writer
    # needs: half the lease (the job's lease is renewed by its checkpoints alone), not _LOCK_TIMEOUT; past that, a
    # lock timeout, and the batch is written again (runner._write).
    await locks.share_with_erasures(connection, wait_ms=statement_ms // 2)
    await connection.execute(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'")
    dry = job.row["dry_run"]
    the_list = None if dry else await _lock_list(connection, job)
    if not dry:
        await _lock_catalogue(connection, job)
    rejects: list[tuple[Any, ...]] = [
        (job.id, r, c, _no_nul(reason), _no_nul(v)) for r, c, reason, v in validated.rejects]
    counts = dict.fromkeys(("created", "updated", "unchanged", "skipped", "rejected", "subscribed"), 0)
    counts["rejected"] = validated.rejected_rows
    duplicates: list[tuple[int, int, tuple[Any, ...]]] = []
    kept, keys = await _drop_duplicates(connection, job, validated.records, rejects, earlier, duplicates)
    skipped_as_erased: set[int] = set()
    counts["rejected"] += len(validated.records) - len(kept)
    stamped_at: datetime | None = None
    if not kept:
        turn.hold(keys)
    else:
        await connection.execute(_STAGE_DDL)
        await connection.copy_records_to_table("import_stage", records=kept, columns=list(STAGE_COLUMNS))
        if not dry:  # before the contacts, as an API batch takes them (locks.lock_new_keys)
            await locks.share_key_buckets(connection, emails=(r[_EMAIL] for r in kept if r[_EMAIL] is not None),
                                          external_ids=(r[_EXTERNAL] for r in kept if r[_EXTERNAL] is not None))
        held = await connection.fetch(_holders_sql(lock=not dry))
        claimed_in_flight = _claims(earlier)  # before _same_contact reads the committed ones (see Turn.settle)
        if held or job.row["mode"] == "update_only":  # else every row stays 'create' (a file of new people)
            await _match(connection, job, held, "create")
        if held:
            keys |= await _same_contact(connection, job, claimed_in_flight)
        turn.hold(keys)
        # An erasure either waits for this batch's commit (and scrubs what it writes) or committed before it began:
        # then this check sees it (locks.share_with_erasures, taken first).
        await connection.execute(_SUPPRESSED_SQL)
        now = utc_now()  # after the locks: later than every committed write this batch overwrites
        stamped_at = None if dry else now
        if not dry:
            inserted, wanted = await _create(connection, job, now)
            if inserted != wanted:  # some rows lost a race for their key with another writer (ON CONFLICT DO NOTHING)
                await _match_the_winners(connection, job)
                await _same_contact(connection, job, claimed_in_flight)
        await _update(connection, job, now, dry=dry)
        await connection.execute(_SEEN_SQL, job.id, dry)
        outcome = {r["action"]: r["n"] for r in await connection.fetch(
            "SELECT action, count(*) AS n FROM import_stage GROUP BY action")}
        job.row_keys_kept = job.row_keys_kept or any(n for action, n in outcome.items() if action != "create" or dry)
        counts["created"] = outcome.get("create", 0)
        counts["updated"] = outcome.get("updated", 0)
        counts["unchanged"] = outcome.get("update", 0)
        counts["skipped"] = sum(outcome.get(a, 0) for a in _SKIPS)
        counts["rejected"] += sum(outcome.get(a, 0) for a in _REJECTS)
        counts["rejected"] += outcome.get("duplicate", 0)
        by_row = {record[0]: record for record in kept} if outcome.get("duplicate") else {}
        for r in await connection.fetch(_REPORTED_SQL, [*_SKIPS, *_REJECTS, "duplicate"]):
            if r["action"] == "duplicate":  # as a duplicate key is reported: the key naming the contact
                field_name = "external_id" if r["by_external_id"] else "email"
                duplicates.append((len(rejects), r["duplicate_of"], by_row[r["row_number"]]))
                rejects.append((job.id, r["row_number"], job.columns_by_field.get(field_name),
                                f"duplicate of row {r['duplicate_of']}", r[field_name]))
                continue
            column, value = _key_cell(job, r)
            reason = _REASONS[r["action"]]
            if r["action"] == "suppressed":
                value = None  # an erased person's address is never written back, not even in the report
                skipped_as_erased.add(r["row_number"])
                if not r["by_address"]:  # their customer number named them: the report says which column
                    column, reason = job.columns_by_field.get("external_id"), _REASONS["suppressed_external_id"]
            rejects.append((job.id, r["row_number"], column, reason, value))
        if the_list is not None:
            counts["subscribed"] = await _subscribe(connection, job, the_list, rejects, now)
        await connection.execute("DROP TABLE import_stage")  # in a test's outer transaction, commit is a savepoint
    if duplicates:
        await _hide_erased_duplicates(connection, job, rejects, duplicates, skipped_as_erased)
    if earlier is not None and not await earlier.committed():
        raise EarlierRolledBack
    if rejects:  # after the earlier batch's: the report is read in id order, which must be the file's
        rejects.sort(key=lambda r: r[1])
        await connection.copy_records_to_table(
            "import_reject", records=rejects, columns=["import_id", "row_number", "column", "reason", "value"])
    moved = await connection.fetchval(
        """UPDATE import_job SET processed_rows = $3, created = created + $4, updated = updated + $5,
               unchanged = unchanged + $6, skipped = skipped + $7, rejected = rejected + $8,
               subscribed = subscribed + $9, lease_until = now() + make_interval(secs => $10), updated_at = now()
           WHERE id = $1 AND lease_owner = $2 AND status = 'running' RETURNING id""",
        job.id, job.owner, processed, counts["created"], counts["updated"], counts["unchanged"], counts["skipped"],
        counts["rejected"], counts["subscribed"], job.settings.import_lease_seconds,
    )
    if moved is None:
        raise LeaseLost(f"import {job.id} was taken over by another runner")
    if stamped_at is not None and utc_now() - stamped_at > timedelta(seconds=job.settings.import_lease_seconds):
        # Its changes would show up later than an incremental reader's overlap (docs/decisions.md) after their date.
        raise Raced("the batch took longer than IMPORT_LEASE_SECONDS after its date")
    return counts


async def _match(connection: asyncpg.Connection, job: Job, held: list[asyncpg.Record], action: str) -> None:
    """Matching (_MATCH_SQL) of the staged rows still marked `action`, among these locked holders."""
    await connection.execute(_MATCH_SQL, job.row["mode"], [h["id"] for h in held], [h["email"] for h in held],
                             [h["external_id"] for h in held], action)


async def _match_the_winners(connection: asyncpg.Connection, job: Job) -> None:
    """Rows whose contact another writer created after _holders_sql read the keys (a single API create or upsert,
    the public signup: they take no key bucket) are matched again, to that contact, now committed (ON CONFLICT
    waited for it) and locked: the row updates it, as the API's upsert updates the contact a concurrent upsert
    created (create_only: skipped as existing). Only a row whose contact is gone again stays `conflict`."""
    await connection.execute(
        "UPDATE import_stage s SET action = 'conflict' WHERE s.action = 'create' "
        "AND NOT EXISTS (SELECT 1 FROM contact c WHERE c.id = s.new_id)")
    await _match(connection, job, await connection.fetch(_holders_sql(lock=True, of="conflict")), "conflict")


def _claims(earlier: Turn | None) -> tuple[list[uuid.UUID], list[int]]:
    """The contacts that the batches still being written ahead of this one matched ('m:' keys of their turns)."""
    ids: list[uuid.UUID] = []
    rows: list[int] = []
    while earlier is not None:
        for key, row in (earlier.keys or {}).items():
            if key.startswith("m:"):
                ids.append(uuid.UUID(key[2:]))
                rows.append(row)
        earlier = earlier.earlier
    return ids, rows


async def _same_contact(
    connection: asyncpg.Connection, job: Job, in_flight: tuple[list[uuid.UUID], list[int]]
) -> dict[str, int]:
    """Rows naming a contact that an earlier row of the file named (by another key: one key is caught by
    _drop_duplicates) become `duplicate` of the first such row; the contacts this batch's other rows name, as
    'm:<contact id>' keys → row number, for the batches after it. Without this both rows would write the same
    contact: two history entries from the same old value, and with a list one membership upserted twice (a
    CardinalityViolationError failing the job)."""
    claims = await connection.fetch(_SAME_CONTACT_SQL, job.id, *in_flight)
    return {f"m:{r['target_id']}": r["row_number"] for r in claims}


async def _drop_duplicates(
    connection: asyncpg.Connection, job: Job, records: list[tuple[Any, ...]], rejects: list[tuple[Any, ...]],
    earlier: Turn | None, duplicates: list[tuple[int, int, tuple[Any, ...]]],
) -> tuple[list[tuple[Any, ...]], dict[str, int]]:
    """Rows whose email or external_id an earlier valid row of the file carries are rejected (first row kept);
    the rows kept, and their keys → row number. Each rejected row is added to `duplicates` as (its position in
    `rejects`, the row it repeats, the record).

    The keys of committed batches' rows come from `import_key` (_SEEN_SQL): as they are for rows that created no
    contact, as the email and external_id of the contact for rows that created one. Those of the batches still being
    written ahead of this one come from their `Turn`s, read before the query (a batch's keys are gone from its turn
    once it committed, and then the query sees its rows).
    """
    in_flight: dict[str, int] = {}
    while earlier is not None:
        in_flight.update(earlier.keys or {})
        earlier = earlier.earlier
    email_at, external_at = STAGE_COLUMNS.index("email"), STAGE_COLUMNS.index("external_id")
    keys_by_row = [_keys(r, email_at, external_at) for r in records]
    row_keys = [k for keys in keys_by_row for k in keys] if job.row_keys_kept else []
    seen: dict[str, int] = {r["key"]: r["row_number"] for r in await connection.fetch(
        _EARLIER_KEYS_SQL, job.id, row_keys, [r[email_at] for r in records if r[email_at] is not None],
        [r[external_at] for r in records if r[external_at] is not None])}
    seen.update(in_flight)
    mine: dict[str, int] = {}
    kept: list[tuple[Any, ...]] = []
    for record, keys in zip(records, keys_by_row, strict=True):
        earlier = [(seen[k], k) for k in keys if k in seen]
        if earlier:
            first, key = min(earlier)
            column = job.columns_by_field.get("email" if key.startswith("e:") else "external_id")
            duplicates.append((len(rejects), first, record))
            rejects.append((job.id, record[0], column, f"duplicate of row {first}", key[2:]))
            continue
        for key in keys:
            seen[key] = mine[key] = record[0]
        kept.append(record)
    return kept, mine


async def _hide_erased_duplicates(
    connection: asyncpg.Connection, job: Job, rejects: list[tuple[Any, ...]],
    duplicates: list[tuple[int, int, tuple[Any, ...]]], skipped_as_erased: set[int],
) -> None:
    """A row repeating an erased person's is theirs too: reported without its value, as the row it repeats is
    (skipped as suppressed, in this batch or an earlier one), or when its own address or phone is suppressed."""
    digested = (_EMAIL_DIGEST, _PHONE_DIGEST, _MAILBOX_DIGEST, _EXTERNAL_ID_DIGEST)
    digests = [d for _, _, record in duplicates for d in (record[i] for i in digested) if d]
    erased = set(await connection.fetchval(
        "SELECT coalesce(array_agg(digest), '{}') FROM suppression WHERE released_at IS NULL "
        "AND digest = ANY($1::text[])", digests)) if digests else set()
    repeated = sorted({first for _, first, _ in duplicates} - skipped_as_erased)
    skipped_as_erased = skipped_as_erased | set(await connection.fetchval(
        "SELECT coalesce(array_agg(row_number), '{}') FROM import_reject WHERE import_id = $1 "
        "AND reason = ANY($2::text[]) AND row_number = ANY($3::int[])", job.id,
        [_REASONS["suppressed"], _REASONS["suppressed_external_id"]], repeated))
    for position, first, record in duplicates:
        if first in skipped_as_erased or {record[i] for i in digested} & erased:
            rejects[position] = (*rejects[position][:4], None)


def _keys(record: tuple[Any, ...], email_at: int, external_at: int) -> list[str]:
    out = []
    if record[email_at] is not None:
        out.append("e:" + record[email_at])
    if record[external_at] is not None:
        out.append("x:" + record[external_at])
    return out


def _key_cell(job: Job, row: Mapping[str, Any]) -> tuple[str | None, str | None]:
    if row["email"] is not None and "email" in job.columns_by_field:
        return job.columns_by_field["email"], row["email"]
    return job.columns_by_field.get("external_id"), row["external_id"]


def _holders_sql(*, lock: bool, of: str | None = None) -> str:
    """Every contact holding one of the staged external_ids or emails: their id and keys, locked in id order.

    FOR NO KEY UPDATE, as the API's consent and list writes: rows referencing these contacts (orders, events) can
    still be inserted meanwhile; a contact whose email or external_id the batch changes is upgraded by the UPDATE.
    A contact changed while the lock waited is returned as it is now. The holders are found by one index probe
    per staged key (scalar subqueries: never a scan of `contact`, whatever the planner guesses of a temporary
    table it has no statistics for). A dry run writes nothing, so it locks nothing. `of`: only the rows marked so.
    """
    only = f"AND s.action = '{of}'" if of else ""
    return f"""
        SELECT id, email, external_id FROM contact
        WHERE id = ANY (ARRAY(
            SELECT (SELECT x.id FROM contact x WHERE x.external_id = s.external_id) FROM import_stage s
            WHERE s.external_id IS NOT NULL {only}
            UNION ALL
            SELECT (SELECT e.id FROM contact e WHERE e.email = s.email) FROM import_stage s
            WHERE s.email IS NOT NULL {only}
        ))
        ORDER BY id
        {"FOR NO KEY UPDATE" if lock else ""}
    """  # noqa: S608 (no value in it)


# After matching, so that it overrides whatever matching decided (a duplicate stays one, as a duplicate key does).
# A customer number suppresses the row unless a contact holds it now: that contact is matched by it, as the API's
# upsert matches it (the shop gave an erased person's former number to someone else), whoever held it before.
_SUPPRESSED_SQL = """
UPDATE import_stage s SET action = 'suppressed'
WHERE s.action <> 'duplicate' AND EXISTS (
    SELECT 1 FROM suppression p
    WHERE p.released_at IS NULL
      AND ((p.kind = 'email' AND p.digest = s.email_digest) OR (p.kind = 'phone' AND p.digest = s.phone_digest)
           OR (p.kind = 'email' AND p.digest = s.mailbox_digest)  -- the address's inbox (suppressions.py)
           OR (p.kind = 'external_id' AND p.digest = s.external_id_digest
               AND NOT EXISTS (SELECT 1 FROM contact c WHERE c.external_id = s.external_id)))
)
"""

# The API's upsert matching, of the rows marked $5: external_id first, else email; an email held by a contact with
# another external_id is refused (409 in the API), and so is a new email another contact already holds. Among the
# holders locked (_holders_sql: $2 ids, $3 emails, $4 external ids), as they are now: nothing decides on an unlocked
# read. A contact that takes one of the keys after the lock is met by the unique indexes (ON CONFLICT, _update).
_MATCH_SQL = """
WITH held AS (SELECT * FROM unnest($2::uuid[], $3::text[], $4::text[]) AS h(id, email, external_id))
UPDATE import_stage s SET target_id = m.target_id, action = m.action
FROM (
    SELECT s.row_number,
           coalesce(cx.id, ce.id) AS target_id,
           CASE
             WHEN cx.id IS NULL AND ce.id IS NOT NULL AND s.external_id IS NOT NULL
                  AND ce.external_id IS NOT NULL AND ce.external_id <> s.external_id THEN 'other_external_id'
             WHEN cx.id IS NOT NULL AND ce.id IS NOT NULL AND ce.id <> cx.id THEN 'email_held'
             WHEN coalesce(cx.id, ce.id) IS NULL THEN CASE WHEN $1 = 'update_only' THEN 'skip_missing' ELSE 'create' END
             ELSE CASE WHEN $1 = 'create_only' THEN 'skip_exists' ELSE 'update' END
           END AS action
    FROM import_stage s
    LEFT JOIN held cx ON cx.external_id = s.external_id
    LEFT JOIN held ce ON ce.email = s.email
    WHERE s.action = $5
) m
WHERE s.row_number = m.row_number AND m.action <> 'create'
"""

# What later batches need to find this batch's rows as earlier rows (resumes included: committed with the batch).
# A row that created a contact leaves nothing here: its row number is in the contact's `created` history entry
# (_CREATE_SQL), written anyway, and its keys are the contact's. Nor does a row of an erased person (suppressed):
# its keys would keep their address in clear while the job runs, and the suppression list finds their later rows
# anyway (an erasure during the job deletes the person's keys too: services/gdpr.py). Every other row leaves its
# email and external_id (a dry run creates nothing), and the contact it matched, if it did (`m:`,
# _SAME_CONTACT_SQL). A row rejected as naming a contact an earlier row matched leaves its keys too, as the turn
# hands them on: a later row repeating one of them is its duplicate, whatever batch it is in.
_SEEN_SQL = """
INSERT INTO import_key (import_id, key, row_number)
SELECT $1::uuid, k.key, s.row_number
FROM import_stage s CROSS JOIN unnest(ARRAY[
    'e:' || s.email, 'x:' || s.external_id,
    CASE WHEN s.action IN ('update', 'updated', 'skip_exists') THEN 'm:' || s.target_id END
]) AS k(key)
WHERE k.key IS NOT NULL AND (s.action <> 'create' OR $2) AND s.action <> 'suppressed'
"""

# A row matched to a contact (`target_id`, to update it or skip it as existing) that an earlier row of the file
# matched too, by another key, is a duplicate of the first one: rows of this batch, of committed ones (their `m:`
# keys; an index probe each) and of the ones in flight ahead ($2 contact ids, $3 rows). A refused row (another
# external_id, an email held) matched nothing: it neither claims a contact nor loses it. Answers the contacts this
# batch's remaining rows matched. Run again after _match_the_winners (once suppressed, a row still holds its claim).
_SAME_CONTACT_SQL = """
WITH named AS (
    SELECT target_id AS id, row_number FROM import_stage
    WHERE target_id IS NOT NULL AND action IN ('update', 'skip_exists', 'suppressed')
), first AS (
    SELECT id, min(row_number) AS row_number FROM (
        SELECT id, row_number FROM named
        UNION ALL
        SELECT h.id, h.row_number FROM unnest($2::uuid[], $3::integer[]) AS h(id, row_number)
        UNION ALL
        SELECT substr(k.key, 3)::uuid, k.row_number FROM import_key k
        WHERE k.import_id = $1 AND k.key = ANY(ARRAY(SELECT 'm:' || id FROM named))
    ) AS every GROUP BY id
), repeated AS (
    UPDATE import_stage s SET action = 'duplicate', duplicate_of = f.row_number
    FROM first f WHERE f.id = s.target_id AND f.row_number < s.row_number
      AND s.action IN ('update', 'skip_exists', 'suppressed')
    RETURNING s.row_number
)
SELECT n.id AS target_id, n.row_number FROM named n
WHERE n.row_number NOT IN (SELECT row_number FROM repeated)
"""

# The rows the report names (skipped, refused, duplicates), with the key that named a duplicate's contact (matching
# tries the external_id first), and whether a suppressed row's address or phone is erased (else its customer number).
_REPORTED_SQL = """
SELECT s.row_number, s.action, s.email, s.external_id, s.duplicate_of,
       EXISTS (SELECT 1 FROM contact c WHERE c.id = s.target_id AND c.external_id = s.external_id) AS by_external_id,
       s.action = 'suppressed' AND EXISTS (
           SELECT 1 FROM suppression p WHERE p.released_at IS NULL AND p.kind IN ('email', 'phone')
             AND p.digest IN (s.email_digest, s.phone_digest, s.mailbox_digest)) AS by_address
FROM import_stage s WHERE s.action = ANY($1::text[])
"""

# The earlier rows holding any of these keys: recorded as they are ($2: skipped when no earlier row recorded any),
# or as the email and external_id of a contact an earlier row created ($3 emails, $4 external_ids), whose row is
# in its `created` history entry (an index probe per contact found: ix_contact_history_contact_id_id), or, for a
# job begun before that entry held it, in a `c:<contact id>` key.
_EARLIER_KEYS_SQL = """
SELECT key, row_number FROM import_key WHERE import_id = $1 AND key = ANY($2::text[])
UNION ALL
SELECT k.key, created.row_number
FROM (
    SELECT c.email, c.external_id, coalesce(
        (SELECT min((h.new_value ->> 'row')::integer) FROM contact_history h  -- min: a merge moves entries
         WHERE h.contact_id = c.id AND h.field = 'created' AND h.via = 'import'
           AND h.new_value ->> 'import_id' = $1::uuid::text),
        (SELECT i.row_number FROM import_key i WHERE i.import_id = $1 AND i.key = 'c:' || c.id::text)
    ) AS row_number
    FROM contact c
    WHERE c.email = ANY($3::text[]) OR c.external_id = ANY($4::text[])
) AS created
CROSS JOIN unnest(ARRAY['e:' || created.email, 'x:' || created.external_id]) AS k(key)
WHERE k.key IS NOT NULL AND created.row_number IS NOT NULL
"""

def _create_sql(*, on_conflict: str) -> str:
    # The history rows come from the staging table, which has the row numbers (RETURNING has only the contact's
    # columns); without ON CONFLICT every row to create was created or the statement failed, with it only those
    # RETURNING names were (a hashed subplan).
    created = "AND s.new_id IN (SELECT id FROM new)" if on_conflict else ""
    return f"""
WITH new AS (
    INSERT INTO contact ({", ".join(_CONTACT_COLUMNS)}, id, email_status, lifecycle_stage, attributes, tags,
                         orders_count, total_spent, version, created_at, updated_at)
    SELECT {", ".join("coalesce(s.kind, 'prospect')" if c == "kind" else "coalesce(s.source, 'import')"
                      if c == "source" else f"s.{c}" for c in _CONTACT_COLUMNS)},
           s.new_id, 'unverified', 'prospect', coalesce(s.attributes, '{{}}'::jsonb), $1::text[], 0, 0, 1, $3, $3
    FROM import_stage s WHERE s.action = 'create'
    {on_conflict}
    RETURNING id
), history AS (
    INSERT INTO contact_history (contact_id, field, old_value, new_value, subject, via, at)
    SELECT s.new_id, 'created', NULL, jsonb_build_object('import_id', $4::text, 'row', s.row_number), $2, 'import', $3
    FROM import_stage s WHERE s.action = 'create' {created}
), announced AS (
    INSERT INTO outbox_message (topic, contact_id, payload, created_at)
    SELECT 'contact.created', new.id, jsonb_build_object('contact_id', new.id), $3 FROM new
)
SELECT (SELECT count(*) FROM new), (SELECT count(*) FROM import_stage WHERE action = 'create')
"""  # noqa: S608 (column names from our own tables; every value is a parameter)


_CREATE_SQL = _create_sql(on_conflict="")
_CREATE_RACED_SQL = _create_sql(on_conflict="ON CONFLICT DO NOTHING")


async def _create(connection: asyncpg.Connection, job: Job, now: datetime) -> tuple[int, int]:
    """The new contacts with their history and outbox rows; (created, rows meant to be created).

    First as a plain INSERT: ON CONFLICT's speculative insertion costs every row (a probe of each unique index
    before the insert, a confirmation in the WAL after it) for a race only another writer can cause, a contact
    created with one of the rows' keys after _holders_sql read them. Such a race makes the plain statement fail on
    a unique violation; it is undone to its savepoint, and the rows are written again with ON CONFLICT DO NOTHING,
    the ones that lost the race left out (write_batch marks them `conflict`).
    """
    args = (job.row["tags"], job.row["subject"], now, str(job.id))
    try:
        async with connection.transaction():  # a savepoint in the batch's transaction
            inserted, wanted = await connection.fetchrow(_CREATE_SQL, *args)
    except asyncpg.UniqueViolationError:
        log.info("import.keys_created_meanwhile", import_id=str(job.id))
        inserted, wanted = await connection.fetchrow(_CREATE_RACED_SQL, *args)
    return inserted, wanted


def _update_sql(job: Job, *, dry: bool) -> str:
    """The changed matched contacts, updated with their history and outbox rows, in one statement."""
    fields = [f for f in job.columns_by_field if not f.startswith("attributes.")]
    columns = [_FIELD_COLUMN.get(f, f) for f in fields]
    attributes = [f.removeprefix("attributes.") for f in job.columns_by_field if f.startswith("attributes.")]
    blank_erases = job.row["blank_erases"]
    new: dict[str, str] = {}
    for column in columns:
        if column == "kind" or not blank_erases:
            new[column] = f"coalesce(s.{column}, c.{column})"
        else:
            new[column] = f"s.{column}"  # a blank cell is NULL in the staging table
    if attributes:
        base = "(c.attributes - coalesce(s.blank_attributes, '{}'::text[]))" if blank_erases else "c.attributes"
        new["attributes"] = f"{base} || coalesce(s.attributes, '{{}}'::jsonb)"
    if job.row["tags"]:
        new["tags"] = ("c.tags || ARRAY(SELECT t FROM unnest($3::text[]) WITH ORDINALITY u(t, i) "
                       "WHERE t <> ALL(c.tags) ORDER BY i)")
    if not new:
        return "SELECT $1::text, $2::timestamptz, $3::text[]"
    selected = ", ".join(f"c.{name} AS o_{name}, {expr} AS n_{name}" for name, expr in new.items())
    changed = " OR ".join(f"n_{name} IS DISTINCT FROM o_{name}" for name in new)
    # The contacts are locked already (_holders_sql). `stamp`: the batch's time, or just after the contact's own if a
    # clock ahead of ours dated it later: a change is never dated before the one it overwrites.
    cur = f"""
        cur AS (
            SELECT c.id, s.row_number, greatest($2::timestamptz, c.updated_at + interval '1 microsecond') AS stamp,
                   {selected}
            FROM contact c JOIN import_stage s ON s.target_id = c.id
            WHERE s.action = 'update' AND cardinality($3::text[]) >= 0
        ), changed AS (SELECT * FROM cur WHERE {changed})"""  # noqa: S608 (our own names; values are parameters)
    if dry:
        return (f"WITH {cur} UPDATE import_stage s SET action = 'updated' FROM changed ch "  # noqa: S608
                "WHERE s.row_number = ch.row_number AND $1::text IS NOT NULL AND $2::timestamptz IS NOT NULL")
    entries = []
    for name in new:
        if name == "attributes":
            entries += [f"('attributes.{a}', ch.o_attributes -> '{a}', ch.n_attributes -> '{a}')" for a in attributes]
        elif name == "tags":
            entries.append("('tags', CASE WHEN cardinality(ch.o_tags) = 0 THEN NULL ELSE to_jsonb(ch.o_tags) END, "
                           "CASE WHEN cardinality(ch.n_tags) = 0 THEN NULL ELSE to_jsonb(ch.n_tags) END)")
        else:
            entries.append(f"('{_COLUMN_FIELD.get(name, name)}', to_jsonb(ch.o_{name}), to_jsonb(ch.n_{name}))")
    assignments = ", ".join(f"{name} = ch.n_{name}" for name in new)
    return f"""
        WITH {cur},
        written AS (
            UPDATE contact c SET {assignments}, version = c.version + 1, updated_at = ch.stamp
            FROM changed ch WHERE c.id = ch.id
        ), history AS (
            INSERT INTO contact_history (contact_id, field, old_value, new_value, subject, via, at)
            SELECT ch.id, f.field, f.old, f.new, $1, 'import', ch.stamp
            FROM changed ch CROSS JOIN LATERAL (VALUES {", ".join(entries)}) AS f(field, old, new)
            WHERE f.old IS DISTINCT FROM f.new
        ), announced AS (
            INSERT INTO outbox_message (topic, contact_id, payload, created_at)
            SELECT 'contact.updated', ch.id, jsonb_build_object('contact_id', ch.id), ch.stamp FROM changed ch
        )
        UPDATE import_stage s SET action = 'updated' FROM changed ch WHERE s.row_number = ch.row_number
    """  # noqa: S608 (names from our own tables and attribute definitions; values are parameters)


def _update_args(job: Job, now: datetime, *, dry: bool) -> list[Any]:
    return [job.row["subject"], now, job.row["tags"]]


async def _update(connection: asyncpg.Connection, job: Job, now: datetime, *, dry: bool) -> None:
    """The UPDATE of the matched rows (_update_sql).

    Matching saw the contacts holding the file's keys when it read them; a contact created since then with one of
    the rows' new emails (or given it, or one of their external ids) shows only as a unique violation here. The
    statement is then undone to its savepoint, the rows whose new key another contact now holds become
    `email_held` (the API's upsert refuses them the same way), and it runs again. That contact is committed by
    then (the violation waited for its transaction), so every round settles at least one row.
    """
    sql, args = _update_sql(job, dry=dry), _update_args(job, now, dry=dry)
    if dry:
        await connection.execute(sql, *args)
        return
    for _round in range(_KEY_RACES):
        try:
            async with connection.transaction():  # a savepoint in the batch's transaction
                await connection.execute(sql, *args)
            return
        except asyncpg.UniqueViolationError:
            held = await connection.fetchval(_HELD_SQL)
            if not held:
                raise  # not a key another contact took: a bug, not a race
            log.info("import.keys_taken_meanwhile", import_id=str(job.id), rows=held)
    raise Raced(f"contacts kept taking the batch's new emails during {_KEY_RACES} attempts")


# The rows about to give their contact an email or external_id that another contact holds now.
_HELD_SQL = """
WITH held AS (
    UPDATE import_stage s SET action = 'email_held'
    WHERE s.action = 'update'
      AND EXISTS (SELECT 1 FROM contact c
                  WHERE c.id <> s.target_id AND (c.email = s.email OR c.external_id = s.external_id))
    RETURNING 1
)
SELECT count(*) FROM held
"""


# ---- list subscription -----------------------------------------------------------------------------------

# The contacts are locked (_holders_sql, or created by this batch), and every writer of their consents and memberships
# locks them first: this reads the ledger and memberships as they stay until the batch commits.
_ELIGIBLE_SQL = """
SELECT s.row_number, c.id, c.email, c.email_status, c.kind, m.status, m.unsubscribed_at,
       (SELECT max(e.occurred_at) FROM consent_event e
         WHERE e.contact_id = c.id AND e.purpose = 'email_marketing' AND e.action = 'withdrawn') AS withdrawn_at,
       (SELECT max(e.occurred_at) FROM consent_event e
         WHERE e.contact_id = c.id AND e.purpose = 'email_marketing' AND e.action <> 'withdrawn') AS granted_at
FROM import_stage s
JOIN contact c ON c.id = coalesce(s.target_id, s.new_id)
LEFT JOIN list_membership m ON m.list_id = $1 AND m.contact_id = c.id
WHERE s.action IN ('create', 'update', 'updated')
"""


async def _lock_list(connection: asyncpg.Connection, job: Job) -> Mapping[str, Any] | None:
    """The job's list, read now and locked FOR KEY SHARE (it cannot be deleted before the batch commits); first, as
    lists.subscribe locks the list before the contact."""
    if job.row["list_id"] is None:
        return None
    row: Mapping[str, Any] | None = await connection.fetchrow(
        "SELECT * FROM list WHERE id = $1 FOR KEY SHARE", job.row["list_id"])
    if row is None:
        raise JobProblem(f"the list {job.row['list_id']} was deleted while the import ran")
    return row


async def _lock_catalogue(connection: asyncpg.Connection, job: Job) -> None:
    """The attribute definitions the file fills and the job's tags, locked FOR KEY SHARE until the batch commits, as a
    contact write through the API holds them (services/attributes.py, services/tags.py): read when the job was
    prepared, they may have been deleted since, and a delete must then see this batch's values once it commits. A
    definition gone fails the job (its values were checked against it); a tag gone is created again, as tagging a
    contact through the API creates it."""
    names = sorted(job.spec.attributes)
    if names:
        found = {r["name"] for r in await connection.fetch(
            "SELECT name FROM attribute_definition WHERE name = ANY($1::text[]) ORDER BY name FOR KEY SHARE", names)}
        if missing := [name for name in names if name not in found]:
            raise JobProblem(f"attribute definitions deleted while the import ran: {', '.join(missing)}")
    tags = sorted(set(job.row["tags"] or ()))
    if tags:
        await connection.execute(
            "INSERT INTO tag (name, created_at) SELECT unnest($1::text[]), now() ON CONFLICT DO NOTHING", tags)
        locked = await connection.fetch(
            "SELECT name FROM tag WHERE name = ANY($1::text[]) ORDER BY name FOR KEY SHARE", tags)
        if len(locked) < len(tags):
            raise Raced("a tag of the import was deleted while the batch locked it")


async def _subscribe(
    connection: asyncpg.Connection, job: Job, the_list: Mapping[str, Any], rejects: list[tuple[Any, ...]],
    now: datetime,
) -> int:
    """lists.subscribe's rules, set-based: mailable email, accepted kind, the consent (appended), no later
    withdrawal or unsubscribe from this list; then subscribed, or pending with a confirmation request."""
    consent = job.row["consent"]
    consent_at = datetime.fromisoformat(consent["occurred_at"]).astimezone(UTC)
    accepted = the_list["accepted_kinds"]
    grants: list[uuid.UUID] = []
    joining: list[uuid.UUID] = []
    for r in await connection.fetch(_ELIGIBLE_SQL, the_list["id"]):
        reason = None
        if r["email"] is None:
            reason = "not subscribed: the contact has no email address"
        elif r["email_status"] in ("bounced", "complained"):
            reason = f"not subscribed: the address is {r['email_status']}"
        elif accepted is not None and r["kind"] not in accepted:
            reason = f"not subscribed: the list accepts {', '.join(accepted)}; the contact is a {r['kind']}"
        if reason is None:
            grants.append(r["id"])
            last_grant = max(consent_at, r["granted_at"] or consent_at)
            if r["status"] in ("subscribed", "pending"):
                continue
            if r["withdrawn_at"] is not None and r["withdrawn_at"] > last_grant:
                reason = "not subscribed: email_marketing was withdrawn after the import's consent"
            elif r["status"] == "unsubscribed" and r["unsubscribed_at"] is not None \
                    and last_grant <= r["unsubscribed_at"]:
                reason = "not subscribed: the contact unsubscribed from this list after the import's consent"
            else:
                joining.append(r["id"])
        if reason is not None:
            rejects.append((job.id, r["row_number"], None, reason, None))
    source = consent.get("source") or "import"
    if grants:
        await connection.execute(
            """INSERT INTO consent_event (contact_id, purpose, action, source, occurred_at, recorded_at, recorded_by,
                                          proof)
               SELECT unnest($1::uuid[]), 'email_marketing', 'granted', $2, $3, $4, $5, $6::jsonb""",
            grants, source, consent_at, now, job.row["subject"], json.dumps(consent["proof"]),
        )
    if not joining:
        return 0
    pending = bool(the_list["double_opt_in"])
    status = "pending" if pending else "subscribed"
    await connection.execute(
        """INSERT INTO list_membership (list_id, contact_id, status, source, subscribed_at, pending_since,
                                        unsubscribed_at, updated_at)
           SELECT $1, unnest($2::uuid[]), $3::text, $4, CASE WHEN $3::text = 'subscribed' THEN $5::timestamptz END,
                  CASE WHEN $3::text = 'pending' THEN $5::timestamptz END, NULL, $5
           ON CONFLICT (list_id, contact_id) DO UPDATE
           SET status = excluded.status, source = excluded.source, subscribed_at = excluded.subscribed_at,
               pending_since = excluded.pending_since, pending_proof = NULL, unsubscribed_at = NULL,
               updated_at = excluded.updated_at""",
        the_list["id"], joining, status, source, now,
    )
    list_id = str(the_list["id"])
    if pending:
        assert job.links is not None
        expires_at = now + CONFIRM_LINK_TTL
        payloads = [json.dumps({
            "list_id": list_id, "list_name": the_list["name"], "contact_id": str(c),
            "confirm_url": job.links.confirm_url(c, the_list["id"], expires_at=expires_at),
            "confirm_expires_at": expires_at.isoformat().replace("+00:00", "Z"),
            "unsubscribe_url": job.links.unsubscribe_url(c, the_list["id"]),
        }) for c in joining]
        topic = "membership.confirmation_requested"
    else:
        payloads = [json.dumps({"list_id": list_id, "contact_id": str(c)}) for c in joining]
        topic = "membership.subscribed"
    await connection.execute(
        """INSERT INTO outbox_message (topic, contact_id, payload, created_at)
           SELECT $1, u.c, u.p::jsonb, $4 FROM unnest($2::uuid[], $3::text[]) AS u(c, p)""",
        topic, joining, payloads, now,
    )
    return len(joining)


# ---- helpers ---------------------------------------------------------------------------------------------


def _no_nul(text: str | None) -> str | None:
    """PostgreSQL text cannot hold a NUL (rows._shown already writes it `\\0`; a reason quoting a cell might not)."""
    return text.replace("\x00", "\\0") if text is not None and "\x00" in text else text
