"""The access journal: a hash chain of every access to personal data and every administrative act.

Revision ID: 0023
Revises: 0021
Create Date: 2026-12-06 15:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0023'
down_revision: str | None = '0021'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KINDS = "kind IN ('read', 'export', 'admin')"


def _described() -> list[sa.Column]:
    return [
        sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('action', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('subject', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('token_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column('role', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column('route', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column('request_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column('client_addr', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column('refs', postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column('ref_count', sa.Integer(), nullable=False),
        sa.Column('detail', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    ]


def upgrade() -> None:
    op.create_table(
        'journal_entry',
        sa.Column('seq', sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column('chained_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), nullable=False),
        *_described(),
        sa.Column('refs_digest', sa.LargeBinary(), nullable=False),
        sa.Column('prev_hash', sa.LargeBinary(), nullable=False),
        sa.Column('hash', sa.LargeBinary(), nullable=False),
        sa.CheckConstraint(KINDS, name=op.f('ck_journal_entry_kind')),
        sa.PrimaryKeyConstraint('seq', name=op.f('pk_journal_entry')),
    )
    op.create_index('ix_journal_entry_refs', 'journal_entry', ['refs'], postgresql_using='gin')
    op.create_index('ix_journal_entry_subject_seq', 'journal_entry', ['subject', 'seq'])
    op.create_index('ix_journal_entry_token_id_seq', 'journal_entry', ['token_id', 'seq'])
    op.create_index('ix_journal_entry_at', 'journal_entry', ['at'])
    op.create_table(
        'journal_pending',
        sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), nullable=False),
        *_described(),
        sa.CheckConstraint(KINDS, name=op.f('ck_journal_pending_kind')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_journal_pending')),
    )
    op.create_table(
        'journal_erasure',
        sa.Column('contact_id', sa.Uuid(), nullable=False),
        sa.Column('refs', postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column('erased_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('contact_id', name=op.f('pk_journal_erasure')),
    )
    op.create_table(
        'journal_anchor',
        sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
        sa.Column('seq', sa.BigInteger(), nullable=False),
        sa.Column('chained_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('hash', sa.LargeBinary(), nullable=False),
        sa.Column('pruned_at', sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint('id = 1', name=op.f('ck_journal_anchor_single_row')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_journal_anchor')),
    )


def downgrade() -> None:
    op.drop_table('journal_anchor')
    op.drop_table('journal_erasure')
    op.drop_table('journal_pending')
    op.drop_index('ix_journal_entry_at', table_name='journal_entry')
    op.drop_index('ix_journal_entry_token_id_seq', table_name='journal_entry')
    op.drop_index('ix_journal_entry_subject_seq', table_name='journal_entry')
    op.drop_index('ix_journal_entry_refs', table_name='journal_entry', postgresql_using='gin')
    op.drop_table('journal_entry')
