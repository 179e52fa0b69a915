"""CSV import jobs: the job row (a work-queue entry with a lease), the uploaded file in chunks, the reject
report, and the keys already seen in a file (duplicates inside a file are found across batches and resumes)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import BigInteger, CheckConstraint, Column, ForeignKey, Identity, Index, LargeBinary, Text, Uuid
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlmodel import Field, SQLModel

from app.models.base import TZ, new_id, utc_now

__all__ = ["ImportChunk", "ImportJob", "ImportKey", "ImportReject"]


class ImportJob(SQLModel, table=True):
    """One uploaded file and its processing state; claimed by workers with FOR UPDATE SKIP LOCKED and a lease."""

    __tablename__: ClassVar[str] = "import_job"  # type: ignore[misc]
    __table_args__ = (
        CheckConstraint("status IN ('queued', 'running', 'done', 'failed')", name="status"),
        CheckConstraint("mode IN ('upsert', 'create_only', 'update_only')", name="mode"),
        Index("ix_import_job_status_lease_until", "status", "lease_until"),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    status: str = "queued"
    subject: str                                        # token subject of who imported: history's actor
    filename: str | None = None
    size_bytes: int = Field(default=0, sa_type=BigInteger)
    chunks: int = 0
    encoding: str                                       # utf-8-sig | utf-8 | cp1252 (detected at upload)
    delimiter: str
    header: list[str] = Field(sa_column=Column(JSONB, nullable=False))
    mapping: dict[str, str] = Field(sa_column=Column(JSONB, nullable=False))  # column index (as text) → field
    mode: str = "upsert"
    list_id: uuid.UUID | None = None                    # no foreign key: checked when the job runs
    tags: list[str] = Field(default_factory=list, sa_column=Column(ARRAY(Text), nullable=False))
    consent: Any = Field(default=None, sa_column=Column(JSONB(none_as_null=True)))
    blank_erases: bool = False
    dry_run: bool = False
    total_rows: int | None = None
    processed_rows: int = 0                             # = the checkpoint: rows fully handled and committed
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped: int = 0
    rejected: int = 0
    subscribed: int = 0
    attempts: int = 0
    lease_owner: str | None = None
    lease_until: datetime | None = Field(default=None, sa_type=TZ)
    error: str | None = None
    created_at: datetime = Field(default_factory=utc_now, sa_type=TZ)
    started_at: datetime | None = Field(default=None, sa_type=TZ)
    finished_at: datetime | None = Field(default=None, sa_type=TZ)
    updated_at: datetime = Field(default_factory=utc_now, sa_type=TZ)


class ImportChunk(SQLModel, table=True):
    """~1 MB of the uploaded file; API and worker may run on different machines, so the file lives here."""

    __tablename__: ClassVar[str] = "import_chunk"  # type: ignore[misc]

    import_id: uuid.UUID = Field(
        sa_column=Column(Uuid, ForeignKey("import_job.id", ondelete="CASCADE"), primary_key=True))
    seq: int = Field(primary_key=True)
    data: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class ImportReject(SQLModel, table=True):
    """One problem with one row (or one cell) of a file: the reject report."""

    __tablename__: ClassVar[str] = "import_reject"  # type: ignore[misc]
    __table_args__ = (Index("ix_import_reject_import_id_row_number", "import_id", "row_number"),)

    id: int | None = Field(default=None, sa_column=Column(BigInteger, Identity(), primary_key=True))
    import_id: uuid.UUID = Field(
        sa_column=Column(Uuid, ForeignKey("import_job.id", ondelete="CASCADE"), nullable=False))
    row_number: int                                     # line of the record in the file (header = 1)
    column: str | None = None                           # the file's column name; None: the whole row
    reason: str
    value: str | None = None


class ImportKey(SQLModel, table=True):
    """An email or external_id already seen in this file, and the first row holding it (kept while running)."""

    __tablename__: ClassVar[str] = "import_key"  # type: ignore[misc]

    import_id: uuid.UUID = Field(
        sa_column=Column(Uuid, ForeignKey("import_job.id", ondelete="CASCADE"), primary_key=True))
    # "e:<email>", "x:<external_id>", "m:<id of a contact the row matched>" (older jobs: "c:<id>")
    key: str = Field(primary_key=True)
    row_number: int
