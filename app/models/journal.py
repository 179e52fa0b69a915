"""The access journal: who read, exported or changed whose personal data (docs/gdpr.md "Access journal").

`journal_entry` is the hash chain: `seq` orders it, each entry's `hash` covers its predecessor's. Entries are
only ever appended (app.services.journal.append, under one advisory lock) and removed as a whole old prefix
by retention; the one rewrite is erasure's, which swaps a person's contact id in `refs` for the keyed digest
of their address (`refs_digest` keeps the chain verifiable through it).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import BigInteger, CheckConstraint, Column, Identity, Index, LargeBinary, Text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlmodel import Field, SQLModel

from app.models.base import TZ, utc_now

__all__ = ["JournalAnchor", "JournalEntry", "JournalErasure", "JournalPending"]

KINDS = "kind IN ('read', 'export', 'admin')"


class JournalEntry(SQLModel, table=True):
    __tablename__: ClassVar[str] = "journal_entry"  # type: ignore[misc]
    __table_args__ = (
        CheckConstraint(KINDS, name="kind"),
        Index("ix_journal_entry_refs", "refs", postgresql_using="gin"),
        Index("ix_journal_entry_subject_seq", "subject", "seq"),
        Index("ix_journal_entry_token_id_seq", "token_id", "seq"),
        Index("ix_journal_entry_at", "at"),
    )

    seq: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    chained_at: datetime = Field(sa_type=TZ)   # when it joined the chain: never decreases along `seq`
    at: datetime = Field(sa_type=TZ)           # when the access or act happened
    kind: str
    action: str                                # e.g. contacts.read, exports.contacts, tokens.created
    subject: str                               # the token's subject (or the CLI's operator)
    token_id: str | None = None
    role: str | None = None
    route: str | None = None                   # the route template, never the raw path
    request_id: str | None = None
    client_addr: str | None = None
    refs: list[str] = Field(default_factory=list, sa_column=Column(ARRAY(Text), nullable=False))
    ref_count: int = 0                         # contacts answered, or rows exported
    detail: Any = Field(default=None, sa_column=Column(JSONB(none_as_null=True)))
    refs_digest: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    prev_hash: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    hash: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class JournalPending(SQLModel, table=True):
    """Acts journaled inside the transaction that does them; chained by the next append (never held long)."""

    __tablename__: ClassVar[str] = "journal_pending"  # type: ignore[misc]
    __table_args__ = (CheckConstraint(KINDS, name="kind"),)

    id: int | None = Field(default=None, sa_column=Column(BigInteger, Identity(), primary_key=True))
    at: datetime = Field(default_factory=utc_now, sa_type=TZ)
    kind: str
    action: str
    subject: str
    token_id: str | None = None
    role: str | None = None
    route: str | None = None
    request_id: str | None = None
    client_addr: str | None = None
    refs: list[str] = Field(default_factory=list, sa_column=Column(ARRAY(Text), nullable=False))
    ref_count: int = 0
    detail: Any = Field(default=None, sa_column=Column(JSONB(none_as_null=True)))


class JournalErasure(SQLModel, table=True):
    """Contacts erased a moment ago: a read buffered before the erasure is chained under the person's digest.

    Kept JOURNAL_ERASURE_HOLD_SECONDS (longer than any buffer waits), then removed by retention."""

    __tablename__: ClassVar[str] = "journal_erasure"  # type: ignore[misc]

    contact_id: uuid.UUID = Field(primary_key=True)
    refs: list[str] = Field(sa_column=Column(ARRAY(Text), nullable=False))
    erased_at: datetime = Field(default_factory=utc_now, sa_type=TZ)


class JournalAnchor(SQLModel, table=True):
    """The last entry retention removed: the chain verifies from the first kept entry against it."""

    __tablename__: ClassVar[str] = "journal_anchor"  # type: ignore[misc]
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: int = Field(default=1, primary_key=True)
    seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    chained_at: datetime = Field(sa_type=TZ)
    hash: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    pruned_at: datetime = Field(default_factory=utc_now, sa_type=TZ)
