"""Commerce to the emailing tools: carts, the cart an order converted, and what was pushed where.

Revision ID: 0027
Revises: 0026
Create Date: 2026-12-06 17:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0027'
down_revision: str | None = '0026'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('cart',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('external_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('contact_id', sa.Uuid(), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('currency', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('total_amount', sa.Numeric(precision=14, scale=2), nullable=False),
    sa.Column('items', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('checkout_url', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('opened_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('closed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('order_external_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("status IN ('open', 'converted', 'abandoned')", name=op.f('ck_cart_status')),
    sa.ForeignKeyConstraint(['contact_id'], ['contact.id'], name=op.f('fk_cart_contact_id_contact')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_cart')),
    sa.UniqueConstraint('external_id', name=op.f('uq_cart_external_id'))
    )
    op.create_index('ix_cart_contact_id_opened_at', 'cart', ['contact_id', 'opened_at'], unique=False)
    op.add_column('order', sa.Column('cart_external_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
    op.create_table('sync_commerce',
    sa.Column('destination_id', sa.Uuid(), nullable=False),
    sa.Column('kind', sa.Text(), nullable=False),
    sa.Column('ref', sa.Text(), nullable=False),
    sa.Column('contact_id', sa.Uuid(), nullable=True),
    sa.Column('digest', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('synced_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("kind IN ('product', 'order', 'cart', 'customer', 'event')",
                       name=op.f('ck_sync_commerce_kind')),
    sa.ForeignKeyConstraint(['destination_id'], ['destination.id'], name=op.f('fk_sync_commerce_destination_id_destination'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('destination_id', 'kind', 'ref', name=op.f('pk_sync_commerce'))
    )
    op.create_index('ix_sync_commerce_destination_id_contact_id', 'sync_commerce', ['destination_id', 'contact_id'],
                    unique=False)


def downgrade() -> None:
    op.drop_index('ix_sync_commerce_destination_id_contact_id', table_name='sync_commerce')
    op.drop_table('sync_commerce')
    op.drop_column('order', 'cart_external_id')
    op.drop_index('ix_cart_contact_id_opened_at', table_name='cart')
    op.drop_table('cart')
