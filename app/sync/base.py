"""What the worker hands to a destination adapter, and what an adapter may answer.

Vendors (Brevo, Mailchimp) are synced by *state*: for each contact the worker reads Carnet's current
state and the adapter makes the remote side equal to it, so retries and replays are harmless and a
burst of changes to one contact costs one push. The generic webhook is synced by *event*: each outbox
message is posted as it was written.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from app.sync.commerce import CommerceState, Record

__all__ = [
    "Adapter",
    "ContactState",
    "DeliveryFailed",
    "Erasure",
    "EventMessage",
    "Gone",
    "MemberStatus",
    "Outcome",
    "RetryLater",
    "WebhookAdapter",
]

MemberStatus = Literal["subscribed", "unsubscribed", "pending"]


@dataclass(frozen=True, slots=True)
class ContactState:
    """Carnet's current view of one contact, already translated through the destination's mappings."""

    contact_id: uuid.UUID
    email: str                                  # normalized (lower-case) address; contacts without one are not synced
    fields: Mapping[str, Any]                   # vendor field/merge-field name -> value (field_mappings applied)
    lists: Mapping[str, MemberStatus]           # remote_list_id -> wanted status, for every mapped list it is in
    tags: Sequence[str] = ()
    # email_marketing consent withdrawn, bounced or complained: the vendor's global opt-out.
    marketing_blocked: bool = False
    # The remote identity known from an earlier push (Mailchimp subscriber hash, Brevo contact id), so an
    # address change moves that record rather than making a second one. None on the first push. The worker
    # knows no former address, only this: Mailchimp's hash differs from md5(email) when the address changed, and
    # Brevo's profile write renames the contact by id (attributes.EMAIL) whatever it was.
    remote_ref: str | None = None
    # The address of the previous push, when the caller knows it (the worker does not keep addresses: remote_ref).
    previous_email: str | None = None
    # Lists whose subscription should go through the vendor's double opt-in (destination setting).
    vendor_double_opt_in: frozenset[str] = field(default_factory=frozenset)
    # What changed since the last successful push, when the worker knows it (added for the adapters;
    # the defaults mean "unknown", and adapters then write everything, which is always correct):
    # False when only list memberships changed, so the profile write (fields, blacklist, tags) may be skipped.
    profile_changed: bool = True
    # Remote list ids whose wanted status changed; None: unknown (first push, resync). Mailchimp sends an
    # explicit `status` only for these, `status_if_new` for the rest.
    status_changed: frozenset[str] | None = None
    # Tags removed in Carnet since the last push (Mailchimp marks them inactive).
    removed_tags: Sequence[str] = ()
    # Synced segments shown as tags (Mailchimp): remote list id -> {tag: active?}, for that audience's member only.
    segment_tags: Mapping[str, Mapping[str, bool]] = field(default_factory=dict)
    # Orders, carts, events and products this push owes the vendor's e-commerce side (app/sync/commerce.py).
    commerce: CommerceState | None = None


@dataclass(frozen=True, slots=True)
class Erasure:
    """Delete a person at the vendor (GDPR erasure). Only the remote references survive in Carnet.

    `remote_ref` None: no record of the person's own is left to delete (never pushed, or its record is another
    contact's now), only their `commerce` records, which must go all the same.
    `other_refs`: more records of the same person at that vendor, deleted permanently too (Mailchimp members
    archived when an address was retired: by a merge into this contact, or a change the vendor could not move).
    `archive`: not an erasure but a contact merged into another one under another address. Its remote record
    goes, but the address must stay usable (Mailchimp archives instead of deleting permanently, and says so in
    `Outcome.retired`, so that the person's erasure can delete it one day).
    """

    contact_id: uuid.UUID
    remote_ref: str | None
    archive: bool = False
    other_refs: tuple[str, ...] = ()
    # (kind, ref) of the commerce records the vendor holds of the person and of every contact merged into them
    # (sync_commerce): Mailchimp deletes the carts, orders and customer, in that order; Brevo's API deletes none.
    commerce: tuple[tuple[str, str], ...] = ()

    @property
    def refs(self) -> tuple[str, ...]:
        return tuple(ref for ref in dict.fromkeys((self.remote_ref, *self.other_refs)) if ref is not None)


@dataclass(frozen=True, slots=True)
class Outcome:
    """Per contact: done (with its new remote_ref) or failed for good (the reason goes to the dead letter)."""

    contact_id: uuid.UUID
    remote_ref: str | None = None
    error: str | None = None                    # set: permanent failure for this contact only
    # Records of this contact the vendor keeps (archived) though they no longer carry its current address: the
    # worker remembers them (sync_retired_ref) until the person's erasure deletes them permanently.
    retired: tuple[str, ...] = ()
    # Commerce records the vendor took with this push (remembered in sync_commerce).
    commerce: tuple[Record, ...] = ()


class DeliveryFailed(Exception):
    """The whole call failed; the worker retries the batch later with backoff (or dead-letters it)."""

    def __init__(self, reason: str, *, permanent: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


class RetryLater(DeliveryFailed):
    """The vendor asked us to wait (429, Retry-After, x-sib-ratelimit-reset)."""

    def __init__(self, reason: str, *, after_seconds: float) -> None:
        super().__init__(reason)
        self.after_seconds = after_seconds


class Gone(DeliveryFailed):
    """The endpoint says it no longer wants deliveries (webhook 410): disable the destination."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, permanent=True)


class Adapter(Protocol):
    """A vendor adapter: push states and erasures in as few calls as the vendor allows."""

    async def push(self, states: Sequence[ContactState]) -> list[Outcome]: ...

    async def erase(self, erasures: Sequence[Erasure]) -> list[Outcome]: ...


@dataclass(frozen=True, slots=True)
class EventMessage:
    """One outbox message as a webhook receiver sees it (ids, never more personal data than the topic needs)."""

    id: str                                     # stable across retries: the `webhook-id`
    topic: str
    created_at: str                             # RFC 3339
    payload: Mapping[str, Any]


class WebhookAdapter(Protocol):
    async def send(self, message: EventMessage) -> None: ...
