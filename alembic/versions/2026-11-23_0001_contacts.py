"""Contacts, attribute definitions, tags, field history, idempotency records.

Revision ID: 0001
Revises: 
Create Date: 2026-11-23 15:36:30.029836
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('attribute_definition',
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('type', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('options', postgresql.ARRAY(sa.Text()), nullable=True),
    sa.Column('description', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_attribute_definition'))
    )
    op.create_table('contact',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('external_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('email', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('email_status', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('phone', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('first_name', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('last_name', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('company', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('job_title', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('sector', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('gender', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('birth_date', sa.Date(), nullable=True),
    sa.Column('address_line1', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('address_line2', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('postal_code', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('city', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('region', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('country', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('language', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('source', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('first_contact_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('first_contact_channel', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('lifecycle_stage', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('attributes', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('tags', postgresql.ARRAY(sa.Text()), server_default=sa.text("'{}'"), nullable=False),
    sa.Column('orders_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('total_spent', sa.Numeric(precision=14, scale=2), server_default=sa.text('0'), nullable=False),
    sa.Column('average_basket', sa.Numeric(precision=14, scale=2), nullable=True),
    sa.Column('first_order_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_order_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_order_amount', sa.Numeric(precision=14, scale=2), nullable=True),
    sa.Column('currency', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_activity_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_contact')),
    sa.UniqueConstraint('email', name=op.f('uq_contact_email')),
    sa.UniqueConstraint('external_id', name=op.f('uq_contact_external_id'))
    )
    op.create_index('ix_contact_city', 'contact', [sa.literal_column('lower(city)')], unique=False)
    op.create_index(op.f('ix_contact_country'), 'contact', ['country'], unique=False)
    op.create_index('ix_contact_created_at_id', 'contact', ['created_at', 'id'], unique=False)
    op.create_index(op.f('ix_contact_kind'), 'contact', ['kind'], unique=False)
    op.create_index(op.f('ix_contact_lifecycle_stage'), 'contact', ['lifecycle_stage'], unique=False)
    op.create_index(op.f('ix_contact_phone'), 'contact', ['phone'], unique=False)
    op.create_index(op.f('ix_contact_postal_code'), 'contact', ['postal_code'], unique=False)
    op.create_index('ix_contact_q_company', 'contact', [sa.literal_column('lower(company)').label('q_company')], unique=False, postgresql_ops={'q_company': 'text_pattern_ops'})
    op.create_index('ix_contact_q_email', 'contact', ['email'], unique=False, postgresql_ops={'email': 'text_pattern_ops'})
    op.create_index('ix_contact_q_first_name', 'contact', [sa.literal_column('lower(first_name)').label('q_first')], unique=False, postgresql_ops={'q_first': 'text_pattern_ops'})
    op.create_index('ix_contact_q_last_name', 'contact', [sa.literal_column('lower(last_name)').label('q_last')], unique=False, postgresql_ops={'q_last': 'text_pattern_ops'})
    op.create_index('ix_contact_sort_last_name', 'contact', [sa.literal_column("coalesce(lower(last_name), '')"), 'id'], unique=False)
    op.create_index('ix_contact_sort_last_order_at', 'contact', [sa.literal_column("coalesce(last_order_at, '1970-01-01 00:00:00+00'::timestamptz)"), 'id'], unique=False)
    op.create_index('ix_contact_tags', 'contact', ['tags'], unique=False, postgresql_using='gin')
    op.create_index('ix_contact_updated_at_id', 'contact', ['updated_at', 'id'], unique=False)
    op.create_table('idempotency_record',
    sa.Column('subject', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('key', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('method', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('path', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('request_hash', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('status_code', sa.Integer(), nullable=True),
    sa.Column('response_body', postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), nullable=True),
    sa.Column('response_headers', postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('subject', 'key', name=op.f('pk_idempotency_record'))
    )
    op.create_index(op.f('ix_idempotency_record_created_at'), 'idempotency_record', ['created_at'], unique=False)
    op.create_table('tag',
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('description', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_tag'))
    )
    op.create_table('contact_history',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('contact_id', sa.Uuid(), nullable=False),
    sa.Column('field', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('old_value', postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), nullable=True),
    sa.Column('new_value', postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), nullable=True),
    sa.Column('subject', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('via', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['contact_id'], ['contact.id'], name=op.f('fk_contact_history_contact_id_contact')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_contact_history'))
    )
    op.create_index('ix_contact_history_contact_id_id', 'contact_history', ['contact_id', 'id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_contact_history_contact_id_id', table_name='contact_history')
    op.drop_table('contact_history')
    op.drop_table('tag')
    op.drop_index(op.f('ix_idempotency_record_created_at'), table_name='idempotency_record')
    op.drop_table('idempotency_record')
    op.drop_index('ix_contact_updated_at_id', table_name='contact')
    op.drop_index('ix_contact_tags', table_name='contact', postgresql_using='gin')
    op.drop_index('ix_contact_sort_last_order_at', table_name='contact')
    op.drop_index('ix_contact_sort_last_name', table_name='contact')
    op.drop_index('ix_contact_q_last_name', table_name='contact', postgresql_ops={'q_last': 'text_pattern_ops'})
    op.drop_index('ix_contact_q_first_name', table_name='contact', postgresql_ops={'q_first': 'text_pattern_ops'})
    op.drop_index('ix_contact_q_email', table_name='contact')
    op.drop_index('ix_contact_q_company', table_name='contact', postgresql_ops={'q_company': 'text_pattern_ops'})
    op.drop_index(op.f('ix_contact_postal_code'), table_name='contact')
    op.drop_index(op.f('ix_contact_phone'), table_name='contact')
    op.drop_index(op.f('ix_contact_lifecycle_stage'), table_name='contact')
    op.drop_index(op.f('ix_contact_kind'), table_name='contact')
    op.drop_index('ix_contact_created_at_id', table_name='contact')
    op.drop_index(op.f('ix_contact_country'), table_name='contact')
    op.drop_index('ix_contact_city', table_name='contact')
    op.drop_table('contact')
    op.drop_table('attribute_definition')
