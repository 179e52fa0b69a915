"""Public signup and the preference center: list settings for browser signups and public pages, the proof a
pending public signup waits with, the list a consent event is about (`consent_event.list_id`: leaving one list
is on the ledger without touching the others), and the erasure requests people file from the preference center.

Revision ID: 0021
Revises: 0019
Create Date: 2026-12-06 15:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0021'
down_revision: str | None = '0019'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Revision 0007's ledger guard, with `list_id` pinned like every other column (`{pin}`: empty on downgrade).
_LEDGER_GUARD = """
CREATE OR REPLACE FUNCTION consent_event_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE'
       AND current_setting('carnet.erasing', true) = 'on'
       AND OLD.contact_id IS NOT NULL AND NEW.contact_id IS NULL
       AND NEW.id = OLD.id
       AND NEW.purpose = OLD.purpose
       AND NEW.action = OLD.action{pin}
       AND NEW.source IS NOT DISTINCT FROM OLD.source
       AND NEW.occurred_at = OLD.occurred_at
       AND NEW.recorded_at = OLD.recorded_at
       AND NEW.recorded_by = OLD.recorded_by
       AND NEW.proof IS NOT DISTINCT FROM
           NULLIF(OLD.proof - ARRAY['ip', 'user_agent', 'form_url'], '{{}}'::jsonb)
    THEN
        RETURN NEW;  -- an erasure de-identifying the event: nothing else may change
    END IF;
    IF TG_OP = 'UPDATE'
       AND OLD.contact_id IS NOT NULL AND NEW.contact_id IS NOT NULL
       AND current_setting('carnet.merging', true) = OLD.contact_id::text || ':' || NEW.contact_id::text
       AND NEW.id = OLD.id
       AND NEW.purpose = OLD.purpose
       AND NEW.action = OLD.action{pin}
       AND NEW.source IS NOT DISTINCT FROM OLD.source
       AND NEW.occurred_at = OLD.occurred_at
       AND NEW.recorded_at = OLD.recorded_at
       AND NEW.recorded_by = OLD.recorded_by
       AND NEW.proof IS NOT DISTINCT FROM OLD.proof
    THEN
        RETURN NEW;  -- a merge moving the event to the surviving contact: only contact_id changes
    END IF;
    RAISE EXCEPTION 'consent_event is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$
"""
_PIN_LIST = "\n       AND NEW.list_id IS NOT DISTINCT FROM OLD.list_id"


def upgrade() -> None:
    # Constant defaults: PostgreSQL 11+ adds these columns without rewriting the table.
    op.add_column('list', sa.Column('public_signup', sa.Boolean(), server_default=sa.text('false'), nullable=False))
    op.add_column('list', sa.Column('signup_origins', postgresql.ARRAY(sa.Text()), server_default=sa.text("'{}'"),
                                    nullable=False))
    op.add_column('list', sa.Column('signup_wording', sa.String(), nullable=True))
    op.add_column('list', sa.Column('signup_policy_version', sa.String(), nullable=True))
    op.add_column('list', sa.Column('display_name', sa.String(), nullable=True))
    op.add_column('list', sa.Column('color', sa.String(), nullable=True))
    op.add_column('list_membership', sa.Column('pending_proof', postgresql.JSONB(none_as_null=True), nullable=True))
    # No foreign key: deleting a list keeps every ledger event (as for contact_id after an erasure).
    op.add_column('consent_event', sa.Column('list_id', sa.Uuid(), nullable=True))
    op.execute(_LEDGER_GUARD.format(pin=_PIN_LIST))
    op.create_table(
        'erasure_request',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('contact_id', sa.Uuid(), nullable=False),
        sa.Column('status', sa.String(), nullable=False),
        sa.Column('source', sa.String(), nullable=False),
        sa.Column('requested_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('resolved_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('resolved_by', sa.String(), nullable=True),
        sa.Column('note', sa.String(), nullable=True),
        sa.CheckConstraint("status IN ('open', 'completed', 'refused')", name=op.f('ck_erasure_request_status')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_erasure_request')),
    )
    op.create_index('ix_erasure_request_contact_id_open', 'erasure_request', ['contact_id'], unique=True,
                    postgresql_where=sa.text("status = 'open'"))
    op.create_index('ix_erasure_request_status_requested_at', 'erasure_request', ['status', 'requested_at'])


def downgrade() -> None:
    op.drop_index('ix_erasure_request_status_requested_at', table_name='erasure_request')
    op.drop_index('ix_erasure_request_contact_id_open', table_name='erasure_request',
                  postgresql_where=sa.text("status = 'open'"))
    op.drop_table('erasure_request')
    op.execute(_LEDGER_GUARD.format(pin=""))
    op.drop_column('consent_event', 'list_id')
    op.drop_column('list_membership', 'pending_proof')
    for column in ('color', 'display_name', 'signup_policy_version', 'signup_wording', 'signup_origins',
                   'public_signup'):
        op.drop_column('list', column)
