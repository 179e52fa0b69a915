"""Cheaper contact inserts (measured in docs/performance.md "Import"), every query keeping its index.

- One index on email instead of two. The unique constraint on `email` and the `q` search's prefix index
  `ix_contact_q_email` (text_pattern_ops) indexed the same column twice. A unique index with
  text_pattern_ops serves both: equality (`email = $1`: the upsert's and the import's matching, ON
  CONFLICT) is in that operator class, and so are the prefix ranges of `email LIKE 'abc%'`. Same name as
  the constraint it replaces (`uq_contact_email`), so a unique violation still names it.
- `ix_contact_name_key` without its `IS NOT NULL` predicate: PostgreSQL evaluated `carnet_name_key(...)`
  (NFKD, three replaces, two regexps: ~10 µs) once for the predicate and once more for the key, on every
  insert. Contacts without a key now cost one NULL entry instead; the duplicate finder's equality on the
  key uses the index as before (NULL never equals).

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-23 22:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0012'
down_revision: str | None = '0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NAME_KEY = "carnet_name_key(first_name, last_name, postal_code)"


def upgrade() -> None:
    op.drop_index('ix_contact_q_email', table_name='contact')
    op.drop_constraint('uq_contact_email', 'contact', type_='unique')
    op.create_index('uq_contact_email', 'contact', ['email'], unique=True,
                    postgresql_ops={'email': 'text_pattern_ops'})
    op.drop_index('ix_contact_name_key', table_name='contact')
    op.create_index('ix_contact_name_key', 'contact', [sa.literal_column(_NAME_KEY)], unique=False)


def downgrade() -> None:
    op.drop_index('ix_contact_name_key', table_name='contact')
    op.create_index('ix_contact_name_key', 'contact', [sa.literal_column(_NAME_KEY)], unique=False,
                    postgresql_where=sa.text(f"{_NAME_KEY} IS NOT NULL"))
    op.drop_index('uq_contact_email', table_name='contact')
    op.create_unique_constraint('uq_contact_email', 'contact', ['email'])
    op.create_index('ix_contact_q_email', 'contact', ['email'], unique=False,
                    postgresql_ops={'email': 'text_pattern_ops'})
