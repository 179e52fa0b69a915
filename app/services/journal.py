"""The access journal's rules: what an entry is, how entries join the hash chain, verification, retention,
erasure's rewrite, and the admin's query (docs/gdpr.md "Access journal").

The chain: entries are numbered by `seq`; each stores `prev_hash` (its predecessor's `hash`, or the anchor's
after retention, or 32 zero bytes for the first ever) and `hash = SHA-256(prev_hash || canonical(entry))`.
`canonical` covers every column but `refs`, which it covers through `refs_digest` (SHA-256 of the refs as they
were chained): erasure replaces a person's contact id in `refs` by the keyed digests of their address, and the
chain still verifies. Appends take one advisory lock, so several API processes and workers extend one chain.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app import access as access_context
from app.ids import keyed_digest
from app.models.base import utc_now
from app.services import suppressions

__all__ = [
    "ERASED",
    "GENESIS",
    "Break",
    "Entry",
    "act",
    "append",
    "erased_refs",
    "forget",
    "page",
    "prune",
    "record",
    "verify",
]

GENESIS = bytes(32)
ERASED = "erased:"                   # a ref that stood for a contact erased since: its address's keyed digest
LOCK = 0x636172_6E6574_4A4E          # pg_advisory_xact_lock key of the chain ("carnet" "JN")
_COLUMNS = ("seq", "chained_at", "at", "kind", "action", "subject", "token_id", "role", "route", "request_id",
            "client_addr", "refs", "ref_count", "detail", "refs_digest", "prev_hash", "hash")
_DESCRIBED = ("kind", "action", "subject", "token_id", "role", "route", "request_id", "client_addr", "refs",
              "ref_count", "detail")


@dataclass(slots=True)
class Entry:
    """One access or act, before it joins the chain."""

    kind: str                        # read | export | admin
    action: str                      # dotted noun.verb: contacts.read, exports.contacts, tokens.created ...
    subject: str                     # who: the token's subject, or `cli:<user>` for a command
    at: datetime = field(default_factory=utc_now)
    token_id: str | None = None
    role: str | None = None
    route: str | None = None         # the route template (`GET /v1/contacts/{contact_id}`), never the raw path
    request_id: str | None = None
    client_addr: str | None = None
    refs: list[str] = field(default_factory=list)   # contact ids reached (or `erased:<digest>`)
    ref_count: int = 0               # contacts answered or rows exported
    detail: dict[str, Any] | None = None            # the filter, format, target... never personal data in clear


@dataclass(frozen=True, slots=True)
class Break:
    """The first link that does not hold."""

    seq: int
    reason: str


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _stamp(moment: datetime) -> int:
    """Microseconds since the epoch: exact (PostgreSQL keeps microseconds) and cheap to hash."""
    return (moment - _EPOCH) // _MICROSECOND


def refs_digest(refs: Sequence[str]) -> bytes:
    return hashlib.sha256("\n".join(refs).encode()).digest()


def _canonical(seq: int, chained_at: datetime, values: Mapping[str, Any], digest: bytes) -> bytes:
    described = [values[name] for name in _DESCRIBED if name != "refs"]
    body = [seq, _stamp(chained_at), _stamp(values["at"]), *described, digest.hex()]
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def link(prev_hash: bytes, seq: int, chained_at: datetime, values: Mapping[str, Any], digest: bytes) -> bytes:
    return hashlib.sha256(prev_hash + _canonical(seq, chained_at, values, digest)).digest()


async def append(connection: asyncpg.Connection, entries: Sequence[Entry]) -> int:
    """Chain `entries`, after every act pending in `journal_pending`, in the caller's transaction.

    Takes the chain's lock until that transaction ends: keep the transaction to this call.
    """
    await connection.execute("SELECT pg_advisory_xact_lock($1)", LOCK)
    await _guard_allows(connection, "chaining")
    pending = await connection.fetch(
        f"DELETE FROM journal_pending RETURNING id, at, {', '.join(_DESCRIBED)}")  # noqa: S608 (fixed names)
    await _guard_allows(connection, "")
    if not entries and not pending:
        return 0
    head = await connection.fetchrow("SELECT seq, hash, chained_at FROM journal_entry ORDER BY seq DESC LIMIT 1")
    head = head or await connection.fetchrow("SELECT seq, hash, chained_at FROM journal_anchor")
    seq, prev_hash = (head["seq"], head["hash"]) if head else (0, GENESIS)
    chained_at = max(utc_now(), head["chained_at"]) if head else utc_now()  # never decreases along seq
    erased = {str(r["contact_id"]): r["refs"] for r in await connection.fetch(
        "SELECT contact_id, refs FROM journal_erasure")}
    waiting = [_from_row(r) for r in sorted(pending, key=lambda r: r["id"])]
    records = []
    for values in [*waiting, *map(_values, entries)]:
        seq += 1
        values["refs"] = _substitute(values["refs"], erased)
        if values["detail"] is not None:
            values["detail"] = _jsonable(values["detail"])
        digest = refs_digest(values["refs"])
        hashed = link(prev_hash, seq, chained_at, values, digest)
        records.append((seq, chained_at, values["at"], *(values[name] for name in _DESCRIBED[:-1]),
                        None if values["detail"] is None else json.dumps(values["detail"]), digest, prev_hash, hashed))
        prev_hash = hashed
    await connection.copy_records_to_table("journal_entry", records=records, columns=_COLUMNS)
    return len(records)


async def _guard_allows(connection: asyncpg.Connection, what: str) -> None:
    """Open one of the journal trigger's exceptions (migration 0032) for this transaction; '' closes it."""
    await connection.execute("SELECT set_config('carnet.journal', $1, true)", what)


def _values(entry: Entry) -> dict[str, Any]:
    """The entry as a dict (not `dataclasses.asdict`: it deep-copies, ~10x slower on the flush's hot loop)."""
    return {name: getattr(entry, name) for name in ("at", *_DESCRIBED)}


def _from_row(row: Mapping[str, Any]) -> dict[str, Any]:
    values = {name: row[name] for name in ("at", *_DESCRIBED)}
    values["detail"] = json.loads(values["detail"]) if isinstance(values["detail"], str) else values["detail"]
    return values


def _jsonable(detail: Any) -> Any:
    """What the chain hashes is what jsonb gives back: no floats, no tuples, plain keys."""
    return None if detail is None else json.loads(json.dumps(detail, default=str))


def _substitute(refs: Iterable[str], erased: Mapping[str, Sequence[str]]) -> list[str]:
    out: list[str] = []
    for ref in refs:
        for kept in erased.get(ref, (ref,)):
            if kept not in out:
                out.append(kept)
    return out


def act(actor: Any, action: str, *, refs: Sequence[str] = (), detail: dict[str, Any] | None = None,
        kind: str = "admin", count: int | None = None) -> Entry:
    """An act by `actor` (a Principal), with the current request's context when there is one."""
    context = access_context.current()
    return Entry(
        kind, action, actor.subject, token_id=actor.token_id, role=str(actor.role),
        route=access_context.route(context) if context else None,
        request_id=context.request_id if context else None,
        client_addr=context.client_addr if context else None,
        refs=list(refs), ref_count=len(refs) if count is None else count, detail=detail,
    )


async def record(session: AsyncSession, entry: Entry) -> None:
    """Journal an act inside the transaction that does it: it is chained if, and only if, the act commits."""
    values = _values(entry)
    values["detail"] = None if entry.detail is None else json.dumps(_jsonable(entry.detail))
    await session.execute(text(
        "INSERT INTO journal_pending (at, kind, action, subject, token_id, role, route, request_id, client_addr, "
        "refs, ref_count, detail) VALUES (:at, :kind, :action, :subject, :token_id, :role, :route, :request_id, "
        ":client_addr, :refs, :ref_count, CAST(:detail AS jsonb))"), values)


def fingerprint(value: Any) -> str:
    """SHA-256 of a JSON value (a segment filter that may name an address): comparable, not readable."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def search_detail(params: Any, *, hidden: Iterable[str], drop: Iterable[str] = ()) -> dict[str, Any]:
    """A page's query string for its entry. Searched values that identify someone (`q`, `email`) become keyed
    digests (`email` the suppression list's own): "who searched for this address" stays answerable, and the
    journal keeps no address in clear."""
    out: dict[str, list[str]] = {}
    for name, value in params.multi_items():
        if name in drop:
            continue
        if name in hidden:
            value = "hmac:" + suppressions.digest(name, value.strip().lower())
        out.setdefault(name, []).append(value)
    return {name: values[0] if len(values) == 1 else values for name, values in out.items()}


def erased_refs(digests: Iterable[str]) -> list[str]:
    return [ERASED + d for d in digests]


def person_refs(contact: Mapping[str, Any]) -> list[str]:
    """What stands for an erased person in the journal: the suppression list's digests of their email and
    phone (so "was this address reached?" stays answerable), or a keyed digest of the id when they had neither."""
    digests = suppressions.digests(email=contact["email"], phone=contact["phone"]).values()
    return erased_refs(digests or [keyed_digest(suppressions.key(), "contact", str(contact["id"]))])


async def forget(session: AsyncSession, people: Mapping[uuid.UUID, Sequence[str]]) -> int:
    """Erasure: each person's contact id becomes, in every entry, the keyed digests of their addresses.

    `people` maps a contact id to its `erased:<digest>` refs. A read still buffered in an API process when the
    erasure commits is chained later: `journal_erasure` makes `append` substitute it too.
    """
    if not people:
        return 0
    ids = [str(i) for i in people]
    targets = [list(refs) for refs in people.values()]
    await session.execute(text(
        "INSERT INTO journal_erasure (contact_id, refs, erased_at) "
        "SELECT CAST(u.id AS uuid), string_to_array(u.refs, E'\\n'), now() FROM unnest(CAST(:ids AS text[]), CAST(:refs AS text[])) AS u(id, refs) "
        "ON CONFLICT (contact_id) DO UPDATE SET refs = excluded.refs, erased_at = excluded.erased_at"),
        {"ids": ids, "refs": ["\n".join(t) for t in targets]})
    rewritten = 0
    await session.execute(text("SELECT set_config('carnet.journal', 'forgetting', true)"))  # migration 0032
    for table in ("journal_entry", "journal_pending"):
        done = await session.execute(text(
            f"UPDATE {table} AS j SET refs = ARRAY("  # noqa: S608 (two fixed table names)
            "  SELECT DISTINCT x FROM unnest(j.refs) AS r(ref)"
            "  CROSS JOIN LATERAL unnest(coalesce("
            "    (SELECT string_to_array(m.refs, E'\\n') FROM unnest(CAST(:ids AS text[]), CAST(:refs AS text[])) AS m(id, refs) WHERE m.id = r.ref),"
            "    ARRAY[r.ref])) AS x) "
            "WHERE j.refs && CAST(:ids AS text[])"), {"ids": ids, "refs": ["\n".join(t) for t in targets]})
        rewritten += done.rowcount or 0  # type: ignore[attr-defined]
    await session.execute(text("SELECT set_config('carnet.journal', '', true)"))
    return rewritten


async def prune(connection: asyncpg.Connection, *, keep_days: int, erasure_hold: timedelta) -> int:
    """Retention: remove every entry chained before the day `keep_days` ago (whole UTC days), remember the
    last one removed as the anchor the chain verifies from, and journal the pruning itself."""
    await connection.execute("SELECT pg_advisory_xact_lock($1)", LOCK)
    await connection.execute("DELETE FROM journal_erasure WHERE erased_at < now() - $1::interval", erasure_hold)
    cutoff = (utc_now() - timedelta(days=keep_days)).replace(hour=0, minute=0, second=0, microsecond=0)
    last = await connection.fetchrow(
        "SELECT seq, hash, chained_at FROM journal_entry WHERE chained_at < $1 ORDER BY seq DESC LIMIT 1", cutoff)
    if last is None:
        return 0
    await _guard_allows(connection, "pruning")
    removed = await connection.fetchval(
        "WITH gone AS (DELETE FROM journal_entry WHERE seq <= $1 RETURNING 1) SELECT count(*) FROM gone", last["seq"])
    await connection.execute(
        "INSERT INTO journal_anchor (id, seq, chained_at, hash, pruned_at) VALUES (1, $1, $2, $3, now()) "
        "ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, chained_at = excluded.chained_at, hash = excluded.hash, "
        "pruned_at = excluded.pruned_at", last["seq"], last["chained_at"], last["hash"])
    await _guard_allows(connection, "")
    # The anchor's seq and hash in the chain itself: `verify` checks the anchor row against them.
    await append(connection, [Entry("admin", "journal.pruned", "carnet-journal-retention",
                                    detail={"through_seq": last["seq"], "anchor_hash": last["hash"].hex(),
                                            "removed": removed, "before": cutoff.isoformat()})])
    return int(removed)


async def verify(connection: asyncpg.Connection, *, chunk: int = 5000) -> tuple[int, Break | None]:
    """Walk the chain from its first kept entry; (entries checked, the first broken link or None).

    The anchor must be what the last `journal.pruned` entry says it set: an anchor moved forward (entries
    deleted with it, by hand) verifies from where it points, and only that entry, chained, tells."""
    anchor = await connection.fetchrow("SELECT seq, hash FROM journal_anchor")
    expected_seq, prev_hash = (anchor["seq"] + 1, anchor["hash"]) if anchor else (1, GENESIS)
    checked, pruned = 0, None
    while True:
        rows = await connection.fetch(
            f"SELECT {', '.join(_COLUMNS)} FROM journal_entry WHERE seq >= $1 ORDER BY seq LIMIT $2",  # noqa: S608
            expected_seq, chunk)
        for row in rows:
            problem = _check(row, expected_seq, prev_hash)
            if problem:
                return checked, Break(row["seq"], problem)
            prev_hash, expected_seq, checked = row["hash"], expected_seq + 1, checked + 1
            if row["action"] == "journal.pruned":
                pruned = row
        if len(rows) < chunk:
            return checked, _anchor_break(anchor, pruned)


def _anchor_break(anchor: Mapping[str, Any] | None, pruned: Mapping[str, Any] | None) -> Break | None:
    if anchor is None:
        return None  # entries 1.. are all there, or the walk already said which are missing
    if pruned is None:
        return Break(anchor["seq"], "the anchor has no journal.pruned entry after it")
    said = json.loads(pruned["detail"]) if isinstance(pruned["detail"], str) else pruned["detail"]
    hashed = anchor["hash"].hex()
    if said.get("through_seq") != anchor["seq"] or said.get("anchor_hash", hashed) != hashed:  # older: no hash
        return Break(pruned["seq"], f"the anchor (entry {anchor['seq']}) is not the one this journal.pruned entry set")
    return None


def _check(row: Mapping[str, Any], expected_seq: int, prev_hash: bytes) -> str | None:
    if row["seq"] != expected_seq:
        return f"entries {expected_seq}..{row['seq'] - 1} are missing"
    if row["prev_hash"] != prev_hash:
        return "its prev_hash is not the hash of the entry before it"
    values = _from_row(row)
    if link(prev_hash, row["seq"], row["chained_at"], values, row["refs_digest"]) != row["hash"]:
        return "its content does not match its hash (altered)"
    rewritten = any(ref.startswith(ERASED) for ref in row["refs"])
    if not rewritten and refs_digest(row["refs"]) != row["refs_digest"]:
        return "its contact references do not match their digest (altered)"
    return None


@dataclass(frozen=True, slots=True)
class JournalFilter:
    refs: Sequence[str] = ()          # any of these refs (a contact id, its erased digests)
    subject: str | None = None
    token_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None


async def contacts_holding(session: AsyncSession, *, email: str | None, phone: str | None) -> list[uuid.UUID]:
    """The contacts that hold this email or phone today (the journal's `email`/`phone` query)."""
    rows = await session.execute(text(
        "SELECT id FROM contact WHERE (CAST(:email AS text) IS NOT NULL AND email = :email) "
        "OR (CAST(:phone AS text) IS NOT NULL AND phone = :phone) LIMIT 100"), {"email": email, "phone": phone})
    return [r[0] for r in rows]


async def page(session: AsyncSession, query: JournalFilter, *, limit: int, before_seq: int | None) -> list[Any]:
    """Newest first, keyset on seq; one more row than `limit` tells whether a next page exists."""
    where, params = ["true"], {"limit": limit + 1}
    if query.refs:
        where.append("refs && CAST(:refs AS text[])")
        params["refs"] = list(query.refs)
    for name in ("subject", "token_id"):
        if getattr(query, name) is not None:
            where.append(f"{name} = :{name}")
            params[name] = getattr(query, name)
    if query.since is not None:
        where.append("at >= :since")
        params["since"] = query.since
    if query.until is not None:
        where.append("at < :until")
        params["until"] = query.until
    if before_seq is not None:
        where.append("seq < :before")
        params["before"] = before_seq
    rows = await session.execute(text(
        f"SELECT {', '.join(_COLUMNS)} FROM journal_entry WHERE {' AND '.join(where)} "  # noqa: S608 (fixed parts)
        "ORDER BY seq DESC LIMIT :limit"), params)
    return list(rows.mappings())
