"""Orders and behaviour events.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 16:27:25.459940
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('event',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('event_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('contact_id', sa.Uuid(), nullable=False),
    sa.Column('type', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('occurred_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('properties', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['contact_id'], ['contact.id'], name=op.f('fk_event_contact_id_contact')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_event')),
    sa.UniqueConstraint('event_id', name=op.f('uq_event_event_id'))
    )
    op.create_index('ix_event_contact_id_occurred_at', 'event', ['contact_id', 'occurred_at'], unique=False)
    op.create_index('ix_event_type_occurred_at', 'event', ['type', 'occurred_at'], unique=False)
    op.create_table('order',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('external_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('contact_id', sa.Uuid(), nullable=False),
    sa.Column('placed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('currency', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('total_amount', sa.Numeric(precision=14, scale=2), nullable=False),
    sa.Column('channel', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('items', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['contact_id'], ['contact.id'], name=op.f('fk_order_contact_id_contact')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_order')),
    sa.UniqueConstraint('external_id', name=op.f('uq_order_external_id'))
    )
    op.create_index('ix_order_contact_id_placed_at', 'order', ['contact_id', 'placed_at'], unique=False)
    op.create_index('ix_order_items', 'order', ['items'], unique=False, postgresql_using='gin', postgresql_ops={'items': 'jsonb_path_ops'})


def downgrade() -> None:
    op.drop_index('ix_order_items', table_name='order', postgresql_using='gin', postgresql_ops={'items': 'jsonb_path_ops'})
    op.drop_index('ix_order_contact_id_placed_at', table_name='order')
    op.drop_table('order')
    op.drop_index('ix_event_type_occurred_at', table_name='event')
    op.drop_index('ix_event_contact_id_occurred_at', table_name='event')
    op.drop_table('event')
