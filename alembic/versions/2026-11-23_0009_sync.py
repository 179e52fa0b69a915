"""Sync: destinations, deliveries and the worker's leases.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-23 19:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('destination',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('config', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('secrets', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('list_mappings', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('field_mappings', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('last_success_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_error_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_error', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('consecutive_failures', sa.Integer(), nullable=False),
    sa.Column('disabled_reason', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("kind IN ('brevo', 'mailchimp', 'webhook')", name=op.f('ck_destination_kind')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_destination')),
    sa.UniqueConstraint('name', name=op.f('uq_destination_name'))
    )
    op.create_table('delivery',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('destination_id', sa.Uuid(), nullable=False),
    sa.Column('contact_id', sa.Uuid(), nullable=True),
    sa.Column('message_id', sa.BigInteger(), nullable=False),
    sa.Column('topic', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('coalesces', sa.Boolean(), nullable=False),
    sa.Column('profile_changed', sa.Boolean(), nullable=False),
    sa.Column('changed_lists', postgresql.ARRAY(sa.Text()), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_error', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('pending', 'in_flight', 'delivered', 'dead')", name=op.f('ck_delivery_status')),
    sa.ForeignKeyConstraint(['destination_id'], ['destination.id'], name=op.f('fk_delivery_destination_id_destination'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_delivery'))
    )
    op.create_index('ix_delivery_claim', 'delivery', ['destination_id', 'next_attempt_at', 'id'], unique=False, postgresql_where=sa.text("status = 'pending'"))
    op.create_index('ix_delivery_destination_id_contact_id_id', 'delivery', ['destination_id', 'contact_id', 'id'], unique=False)
    op.create_index('ix_delivery_destination_id_status_id', 'delivery', ['destination_id', 'status', 'id'], unique=False)
    op.create_index('ix_delivery_in_flight_lease', 'delivery', ['lease_until'], unique=False, postgresql_where=sa.text("status = 'in_flight'"))
    op.create_index('uq_delivery_one_pending_state', 'delivery', ['destination_id', 'contact_id'], unique=True, postgresql_where=sa.text("status = 'pending' AND coalesces"))
    op.create_table('sync_link',
    sa.Column('destination_id', sa.Uuid(), nullable=False),
    sa.Column('contact_id', sa.Uuid(), nullable=False),
    sa.Column('remote_ref', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('synced_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['destination_id'], ['destination.id'], name=op.f('fk_sync_link_destination_id_destination'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('destination_id', 'contact_id', name=op.f('pk_sync_link'))
    )
    op.add_column('outbox_message', sa.Column('dispatched_at', sa.DateTime(timezone=True), nullable=True))
    op.create_index('ix_outbox_message_undispatched', 'outbox_message', ['id'], unique=False, postgresql_where=sa.text('dispatched_at IS NULL'))


def downgrade() -> None:
    op.drop_index('ix_outbox_message_undispatched', table_name='outbox_message', postgresql_where=sa.text('dispatched_at IS NULL'))
    op.drop_column('outbox_message', 'dispatched_at')
    op.drop_table('sync_link')
    op.drop_index('uq_delivery_one_pending_state', table_name='delivery', postgresql_where=sa.text("status = 'pending' AND coalesces"))
    op.drop_index('ix_delivery_in_flight_lease', table_name='delivery', postgresql_where=sa.text("status = 'in_flight'"))
    op.drop_index('ix_delivery_destination_id_status_id', table_name='delivery')
    op.drop_index('ix_delivery_destination_id_contact_id_id', table_name='delivery')
    op.drop_index('ix_delivery_claim', table_name='delivery', postgresql_where=sa.text("status = 'pending'"))
    op.drop_table('delivery')
    op.drop_table('destination')
