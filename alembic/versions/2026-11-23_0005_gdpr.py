"""GDPR: the suppression list, and an append-only ledger that an erasure may de-identify.

The ledger trigger now lets exactly one kind of UPDATE through: the de-identification an erasure does
(`app/services/gdpr.py`), and only while that transaction has set `carnet.erasing` to `on`
(`set_config(..., true)`, i.e. SET LOCAL). It may only set `contact_id` to NULL and drop the proof's
`ip`, `user_agent` and `form_url`; every other column must stay as it was. DELETE is always refused.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 18:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_DEIDENTIFIABLE_FUNCTION = """
CREATE OR REPLACE FUNCTION consent_event_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE'
       AND current_setting('carnet.erasing', true) = 'on'
       AND OLD.contact_id IS NOT NULL AND NEW.contact_id IS NULL
       AND NEW.id = OLD.id
       AND NEW.purpose = OLD.purpose
       AND NEW.action = OLD.action
       AND NEW.source IS NOT DISTINCT FROM OLD.source
       AND NEW.occurred_at = OLD.occurred_at
       AND NEW.recorded_at = OLD.recorded_at
       AND NEW.recorded_by = OLD.recorded_by
       AND NEW.proof IS NOT DISTINCT FROM
           NULLIF(OLD.proof - ARRAY['ip', 'user_agent', 'form_url'], '{}'::jsonb)
    THEN
        RETURN NEW;  -- an erasure de-identifying the event: nothing else may change
    END IF;
    RAISE EXCEPTION 'consent_event is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$
"""
_APPEND_ONLY_FUNCTION = """
CREATE OR REPLACE FUNCTION consent_event_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'consent_event is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$
"""


def upgrade() -> None:
    op.create_table('suppression',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('digest', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('released_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('released_by', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('release_proof', postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), nullable=True),
    sa.CheckConstraint("kind IN ('email', 'phone')", name=op.f('ck_suppression_kind')),
    sa.CheckConstraint("reason IN ('erasure', 'retention')", name=op.f('ck_suppression_reason')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_suppression')),
    sa.UniqueConstraint('kind', 'digest', name=op.f('uq_suppression_kind_digest'))
    )
    op.alter_column('consent_event', 'contact_id', existing_type=sa.Uuid(), nullable=True)
    op.execute(_DEIDENTIFIABLE_FUNCTION)


def downgrade() -> None:
    connection = op.get_bind()
    erased = connection.scalar(sa.text("SELECT count(*) FROM consent_event WHERE contact_id IS NULL"))
    if erased:
        raise RuntimeError(
            f"cannot downgrade below 0005: {erased} consent event(s) were de-identified by erasures and "
            "revision 0004 requires consent_event.contact_id; restore a backup taken before 0005 instead"
        )
    op.execute(_APPEND_ONLY_FUNCTION)
    op.alter_column('consent_event', 'contact_id', existing_type=sa.Uuid(), nullable=False)
    op.drop_table('suppression')
