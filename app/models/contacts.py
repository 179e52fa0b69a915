"""The contact table: the "fiche client"."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import date, datetime
from decimal import Decimal
from typing import Any, ClassVar

from sqlalchemy import Column, ColumnElement, Index, Numeric, Text, and_, func, literal_column, text, true
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlmodel import Field, SQLModel

from app.models.base import TZ, new_id, utc_now

__all__ = ["SPARSE_DEFAULT", "Contact", "off_default", "tagged"]

# The kind and lifecycle stage of every new contact; their indexes leave it out (most rows hold it).
SPARSE_DEFAULT = "prospect"


class Contact(SQLModel, table=True):
    __tablename__: ClassVar[str] = "contact"  # type: ignore[misc]
    # Every index serves a documented query: docs/performance.md "Index budget", checked by
    # tests/test_index_budget.py. Partial ones hold only rows such a query can match (migration 0025).
    __table_args__ = (
        # Keyset pages: (sort expression, id) for each sort the API offers.
        Index("ix_contact_created_at_id", "created_at", "id"),
        Index("ix_contact_updated_at_id", "updated_at", "id"),
        Index("ix_contact_sort_last_name", func.coalesce(func.lower(text("last_name")), ""), "id"),
        Index("ix_contact_sort_last_order_at", func.coalesce(text("last_order_at"), text("'1970-01-01 00:00:00+00'::timestamptz")), "id"),
        # `q` prefix search without pg_trgm (the embedded server has no contrib extensions).
        Index("ix_contact_q_last_name", func.lower(text("last_name")).label("q_last"),
              postgresql_ops={"q_last": "text_pattern_ops"}, postgresql_where=text("last_name IS NOT NULL")),
        Index("ix_contact_q_first_name", func.lower(text("first_name")).label("q_first"),
              postgresql_ops={"q_first": "text_pattern_ops"}, postgresql_where=text("first_name IS NOT NULL")),
        Index("ix_contact_q_company", func.lower(text("company")).label("q_company"),
              postgresql_ops={"q_company": "text_pattern_ops"}, postgresql_where=text("company IS NOT NULL")),
        # Unique, and the `q` prefix search on email: text_pattern_ops has `=` too (migration 0012). Both keys
        # unique among the contacts that have one: a NULL is never looked up, so it is not indexed (migration 0029).
        Index("uq_contact_email", "email", unique=True, postgresql_ops={"email": "text_pattern_ops"},
              postgresql_where=text("email IS NOT NULL")),
        Index("uq_contact_external_id", "external_id", unique=True, postgresql_where=text("external_id IS NOT NULL")),
        # Filters. A strict comparison (`=`, LIKE) implies `IS NOT NULL`; the other predicates are named by the
        # queries themselves (`tagged`, `off_default` below).
        Index("ix_contact_city", func.lower(text("city")), postgresql_where=text("city IS NOT NULL")),
        Index("ix_contact_postal_code", "postal_code", postgresql_where=text("postal_code IS NOT NULL")),
        Index("ix_contact_country", "country", postgresql_where=text("country IS NOT NULL")),
        Index("ix_contact_phone", "phone", postgresql_where=text("phone IS NOT NULL")),
        # With the default order's columns: a shop that imported prospects after its customers has its newest
        # rows all prospects, and `?kind=customer` walked them all down the created_at index (migration 0028).
        Index("ix_contact_kind", "kind", "created_at", "id", postgresql_where=text("kind <> 'prospect'")),
        Index("ix_contact_lifecycle_stage", "lifecycle_stage", "created_at", "id",
              postgresql_where=text("lifecycle_stage <> 'prospect'")),
        Index("ix_contact_tags", "tags", postgresql_using="gin", postgresql_where=text("cardinality(tags) > 0")),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    external_id: str | None = None  # unique: uq_contact_external_id above
    email: str | None = None  # unique: uq_contact_email above
    email_status: str = Field(default="unverified")
    phone: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    company: str | None = None
    job_title: str | None = None
    sector: str | None = None
    gender: str | None = None
    birth_date: date | None = None
    address_line1: str | None = None
    address_line2: str | None = None
    postal_code: str | None = None
    city: str | None = None
    region: str | None = None
    country: str | None = None
    language: str | None = None
    source: str | None = None
    first_contact_at: datetime | None = Field(default=None, sa_type=TZ)
    first_contact_channel: str | None = None
    kind: str = Field(default=SPARSE_DEFAULT)
    lifecycle_stage: str = Field(default=SPARSE_DEFAULT)
    attributes: dict[str, Any] = Field(
        default_factory=dict, sa_column=Column(JSONB, nullable=False, server_default=text("'{}'::jsonb"))
    )
    tags: list[str] = Field(
        default_factory=list, sa_column=Column(ARRAY(Text), nullable=False, server_default=text("'{}'"))
    )
    # Stats follow every order write (orders feature); kept here so reads need one row.
    orders_count: int = Field(default=0, sa_column_kwargs={"server_default": text("0")})
    total_spent: Decimal = Field(default=Decimal(0), sa_type=Numeric(14, 2), sa_column_kwargs={"server_default": text("0")})
    average_basket: Decimal | None = Field(default=None, sa_type=Numeric(14, 2))
    first_order_at: datetime | None = Field(default=None, sa_type=TZ)
    last_order_at: datetime | None = Field(default=None, sa_type=TZ)
    last_order_amount: Decimal | None = Field(default=None, sa_type=Numeric(14, 2))
    currency: str | None = None
    created_at: datetime = Field(default_factory=utc_now, sa_type=TZ)
    updated_at: datetime = Field(default_factory=utc_now, sa_type=TZ)
    last_activity_at: datetime | None = Field(default=None, sa_type=TZ)
    version: int = Field(default=1)


_c = Contact.__table__.c  # type: ignore[attr-defined]


def tagged(condition: ColumnElement[bool]) -> ColumnElement[bool]:
    """A condition that holds only for a contact with tags (`@>`, `&&`), with the predicate of the partial
    `ix_contact_tags` spelled out: the planner cannot see that `tags @> x` implies it. A constant, not a parameter,
    so that generic plans prove it too."""
    return and_(func.cardinality(_c.tags) > literal_column("0"), condition)


def off_default(column: str, values: Iterable[str]) -> ColumnElement[bool]:
    """`<column> <> 'prospect'` (the predicate of its partial index) when no value sought is the default, else TRUE:
    AND it to `<column> = v` / `IN (...)`. A query for prospects reads most of the table anyway."""
    if SPARSE_DEFAULT in values:
        return true()
    return _c[column] != literal_column(f"'{SPARSE_DEFAULT}'")
