"""Segments as a sync source: segment mappings on destinations, and a membership snapshot per mapping.

Also the tags last pushed to a vendor (sync_link.tags), so a tag removed in Carnet is removed there too.

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
    op.add_column('destination', sa.Column('segment_mappings', postgresql.JSONB(), nullable=False,
                                           server_default=sa.text("'[]'::jsonb")))
    op.create_table(
        'segment_sync',
        sa.Column('destination_id', sa.Uuid(), sa.ForeignKey('destination.id', ondelete='CASCADE'), nullable=False),
        sa.Column('segment_id', sa.Uuid(), sa.ForeignKey('segment.id', ondelete='CASCADE'), nullable=False),
        sa.Column('refreshed_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('members', sa.Integer(), server_default=sa.text('0'), nullable=False),
        sa.PrimaryKeyConstraint('destination_id', 'segment_id'),
    )
    op.create_index('ix_segment_sync_segment_id', 'segment_sync', ['segment_id'])
    op.create_table(
        'segment_member',
        sa.Column('destination_id', sa.Uuid(), nullable=False),
        sa.Column('segment_id', sa.Uuid(), nullable=False),
        sa.Column('contact_id', sa.Uuid(), sa.ForeignKey('contact.id', ondelete='CASCADE'), nullable=False),
        sa.Column('entered_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['destination_id', 'segment_id'], ['segment_sync.destination_id', 'segment_sync.segment_id'],
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('destination_id', 'segment_id', 'contact_id'),
    )
    op.create_index('ix_segment_member_contact_id', 'segment_member', ['contact_id'])
    op.add_column('sync_link', sa.Column('tags', postgresql.ARRAY(sa.Text()), nullable=True))


def downgrade() -> None:
    op.drop_column('sync_link', 'tags')
    op.drop_index('ix_segment_member_contact_id', table_name='segment_member')
    op.drop_table('segment_member')
    op.drop_index('ix_segment_sync_segment_id', table_name='segment_sync')
    op.drop_table('segment_sync')
    op.drop_column('destination', 'segment_mappings')
