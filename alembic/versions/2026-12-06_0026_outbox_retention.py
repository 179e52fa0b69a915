"""Outbox retention: indexes for purging delivered deliveries and the outbox messages no delivery needs.

Revision ID: 0026
Revises: 0024
Create Date: 2026-12-06 18:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0026'
down_revision: str | None = '0024'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index('ix_delivery_delivered_at', 'delivery', ['delivered_at', 'id'], unique=False,
                    postgresql_where=sa.text("status = 'delivered'"))
    op.create_index('ix_delivery_message_id_undelivered', 'delivery', ['message_id'], unique=False,
                    postgresql_where=sa.text("status <> 'delivered'"))


def downgrade() -> None:
    op.drop_index('ix_delivery_message_id_undelivered', table_name='delivery',
                  postgresql_where=sa.text("status <> 'delivered'"))
    op.drop_index('ix_delivery_delivered_at', table_name='delivery', postgresql_where=sa.text("status = 'delivered'"))
