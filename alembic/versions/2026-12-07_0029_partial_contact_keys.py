"""`contact`'s two unique keys index only the contacts that have one.

`uq_contact_external_id` (a unique constraint) and `uq_contact_email` held an entry for every contact, NULL
included; a NULL is never looked up (`external_id = $1`, `email = $1`, the `q` prefix on email, the import's key
joins: each strict, so each implies `IS NOT NULL` and the planner uses a partial index for it). A contact without
an external id (a signup, most imported prospects) or without an email (a phone-only contact) no longer pays an
insertion into that index: `\\copy` of bench_import.py's 1M-row file (no external ids): one index entry less per row.
Uniqueness among the contacts that have the key is unchanged, and so are the names (a violation still names
`uq_contact_email` / `uq_contact_external_id`, which app.services.contacts reads).

`ON CONFLICT (external_id)` must now name the predicate (`ON CONFLICT (external_id) WHERE external_id IS NOT NULL`)
to infer the index; Carnet never writes it (bench/floor_app.py does, and says it).

Each index is built before the old one goes, in the migration's transaction: writes to `contact` wait meanwhile
(1.6 s for both on 1M contacts on the 2-core machine: docs/operations.md, "Upgrades").

Revision ID: 0029
Revises: 0028
Create Date: 2026-12-07 07:10:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0029'
down_revision: str | None = '0028'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("CREATE UNIQUE INDEX uq_contact_external_id_0029 ON contact (external_id) "
               "WHERE external_id IS NOT NULL")
    op.execute("ALTER TABLE contact DROP CONSTRAINT uq_contact_external_id")
    op.execute("ALTER INDEX uq_contact_external_id_0029 RENAME TO uq_contact_external_id")
    op.execute("CREATE UNIQUE INDEX uq_contact_email_0029 ON contact (email text_pattern_ops) WHERE email IS NOT NULL")
    op.execute("DROP INDEX uq_contact_email")
    op.execute("ALTER INDEX uq_contact_email_0029 RENAME TO uq_contact_email")


def downgrade() -> None:
    op.execute("CREATE UNIQUE INDEX uq_contact_email_0029 ON contact (email text_pattern_ops)")
    op.execute("DROP INDEX uq_contact_email")
    op.execute("ALTER INDEX uq_contact_email_0029 RENAME TO uq_contact_email")
    op.execute("ALTER TABLE contact DROP CONSTRAINT IF EXISTS uq_contact_external_id")
    op.execute("DROP INDEX IF EXISTS uq_contact_external_id")
    op.execute("ALTER TABLE contact ADD CONSTRAINT uq_contact_external_id UNIQUE (external_id)")
