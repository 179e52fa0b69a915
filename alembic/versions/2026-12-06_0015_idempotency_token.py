"""A stored idempotent response remembers the token it was sent to: it is replayed to that token only
(issue 15, class 4; docs/security.md).

Rows stored before this revision have no token: they are never replayed again (a repeat gets the 422), and
they expire within 24 h anyway.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0015'
down_revision: str | None = '0014'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('idempotency_record', sa.Column('token_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True))


def downgrade() -> None:
    op.drop_column('idempotency_record', 'token_id')
