"""Destinations: where Carnet's changes go (Brevo, Mailchimp, a webhook receiver), and what they are owed.

Secrets live in one encrypted column (app.security.secrets); `config` keeps only what may be shown.
"""

from __future__ import annotations

import base64
import secrets as random
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import SecretStr, ValidationError
from sqlalchemy import Text, delete, distinct, func, literal, select, text, true
from sqlalchemy import update as update_statement
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import Conflict, FieldError, InvalidInput, NotFound, PreconditionFailed
from app.models import Delivery, Destination, ListMembership, MailingList, SegmentMember, SyncLink
from app.models.base import new_id, utc_now
from app.models.sync import RetiredRef
from app.problems import validation_problem
from app.schemas.destinations import (
    SECRET_FIELDS,
    DestinationCreate,
    DestinationKind,
    DestinationPatch,
    ListMapping,
    SegmentMapping,
    config_model,
)
from app.security import Principal, Scope
from app.security.secrets import SecretBox
from app.services import delivery as delivery_service
from app.services import journal, secret_targets, segment_sync
from app.services.pagination import Cursor, CursorCodec, page_by_name
from app.sync import ids as vendor_ids

__all__ = [
    "DeliveryNotFound",
    "DestinationNotFound",
    "DestinationOwesErasures",
    "DuplicateDestination",
    "Loaded",
    "create",
    "delete_destination",
    "deliveries_page",
    "describe",
    "get",
    "list_page",
    "load",
    "new_webhook_secret",
    "present",
    "resync",
    "retry_delivery",
    "rotate_secrets",
    "update",
]

Row = Mapping[str, Any]
_t = Destination.__table__  # type: ignore[attr-defined]
_deliveries = Delivery.__table__  # type: ignore[attr-defined]
_links = SyncLink.__table__  # type: ignore[attr-defined]
_retired = RetiredRef.__table__  # type: ignore[attr-defined]
_lists = MailingList.__table__  # type: ignore[attr-defined]
_members = ListMembership.__table__  # type: ignore[attr-defined]
_segment_members = SegmentMember.__table__  # type: ignore[attr-defined]


class DestinationNotFound(NotFound):
    slug, title = "destination-not-found", "No such destination"


class DeliveryNotFound(NotFound):
    slug, title = "delivery-not-found", "No such delivery"


class DuplicateDestination(Conflict):
    slug, title = "duplicate-destination", "A destination with this name already exists"


class DestinationOwesErasures(Conflict):
    slug, title = "destination-owes-erasures", "This destination still holds people erased in Carnet"


def new_webhook_secret() -> str:
    """Standard Webhooks: `whsec_` + base64 of 24 random bytes."""
    return "whsec_" + base64.b64encode(random.token_bytes(24)).decode()


@dataclass(frozen=True, slots=True)
class Loaded:
    """A destination as the worker needs it: row, decrypted secrets, mappings by list."""

    row: Row
    secrets: dict[str, str]
    bound: dict[str, str] = field(default_factory=dict)   # secret name -> the address it was given for

    @property
    def id(self) -> uuid.UUID:
        return self.row["id"]

    @property
    def kind(self) -> str:
        return self.row["kind"]

    @property
    def config(self) -> dict[str, Any]:
        return {**self.row["config"], **self.secrets}

    def refusal(self) -> str | None:
        """Why the worker must not use this destination as stored (None: it may): a secret that would now go
        elsewhere than where it was given for, or a remote list id the vendor does not document (both checked
        when given through the API: this catches rows changed behind it, or stored before the checks)."""
        moved = secret_targets.unbound(self.kind, self.config, self.bound)
        if moved:
            return (f"{', '.join(moved)} was given for another address than the one configured now: give it again "
                    "(PATCH config) to send it there")
        invalid = [f"{name}[{i}].remote_list_id" for name in ("list_mappings", "segment_mappings")
                   for i, m in enumerate(self.row[name]) if m.get("remote_list_id") is not None
                   and vendor_ids.list_id_problem(self.kind, m["remote_list_id"])]
        if invalid:
            return f"{', '.join(invalid)}: not a list id of this vendor; fix the mapping"
        return None


# The sealed secrets carry, under this name, the address each sent secret was given for (app.services.secret_targets).
_TARGETS = "_targets"


def _open(box: SecretBox, token: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """(secrets, their targets) of a destination's sealed column."""
    opened = box.open(token)
    bound = opened.pop(_TARGETS, None) or {}
    return opened, bound


def _seal(box: SecretBox, secrets: Mapping[str, str], bound: Mapping[str, str]) -> str:
    return box.seal({**secrets, _TARGETS: dict(bound)})


def _split_config(kind: DestinationKind, raw: Mapping[str, Any], *, field: str = "config") -> tuple[dict, dict]:
    """Validate a config for its kind; return (public part, secret part)."""
    try:
        parsed = config_model(kind).model_validate(dict(raw))
    except ValidationError as exc:
        raise validation_problem(exc.errors(), prefix=(field,)) from None
    public: dict[str, Any] = {}
    hidden: dict[str, str] = {}
    for name, value in parsed.model_dump(mode="json", exclude_none=True).items():
        if name in SECRET_FIELDS:
            secret = getattr(parsed, name)
            hidden[name] = secret.get_secret_value() if isinstance(secret, SecretStr) else str(value)
        else:
            public[name] = value
    return public, hidden


def _check_required(kind: DestinationKind, public: Mapping[str, Any], hidden: Mapping[str, Any]) -> None:
    # A webhook without a signing secret could not be sent (nor verified): removing the last one is refused.
    needed = {"brevo": ("api_key",), "mailchimp": ("api_key",), "webhook": ("url", "secret")}[kind.value]
    missing = [n for n in needed if n not in public and n not in hidden]
    errors = [FieldError(f"config.{n}", "required for this kind", "missing") for n in missing]
    if kind is DestinationKind.MAILCHIMP and (public.get("push_orders") or public.get("push_carts")) \
            and "store_id" not in public:  # orders and carts live in a store
        errors.append(FieldError("config.store_id", "required to push orders or carts to Mailchimp", "missing"))
    if kind is DestinationKind.MAILCHIMP and "api_key" in hidden and not public.get("base_url") \
            and secret_targets.api_url(kind.value, {**public, **hidden}) is None:  # nowhere to send it
        errors.append(FieldError("config.api_key", "a Mailchimp API key ends with its data center (like -us6), "
                                 "unless base_url names the API", "invalid"))
    if errors:
        raise InvalidInput(*errors)


async def _check_lists(session: AsyncSession, kind: DestinationKind, mappings: list[ListMapping]) -> None:
    """Each mapped list exists, and its remote id is in the vendor's format (it goes in vendor URLs)."""
    wanted = [m.list_id for m in mappings]
    found = set((await session.scalars(select(_lists.c.id).where(_lists.c.id.in_(wanted)))).all()) if wanted else set()
    errors = [FieldError(f"list_mappings[{i}].list_id", "no such list", "not_found")
              for i, m in enumerate(mappings) if m.list_id not in found]
    errors += [FieldError(f"list_mappings[{i}].remote_list_id", problem, "invalid")
               for i, m in enumerate(mappings) if (problem := vendor_ids.list_id_problem(kind.value, m.remote_list_id))]
    if errors:
        raise InvalidInput(*errors)


async def describe(session: AsyncSession, row: Row, *, box: SecretBox, public_base_url: str) -> dict[str, Any]:
    """The read model: the row without secrets, its health and its segment snapshots."""
    return present(row, box=box, public_base_url=public_base_url, counts=await counts(session, row["id"]),
                   segments=await segment_sync.state(session, row["id"]))


def present(
    row: Row, *, box: SecretBox, public_base_url: str, counts: Mapping[str, int], segments: Mapping[uuid.UUID, Row]
) -> dict[str, Any]:
    kind = row["kind"]
    return {
        "id": row["id"], "kind": kind, "name": row["name"], "enabled": row["enabled"], "config": row["config"],
        "secrets_set": sorted(_open(box, row["secrets"])[0]), "list_mappings": row["list_mappings"],
        "segment_mappings": [_segment_mapping(m, segments.get(uuid.UUID(m["segment_id"])))
                             for m in row["segment_mappings"]],
        "field_mappings": row["field_mappings"],
        "inbound_url": None if kind == "webhook" else f"{public_base_url.rstrip('/')}/v1/inbound/{kind}/{row['id']}",
        "health": {
            "last_success_at": row["last_success_at"], "last_error_at": row["last_error_at"],
            "last_error": row["last_error"], "consecutive_failures": row["consecutive_failures"],
            "disabled_reason": row["disabled_reason"], "pending": counts.get("pending", 0) + counts.get("in_flight", 0),
            "dead": counts.get("dead", 0),
        },
        "created_at": row["created_at"], "updated_at": row["updated_at"], "version": row["version"],
    }


def _segment_mapping(mapping: Row, snapshot: Row | None) -> dict[str, Any]:
    return {**mapping, "members": snapshot["members"] if snapshot else 0,
            **{k: snapshot[k] if snapshot else None for k in ("refreshed_at", "last_error", "failed_at")}}


async def counts(session: AsyncSession, destination_id: uuid.UUID) -> dict[str, int]:
    rows = await session.execute(
        select(_deliveries.c.status, func.count())
        .where(_deliveries.c.destination_id == destination_id, _deliveries.c.status != "delivered")
        .group_by(_deliveries.c.status)
    )
    return dict(tuple(r) for r in rows)


async def create(
    session: AsyncSession, data: DestinationCreate, *, box: SecretBox, actor: Principal
) -> tuple[Row, dict[str, str]]:
    """Returns the row and the secrets Carnet generated (to show once)."""
    public, hidden = _split_config(data.kind, data.config)
    generated: dict[str, str] = {}
    if "inbound_secret" not in hidden:
        generated["inbound_secret"] = hidden["inbound_secret"] = random.token_urlsafe(32)
    if data.kind is DestinationKind.WEBHOOK and "secret" not in hidden:
        generated["secret"] = hidden["secret"] = new_webhook_secret()
    _check_required(data.kind, public, hidden)
    await _check_lists(session, data.kind, data.list_mappings)
    list_mappings = [m.model_dump(mode="json") for m in data.list_mappings]
    await segment_sync.check_mappings(session, data.kind.value, data.segment_mappings, list_mappings=list_mappings)
    now = utc_now()
    values = {
        "id": new_id(), "kind": data.kind.value, "name": data.name, "enabled": data.enabled, "config": public,
        "secrets": _seal(box, hidden, secret_targets.targets(data.kind.value, {**public, **hidden})),
        "list_mappings": list_mappings,
        "segment_mappings": _dump_segment_mappings(data.segment_mappings),
        "field_mappings": data.field_mappings, "consecutive_failures": 0, "version": 1, "created_at": now,
        "updated_at": now,
    }
    statement = insert(_t).values(values).on_conflict_do_nothing().returning(*_t.c)
    row = (await session.execute(statement)).mappings().first()
    if row is None:
        existing = await session.scalar(select(_t.c.id).where(_t.c.name == data.name))
        raise DuplicateDestination(f"a destination named {data.name!r} already exists", existing_id=existing)
    await segment_sync.apply_mappings(session, row["id"], [m.segment_id for m in data.segment_mappings])
    await _journal_secrets(session, actor, row, sorted(hidden))
    if data.list_mappings or data.segment_mappings:
        # The mapped lists' members go to the vendor (the segments' once the worker takes their snapshot): who
        # sent the file, and how many people, is an act (docs/gdpr.md). The count, never the ids: unbounded.
        await journal.record(session, journal.act(
            actor, "destinations.created", count=await _mapped_members(session, row), detail={
                "destination_id": str(row["id"]), "kind": row["kind"], "lists": len(data.list_mappings),
                "segments": len(data.segment_mappings)}))
    return row, generated


async def _mapped_members(session: AsyncSession, row: Row) -> int:
    """How many people the destination's mapped lists hold (distinct): whose data it sends."""
    list_ids = [uuid.UUID(m["list_id"]) for m in row["list_mappings"]]
    return await session.scalar(select(func.count(distinct(_members.c.contact_id)))
                                .where(_members.c.list_id.in_(list_ids))) or 0


async def _journal_secrets(session: AsyncSession, actor: Principal, row: Row, keys: list[str]) -> None:
    """Destination secrets set or changed are an administrative act (docs/gdpr.md "Access journal"): which keys,
    never their values."""
    if keys:
        await journal.record(session, journal.act(actor, "destinations.secrets_set", detail={
            "destination_id": str(row["id"]), "kind": row["kind"], "keys": keys}))


def _dump_segment_mappings(mappings: list[SegmentMapping]) -> list[dict[str, Any]]:
    return [_dump(m) for m in mappings]


def _dump(mapping: SegmentMapping) -> dict[str, Any]:
    return mapping.model_dump(mode="json", exclude_none=True)


async def rotate_secrets(session: AsyncSession, *, box: SecretBox) -> int:
    """Every destination's secrets under the box's first key (SecretsUnreadable if a key is missing)."""
    rows = (await session.execute(select(_t.c.id, _t.c.secrets).where(_t.c.secrets.is_not(None))
                                  .with_for_update())).all()
    for destination_id, token in rows:
        await session.execute(update_statement(_t).where(_t.c.id == destination_id).values(secrets=box.rotate(token)))
    return len(rows)


async def get(session: AsyncSession, destination_id: uuid.UUID, *, lock: bool = False) -> Row:
    query = select(_t).where(_t.c.id == destination_id)
    row = (await session.execute(query.with_for_update() if lock else query)).mappings().first()
    if row is None:
        raise DestinationNotFound(f"no destination with id {destination_id}")
    return row


async def load(session: AsyncSession, destination_id: uuid.UUID, *, box: SecretBox) -> Loaded:
    row = await get(session, destination_id)
    return Loaded(row, *_open(box, row["secrets"]))


async def list_page(
    session: AsyncSession, *, limit: int, cursor: str | None, codec: CursorCodec
) -> tuple[list[Row], str | None]:
    """Destinations by name (keyset on the unique name)."""
    return await page_by_name(session, select(_t), _t.c.name, sort="destinations:name",
                              limit=limit, cursor=cursor, codec=codec)


_MAPPINGS = ("field_mappings", "list_mappings", "segment_mappings")  # what a destination sends, and whose


async def update(
    session: AsyncSession, destination_id: uuid.UUID, patch: DestinationPatch, *, box: SecretBox,
    expected_version: int | None, actor: Principal,
) -> Row:
    current = await get(session, destination_id, lock=True)
    if expected_version is not None and current["version"] != expected_version:
        raise PreconditionFailed(f"the destination is at version {current['version']}",
                                 current_version=current["version"])
    kind = DestinationKind(current["kind"])
    changes: dict[str, Any] = {}
    secret_keys: list[str] = []
    given = patch.model_dump(exclude_unset=True)
    if "config" in given:
        secrets, bound = _open(box, current["secrets"])
        merged = {**current["config"], **secrets}
        # Sealed before targets were: bound to where they went until now.
        bound = {**secret_targets.targets(kind.value, merged), **bound}
        for key, value in (patch.config or {}).items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        public, hidden = _split_config(kind, merged)
        _check_required(kind, public, hidden)
        given_keys = {key for key, value in (patch.config or {}).items() if value is not None}
        bound = secret_targets.rebind(kind.value, {**public, **hidden}, bound=bound, given=given_keys)
        changes["config"], changes["secrets"] = public, _seal(box, hidden, bound)
        secret_keys = sorted(k for k, v in (patch.config or {}).items() if k in hidden or (v is None and k in secrets))
    if patch.list_mappings is not None:
        await _check_lists(session, kind, patch.list_mappings)
        changes["list_mappings"] = [m.model_dump(mode="json") for m in patch.list_mappings]
    if patch.list_mappings is not None or patch.segment_mappings is not None:
        # Checked against the lists it will have (a Mailchimp segment tags the members of a mapped audience).
        segment_mappings = patch.segment_mappings
        if segment_mappings is None:
            segment_mappings = [SegmentMapping.model_validate(m) for m in current["segment_mappings"]]
        await segment_sync.check_mappings(session, kind.value, segment_mappings,
                                          list_mappings=changes.get("list_mappings", current["list_mappings"]))
        changes["segment_mappings"] = _dump_segment_mappings(segment_mappings)
        before = {m["segment_id"]: m for m in current["segment_mappings"]}
        retargeted = [m.segment_id for m in segment_mappings if before.get(str(m.segment_id)) != _dump(m)]
        await segment_sync.apply_mappings(session, destination_id, [m.segment_id for m in segment_mappings],
                                          fresh=retargeted)
    for name in ("name", "enabled", "field_mappings"):
        if name in given:
            changes[name] = given[name]
    if changes.get("enabled") and not current["enabled"]:
        changes.update(disabled_reason=None, consecutive_failures=0)  # switched back on: a fresh start
    if "name" in changes and changes["name"] != current["name"]:
        taken = await session.scalar(select(_t.c.id).where(_t.c.name == changes["name"], _t.c.id != destination_id))
        if taken is not None:
            raise DuplicateDestination(f"a destination named {changes['name']!r} already exists", existing_id=taken)
    if changes:
        await session.execute(update_statement(_t).where(_t.c.id == destination_id)
                              .values(**changes, version=_t.c.version + 1, updated_at=utc_now()))
    row = await get(session, destination_id)
    await _journal_secrets(session, actor, row, secret_keys)
    remapped = [name for name in _MAPPINGS if name in changes and changes[name] != current[name]]
    if remapped:
        # Whose data, and which of it, goes to the vendor changed: an act like the destination's creation
        # (docs/gdpr.md "Access journal"). The mapped lists' members counted, Carnet's field names, no value.
        await journal.record(session, journal.act(
            actor, "destinations.mappings_changed", count=await _mapped_members(session, row), detail={
                "destination_id": str(destination_id), "kind": row["kind"], "changed": remapped,
                "lists": len(row["list_mappings"]), "segments": len(row["segment_mappings"]),
                "fields": sorted(row["field_mappings"])}))
    return row


async def delete_destination(
    session: AsyncSession, destination_id: uuid.UUID, *, expected_version: int | None, actor: Principal
) -> None:
    """Its deliveries and remote references go with it; the vendor's copy is left as it is.

    Refused (409) while it still holds people erased in Carnet: their remote references are the only way to
    delete them there, and the erasure deliveries need the destination's credentials. Enable it and let the
    worker delete them (a dead erasure: retry it, or resync), then delete it."""
    current = await get(session, destination_id, lock=True)
    if expected_version is not None and current["version"] != expected_version:
        raise PreconditionFailed(f"the destination is at version {current['version']}",
                                 current_version=current["version"])
    owed = await delivery_service.erasures_owed(session, destination_id)
    if owed and not actor.reads(Scope.DESTINATIONS_READ):  # the count is its health's: destinations:read (11)
        raise DestinationOwesErasures("people erased in Carnet may still be held by this destination: enable it "
                                      "and let the worker delete them there first")
    if owed:
        raise DestinationOwesErasures(
            f"{owed} people erased in Carnet may still be held by this destination: enable it and let the worker "
            "delete them there first", erasures_owed=owed)
    await session.execute(delete(_t).where(_t.c.id == destination_id))


async def deliveries_page(
    session: AsyncSession, destination_id: uuid.UUID, *, status: str | None, limit: int, cursor: str | None,
    codec: CursorCodec,
) -> tuple[list[Row], str | None]:
    """Newest first (keyset on the id)."""
    await get(session, destination_id)
    query = select(_deliveries).where(_deliveries.c.destination_id == destination_id)
    if status:
        query = query.where(_deliveries.c.status == status)
    if cursor:
        query = query.where(_deliveries.c.id < int(codec.decode(cursor, sort="deliveries:id").value))
    rows = list((await session.execute(query.order_by(_deliveries.c.id.desc()).limit(limit + 1))).mappings())
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    return rows[:limit], codec.encode(Cursor("deliveries:id", last["id"], str(last["id"])))


async def retry_delivery(session: AsyncSession, delivery_id: int) -> Row:
    """A dead (or waiting) delivery goes back in the queue now, with a fresh count of attempts.

    A dead vendor delivery whose contact already has a newer pending push is folded into that one.
    """
    row = (await session.execute(select(_deliveries).where(_deliveries.c.id == delivery_id).with_for_update())
           ).mappings().first()
    if row is None:
        raise DeliveryNotFound(f"no delivery with id {delivery_id}")
    if row["status"] in ("delivered", "in_flight"):
        return row
    now = utc_now()
    if row["coalesces"] and row["status"] == "dead":
        newer = (await session.execute(select(_deliveries).where(
            _deliveries.c.destination_id == row["destination_id"], _deliveries.c.contact_id == row["contact_id"],
            _deliveries.c.status == "pending", _deliveries.c.coalesces,
        ).with_for_update())).mappings().first()
        if newer is not None:  # it takes over what the dead one was about (explicit list statuses, a profile change)
            await session.execute(update_statement(_deliveries).where(_deliveries.c.id == newer["id"]).values(
                next_attempt_at=now, updated_at=now, profile_changed=newer["profile_changed"] or row["profile_changed"],
                changed_lists=sorted({*newer["changed_lists"], *row["changed_lists"]})))
            await session.execute(update_statement(_deliveries).where(_deliveries.c.id == delivery_id).values(
                status="delivered", last_error=f"superseded by delivery {newer['id']}", updated_at=now,
                delivered_at=now))
            return (await session.execute(select(_deliveries).where(_deliveries.c.id == newer["id"]))).mappings().one()
    return (await session.execute(
        update_statement(_deliveries).where(_deliveries.c.id == delivery_id)
        .values(status="pending", attempts=0, next_attempt_at=now, lease_until=None, updated_at=now)
        .returning(*_deliveries.c)
    )).mappings().one()


async def resync(session: AsyncSession, destination_id: uuid.UUID, *, actor: Principal) -> int:
    """Queue a full push of every contact in the mapped lists or synced segments, and every one pushed before.

    A contact pushed before and gone since is queued too: its delivery is the erasure (or archive) still owed,
    so a resync also retries every erasure that ended dead."""
    row = await get(session, destination_id)
    if row["kind"] == "webhook":
        raise InvalidInput.one("kind", "a webhook receives events as they happen; there is no state to resync",
                               "not_resyncable")
    list_ids = [uuid.UUID(m["list_id"]) for m in row["list_mappings"]]
    now = utc_now()
    contacts = (
        select(_members.c.contact_id).where(_members.c.list_id.in_(list_ids))
        .union(select(_links.c.contact_id).where(_links.c.destination_id == destination_id),
               select(_retired.c.contact_id).where(_retired.c.destination_id == destination_id),
               select(_segment_members.c.contact_id).where(_segment_members.c.destination_id == destination_id))
        .subquery()
    )
    queued = select(
        literal(destination_id).label("destination_id"), contacts.c.contact_id, literal(0).label("message_id"),
        literal("destination.resync").label("topic"), true().label("coalesces"),
        true().label("profile_changed"),
        # No list counts as changed: statuses go "if new", never re-subscribing a vendor-side unsubscribe.
        literal([], ARRAY(Text)).label("changed_lists"), literal("pending").label("status"),
        literal(0).label("attempts"), literal(now).label("next_attempt_at"), literal(now).label("created_at"),
        literal(now).label("updated_at"),
    )
    statement = (
        insert(_deliveries)
        .from_select([c.name for c in queued.selected_columns], queued)
        .on_conflict_do_nothing(index_elements=["destination_id", "contact_id"],
                                index_where=text("status = 'pending' AND coalesces"))
    )
    queued = (await session.execute(statement)).rowcount or 0
    # The whole file to the vendor: journaled with who asked and how many (the count, never the ids).
    await journal.record(session, journal.act(actor, "destinations.resynced", count=queued, detail={
        "destination_id": str(destination_id), "kind": row["kind"]}))
    return queued

