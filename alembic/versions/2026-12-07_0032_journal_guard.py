"""The access journal is append-only in the database, as the consent ledger is (0003, 0005, 0007, 0021).

A trigger refuses every UPDATE and DELETE of `journal_entry`, `journal_pending` and `journal_anchor` but the
three the application does, each only while `carnet.journal` names it for the transaction (SET LOCAL via
`set_config(..., true)`, app/services/journal.py):

- `chaining`: `append` drains `journal_pending` (DELETE) into the chain;
- `forgetting`: erasure (`forget`) rewrites `refs` of entries and pending acts; nothing else may change, and
  every ref it adds is an `erased:` digest;
- `pruning`: retention (`prune`) deletes old entries and writes the anchor they verify from.

The anchor is never deleted, and written only while pruning. TRUNCATE and a superuser disabling triggers are
not stopped: `carnet journal verify` and the head line kept outside the database tell those (docs/gdpr.md).

Revision ID: 0032
Revises: 0031
Create Date: 2026-12-07 22:30:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0032'
down_revision: str | None = '0031'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_GUARD = """
CREATE FUNCTION journal_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    doing text := coalesce(current_setting('carnet.journal', true), '');
BEGIN
    -- Nested, not one AND chain: a plpgsql condition is planned whole, and NEW.refs does not exist on the
    -- anchor (nor NEW on a DELETE).
    IF TG_TABLE_NAME = 'journal_anchor' THEN
        IF TG_OP IN ('INSERT', 'UPDATE') AND doing = 'pruning' THEN
            RETURN NEW;  -- retention: the anchor now holds the last removed entry's hash
        END IF;
    ELSIF TG_OP = 'DELETE' THEN
        IF (TG_TABLE_NAME = 'journal_pending' AND doing = 'chaining')
           OR (TG_TABLE_NAME = 'journal_entry' AND doing = 'pruning') THEN
            RETURN OLD;  -- append: an act joins the chain; retention: an old entry goes
        END IF;
    ELSIF doing = 'forgetting' THEN
        IF to_jsonb(NEW) - 'refs' = to_jsonb(OLD) - 'refs'
           AND NOT EXISTS (SELECT 1 FROM unnest(NEW.refs) AS r(ref)
                           WHERE r.ref NOT LIKE 'erased:%' AND r.ref <> ALL (OLD.refs)) THEN
            RETURN NEW;  -- erasure: a person's contact id becomes their digests, nothing else changes
        END IF;
    END IF;
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$
"""


def upgrade() -> None:
    op.execute(_GUARD)
    for table in ("journal_entry", "journal_pending"):
        op.execute(f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                   "FOR EACH ROW EXECUTE FUNCTION journal_append_only()")
    op.execute("CREATE TRIGGER journal_anchor_append_only BEFORE INSERT OR UPDATE OR DELETE ON journal_anchor "
               "FOR EACH ROW EXECUTE FUNCTION journal_append_only()")


def downgrade() -> None:
    for table in ("journal_anchor", "journal_pending", "journal_entry"):
        op.execute(f"DROP TRIGGER {table}_append_only ON {table}")
    op.execute("DROP FUNCTION journal_append_only()")
