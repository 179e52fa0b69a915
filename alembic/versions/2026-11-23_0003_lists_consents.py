"""Lists, memberships, the append-only consent ledger and the outbox.

The ledger's append-only rule lives in the database (a trigger), so no code path, script or
console session can edit or delete an event by accident.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 16:25:01.767195
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_APPEND_ONLY_FUNCTION = """
CREATE FUNCTION consent_event_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'consent_event is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$
"""
_APPEND_ONLY_TRIGGER = """
CREATE TRIGGER consent_event_append_only
    BEFORE UPDATE OR DELETE ON consent_event
    FOR EACH ROW EXECUTE FUNCTION consent_event_append_only()
"""


def upgrade() -> None:
    op.create_table('list',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('description', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('double_opt_in', sa.Boolean(), nullable=False),
    sa.Column('accepted_kinds', postgresql.ARRAY(sa.Text()), nullable=True),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_list')),
    sa.UniqueConstraint('name', name=op.f('uq_list_name'))
    )
    op.create_table('outbox_message',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('topic', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('contact_id', sa.Uuid(), nullable=True),
    sa.Column('payload', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_outbox_message'))
    )
    op.create_table('consent_event',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('contact_id', sa.Uuid(), nullable=False),
    sa.Column('purpose', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('action', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('source', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('occurred_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('recorded_by', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('proof', postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), nullable=True),
    sa.CheckConstraint("action IN ('granted', 'withdrawn', 'confirmed')", name=op.f('ck_consent_event_action')),
    sa.ForeignKeyConstraint(['contact_id'], ['contact.id'], name=op.f('fk_consent_event_contact_id_contact')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_consent_event'))
    )
    op.create_index('ix_consent_event_contact_id_purpose_occurred_at', 'consent_event',
                    ['contact_id', 'purpose', 'occurred_at'], unique=False)
    op.execute(_APPEND_ONLY_FUNCTION)
    op.execute(_APPEND_ONLY_TRIGGER)
    op.create_table('list_membership',
    sa.Column('list_id', sa.Uuid(), nullable=False),
    sa.Column('contact_id', sa.Uuid(), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('source', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('subscribed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('unsubscribed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('pending_since', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("status IN ('pending', 'subscribed', 'unsubscribed')",
                       name=op.f('ck_list_membership_status')),
    sa.ForeignKeyConstraint(['contact_id'], ['contact.id'], name=op.f('fk_list_membership_contact_id_contact')),
    sa.ForeignKeyConstraint(['list_id'], ['list.id'], name=op.f('fk_list_membership_list_id_list'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('list_id', 'contact_id', name=op.f('pk_list_membership'))
    )
    op.create_index(op.f('ix_list_membership_contact_id'), 'list_membership', ['contact_id'], unique=False)
    op.create_index('ix_list_membership_list_id_status_contact_id', 'list_membership',
                    ['list_id', 'status', 'contact_id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_list_membership_list_id_status_contact_id', table_name='list_membership')
    op.drop_index(op.f('ix_list_membership_contact_id'), table_name='list_membership')
    op.drop_table('list_membership')
    op.execute("DROP TRIGGER consent_event_append_only ON consent_event")
    op.execute("DROP FUNCTION consent_event_append_only()")
    op.drop_index('ix_consent_event_contact_id_purpose_occurred_at', table_name='consent_event')
    op.drop_table('consent_event')
    op.drop_table('outbox_message')
    op.drop_table('list')
