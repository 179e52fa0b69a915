"""A synced segment's failed refresh shows on the destination: `segment_sync.last_error` and `failed_at`.

A refresh that failed (its filter no longer compiles; its diff ran past the statement timeout) stamped
`refreshed_at` like a good one, so the destination's read model showed a fresh snapshot. Now `refreshed_at` is
the last good refresh, and a failure sets these two (cleared by the next good refresh, or a new filter); the
worker schedules on the later of `refreshed_at` and `failed_at`. Two nullable columns: no rewrite of the table.

Revision ID: 0031
Revises: 0030
Create Date: 2026-12-07 23:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0031'
down_revision: str | None = '0030'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('segment_sync', sa.Column('last_error', sa.String(length=32), nullable=True))
    op.add_column('segment_sync', sa.Column('failed_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column('segment_sync', 'failed_at')
    op.drop_column('segment_sync', 'last_error')
