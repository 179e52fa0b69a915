"""The consent ledger's erasure may also clear the free text that names the person.

An erasure de-identifies the person's events (contact_id NULL, the proof without ip, user_agent, form_url). The
caller's free text stayed whatever it said: `source` ("phone call with Jean Dupont") and the proof's `wording` and
`policy_version`. The guard now also lets that same UPDATE set `source` to NULL and drop `wording` and
`policy_version` from the proof (nothing else: no value may change, none may be added), which the erasure does
only where they name the person (app/services/gdpr.py). The merge branch and every other refusal are unchanged.

Revision ID: 0030
Revises: 0029
Create Date: 2026-12-07 22:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0030'
down_revision: str | None = '0029'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Revision 0021's guard, with the erasure's branch given as `{erasure}`.
_LEDGER_GUARD = """
CREATE OR REPLACE FUNCTION consent_event_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE'
       AND current_setting('carnet.erasing', true) = 'on'
       AND OLD.contact_id IS NOT NULL AND NEW.contact_id IS NULL
       AND NEW.id = OLD.id
       AND NEW.purpose = OLD.purpose
       AND NEW.action = OLD.action
       AND NEW.list_id IS NOT DISTINCT FROM OLD.list_id
       AND NEW.occurred_at = OLD.occurred_at
       AND NEW.recorded_at = OLD.recorded_at
       AND NEW.recorded_by = OLD.recorded_by{erasure}
    THEN
        RETURN NEW;  -- an erasure de-identifying the event: nothing else may change
    END IF;
    IF TG_OP = 'UPDATE'
       AND OLD.contact_id IS NOT NULL AND NEW.contact_id IS NOT NULL
       AND current_setting('carnet.merging', true) = OLD.contact_id::text || ':' || NEW.contact_id::text
       AND NEW.id = OLD.id
       AND NEW.purpose = OLD.purpose
       AND NEW.action = OLD.action
       AND NEW.list_id IS NOT DISTINCT FROM OLD.list_id
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
# The source kept or cleared; the proof: the old one without ip, user_agent, form_url, and without wording and
# policy_version exactly when the new one lacks them.
_SCRUBBING = """
       AND (NEW.source IS NOT DISTINCT FROM OLD.source OR NEW.source IS NULL)
       AND NEW.proof IS NOT DISTINCT FROM NULLIF(OLD.proof - ARRAY(
               SELECT k FROM unnest(ARRAY['ip', 'user_agent', 'form_url', 'wording', 'policy_version']) AS k
               WHERE k IN ('ip', 'user_agent', 'form_url') OR NOT coalesce(NEW.proof ? k, false)), '{}'::jsonb)"""
_STRIPPING = """
       AND NEW.source IS NOT DISTINCT FROM OLD.source
       AND NEW.proof IS NOT DISTINCT FROM
           NULLIF(OLD.proof - ARRAY['ip', 'user_agent', 'form_url'], '{}'::jsonb)"""


def upgrade() -> None:
    op.execute(_LEDGER_GUARD.format(erasure=_SCRUBBING))


def downgrade() -> None:
    op.execute(_LEDGER_GUARD.format(erasure=_STRIPPING))
