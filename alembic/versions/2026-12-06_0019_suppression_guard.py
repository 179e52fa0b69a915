"""A guard that refuses, inside one statement, an address suppressed by an erasure that committed meanwhile.

A write giving a contact an email waits on the unique index for a concurrent erasure's delete of that address,
then goes through: its suppression check, read before the erasure committed, saw nothing. So every such write
checks again after writing, in the same transaction (app/services/contacts.py). The upsert's autocommit
statements (contacts.fast_upsert) have no "after" of their own: they call this function on the row written. A
VOLATILE plpgsql function reads with a fresh snapshot (the statement's own predates the erasure), and raising
rolls the whole statement back. SQLSTATE CS001 is Carnet's own (app/services/suppressions.py).

Revision ID: 0019
Revises: 0015
Create Date: 2026-12-06 12:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0019'
down_revision: str | None = '0015'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("""
        CREATE FUNCTION carnet_refuse_suppressed(kinds text[], digests text[]) RETURNS boolean
        LANGUAGE plpgsql VOLATILE AS $$
        BEGIN
            IF EXISTS (SELECT 1 FROM suppression s WHERE s.released_at IS NULL
                       AND (s.kind, s.digest) IN (SELECT * FROM unnest(kinds, digests))) THEN
                RAISE EXCEPTION 'the address belongs to an erased person' USING ERRCODE = 'CS001';
            END IF;
            RETURN true;
        END
        $$
    """)


def downgrade() -> None:
    op.execute("DROP FUNCTION carnet_refuse_suppressed(text[], text[])")
