"""An erased person's customer numbers join the suppression list: `suppression.kind` may be `external_id`.

A back office's file naming the person by customer number alone (no email, no phone) re-created them through an
import or an upsert: the list held only emails and phones (docs/gdpr.md, "What suppression covers"). The number is
kept as the others are, a keyed hash, never in clear. Only the CHECK constraint changes: no rewrite of the table.

Revision ID: 0033
Revises: 0032
Create Date: 2026-12-08 02:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0033'
down_revision: str | None = '0032'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TABLE suppression DROP CONSTRAINT ck_suppression_kind, "
               "ADD CONSTRAINT ck_suppression_kind CHECK (kind IN ('email', 'phone', 'external_id'))")


def downgrade() -> None:
    # The customer numbers' entries cannot be turned back into anything the older schema holds: they go (erased
    # people could then come back by customer number, as they could before this revision).
    op.execute("DELETE FROM suppression WHERE kind = 'external_id'")
    op.execute("ALTER TABLE suppression DROP CONSTRAINT ck_suppression_kind, "
               "ADD CONSTRAINT ck_suppression_kind CHECK (kind IN ('email', 'phone'))")
