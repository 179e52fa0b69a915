"""Segments as a sync source: a membership snapshot per synced segment, and segment mappings on destinations.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-23 21:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0011'
down_revision: str | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'segment_member',
        sa.Column('segment_id', sa.Uuid(), sa.ForeignKey('segment.id', ondelete='CASCADE'), nullable=False),
        sa.Column('contact_id', sa.Uuid(), sa.ForeignKey('contact.id', ondelete='CASCADE'), nullable=False),
        sa.Column('entered_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('segment_id', 'contact_id'),
    )
    op.create_index('ix_segment_member_contact_id', 'segment_member', ['contact_id'])
    op.add_column('segment', sa.Column('refreshed_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('destination', sa.Column('segment_mappings', postgresql.JSONB(), nullable=False,
                                           server_default=sa.text("'[]'::jsonb")))


def downgrade() -> None:
    op.drop_column('destination', 'segment_mappings')
    op.drop_column('segment', 'refreshed_at')
    op.drop_index('ix_segment_member_contact_id', table_name='segment_member')
    op.drop_table('segment_member')
