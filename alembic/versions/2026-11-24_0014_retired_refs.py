"""Erasure reaches every remote record of a person: records retired at a vendor (archived Mailchimp members of a
merged-away or former address) are remembered until the person's erasure deletes them permanently, and
sync_link is searchable by remote reference (a record another contact took over is left alone).

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-24 03:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0014'
down_revision: str | None = '0013'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'sync_retired_ref',
        sa.Column('destination_id', sa.Uuid(), nullable=False),
        sa.Column('contact_id', sa.Uuid(), nullable=False),
        sa.Column('remote_ref', sa.Text(), nullable=False),
        sa.Column('retired_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['destination_id'], ['destination.id'],
                                name=op.f('fk_sync_retired_ref_destination_id_destination'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('destination_id', 'contact_id', 'remote_ref', name=op.f('pk_sync_retired_ref')),
    )
    op.create_index('ix_sync_retired_ref_destination_id_remote_ref', 'sync_retired_ref',
                    ['destination_id', 'remote_ref'])
    op.create_index('ix_sync_link_destination_id_remote_ref', 'sync_link', ['destination_id', 'remote_ref'])


def downgrade() -> None:
    op.drop_index('ix_sync_link_destination_id_remote_ref', table_name='sync_link')
    op.drop_index('ix_sync_retired_ref_destination_id_remote_ref', table_name='sync_retired_ref')
    op.drop_table('sync_retired_ref')
