"""Duplicates and merge: merged contacts keep a pointer to the survivor.

- `contact_merge`: one row per contact merged away (survivor, when, who).
- `carnet_name_key(first_name, last_name, postal_code)` and `carnet_email_key(email)`: the keys duplicate
  candidates are matched on (docs/api.md "Duplicate candidates"), IMMUTABLE SQL built from core functions
  only (no unaccent/pg_trgm: the embedded server has no contrib extensions; `normalize()` needs a UTF8
  database), and a partial expression index on each.
- The consent ledger's trigger lets one more UPDATE through: a merge re-pointing an event from the merged
  contact to the survivor, only while the transaction has set `carnet.merging` to `<merged id>:<survivor
  id>` (SET LOCAL via `set_config(..., true)`), and only `contact_id` may change. Erasure's rule (0005)
  stays as it was; DELETE is still always refused.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23 19:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Case and accents folded (NFKD, combining marks dropped; œ æ ß spelled out), separators removed:
# "Jean-Pierre", "jean pierre" and "JEAN PIERRE" are one key. A missing part makes the whole key NULL.
_FOLD = (r"""nullif(regexp_replace(replace(replace(replace(lower(normalize({v}, NFKD)), 'œ', 'oe'), 'æ', 'ae'),"""
         r""" 'ß', 'ss'), '[\u0300-\u036f[:space:]''’.,_-]+', '', 'g'), '')""")
_NAME_KEY_FUNCTION = f"""
CREATE FUNCTION carnet_name_key(first_name text, last_name text, postal_code text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT {_FOLD.format(v='first_name')} || ' ' || {_FOLD.format(v='last_name')}
           || '|' || nullif(upper(regexp_replace(postal_code, '[[:space:]-]+', '', 'g')), '')
$$
"""
# Provider rules: Gmail ignores dots and "+tag" (googlemail.com is gmail.com); these providers ignore "+tag".
# Any other address has no key (NULL): exact addresses are already unique.
PLUS_TAG_PROVIDERS = (
    "outlook.com", "outlook.fr", "hotmail.com", "hotmail.fr", "live.com", "live.fr", "msn.com",
    "icloud.com", "me.com", "mac.com", "protonmail.com", "protonmail.ch", "proton.me", "pm.me",
    "fastmail.com", "fastmail.fm", "yandex.com", "yandex.ru",
)
_EMAIL_KEY_FUNCTION = f"""
CREATE FUNCTION carnet_email_key(email text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN split_part(lower(email), '@', 2) IN ('gmail.com', 'googlemail.com')
            THEN nullif(replace(split_part(split_part(lower(email), '@', 1), '+', 1), '.', ''), '') || '@gmail.com'
        WHEN split_part(lower(email), '@', 2) IN ({", ".join(f"'{d}'" for d in PLUS_TAG_PROVIDERS)})
            THEN nullif(split_part(split_part(lower(email), '@', 1), '+', 1), '') || '@' || split_part(lower(email), '@', 2)
    END
$$
"""

_MERGE_AWARE_FUNCTION = """
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
    IF TG_OP = 'UPDATE'
       AND OLD.contact_id IS NOT NULL AND NEW.contact_id IS NOT NULL
       AND current_setting('carnet.merging', true) = OLD.contact_id::text || ':' || NEW.contact_id::text
       AND NEW.id = OLD.id
       AND NEW.purpose = OLD.purpose
       AND NEW.action = OLD.action
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
# Revision 0005's function, restored on downgrade.
_ERASURE_ONLY_FUNCTION = """
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

_NAME_KEY = "carnet_name_key(first_name, last_name, postal_code)"
_EMAIL_KEY = "carnet_email_key(email)"


def upgrade() -> None:
    op.create_table('contact_merge',
    sa.Column('merged_id', sa.Uuid(), nullable=False),
    sa.Column('survivor_id', sa.Uuid(), nullable=False),
    sa.Column('merged_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('subject', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.PrimaryKeyConstraint('merged_id', name=op.f('pk_contact_merge'))
    )
    op.create_index(op.f('ix_contact_merge_survivor_id'), 'contact_merge', ['survivor_id'], unique=False)
    op.execute(_NAME_KEY_FUNCTION)
    op.execute(_EMAIL_KEY_FUNCTION)
    op.create_index('ix_contact_name_key', 'contact', [sa.literal_column(_NAME_KEY)], unique=False,
                    postgresql_where=sa.text(f"{_NAME_KEY} IS NOT NULL"))
    op.create_index('ix_contact_email_key', 'contact', [sa.literal_column(_EMAIL_KEY)], unique=False,
                    postgresql_where=sa.text(f"{_EMAIL_KEY} IS NOT NULL"))
    op.execute(_MERGE_AWARE_FUNCTION)


def downgrade() -> None:
    op.execute(_ERASURE_ONLY_FUNCTION)
    op.drop_index('ix_contact_email_key', table_name='contact')
    op.drop_index('ix_contact_name_key', table_name='contact')
    op.execute("DROP FUNCTION carnet_email_key(text)")
    op.execute("DROP FUNCTION carnet_name_key(text, text, text)")
    op.drop_index(op.f('ix_contact_merge_survivor_id'), table_name='contact_merge')
    op.drop_table('contact_merge')
