"""Table models; importing this package registers every table on the shared metadata."""

from app import db as _db  # noqa: F401  (naming convention before any table is declared)
from app.models.attributes import AttributeDefinition, Tag
from app.models.consents import ConsentEvent
from app.models.contacts import Contact
from app.models.erasure_requests import ErasureRequest
from app.models.history import ContactHistory
from app.models.idempotency import IdempotencyRecord
from app.models.imports import ImportChunk, ImportJob, ImportKey, ImportReject
from app.models.journal import JournalAnchor, JournalEntry, JournalErasure, JournalPending
from app.models.lists import ListMembership, MailingList
from app.models.merges import ContactMerge
from app.models.orders import Cart, Event, EventKey, Order
from app.models.outbox import OutboxMessage
from app.models.segments import Segment, SegmentMember, SegmentSync
from app.models.suppressions import Suppression
from app.models.sync import CommerceRecord, Delivery, Destination, SyncLink, WorkerHeartbeat
from app.models.tokens import AccessToken

__all__ = [
    "AccessToken",
    "AttributeDefinition",
    "Cart",
    "CommerceRecord",
    "ConsentEvent",
    "Contact",
    "ContactHistory",
    "ContactMerge",
    "Delivery",
    "Destination",
    "ErasureRequest",
    "Event",
    "EventKey",
    "IdempotencyRecord",
    "ImportChunk",
    "ImportJob",
    "ImportKey",
    "ImportReject",
    "JournalAnchor",
    "JournalEntry",
    "JournalErasure",
    "JournalPending",
    "ListMembership",
    "MailingList",
    "Order",
    "OutboxMessage",
    "Segment",
    "SegmentMember",
    "SegmentSync",
    "Suppression",
    "SyncLink",
    "Tag",
    "WorkerHeartbeat",
]
