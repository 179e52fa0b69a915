"""The duplicate finder's keys as stored generated columns, so that finding the keys two contacts share reads one index;
`?kind=` and `?lifecycle_stage=` pages on their index in the default order.

`GET /v1/contacts/duplicates` walked every contact in id order and probed each rule's index for it: on a file
with few duplicates (the usual shop) a page read the whole table, ~30 µs a contact, and a million contacts ran
into the statement timeout (docs/performance.md, "Duplicate candidates"). It now walks each rule's keys in
order and keeps those held by two contacts or more (app/services/duplicates.py). An expression index cannot
answer that from the index alone (PostgreSQL reads the table to recompute the expression: 11.7 s for 1M
contacts, against 0.65 s index-only once the key is a column), so `name_key` and `email_key` are stored generated
columns and their indexes are plain ones; partial, since a contact without a key can never match.

The functions are the same, so every stored key equals what the old indexes held. A migration that ever
replaces `carnet_name_key` or `carnet_email_key` must recompute the columns (`UPDATE contact SET email = email`):
PostgreSQL does not do it by itself. Adding the columns rewrites `contact` under an exclusive lock (~20-45 s per
million contacts on the 2-core machine: docs/operations.md, "Upgrading").

`ix_contact_kind` and `ix_contact_lifecycle_stage` gain the default order's columns, `(created_at, id)`: in a
shop that imported prospects after its customers, the newest rows are all prospects, and `?kind=customer`
walked them down `ix_contact_created_at_id` (the planner assumes the kinds spread evenly): 2.2 s on 1M
contacts where 411,000 prospects came last. Still partial on `<> 'prospect'`.

The key columns are not in the SQLModel table (alembic/env.py leaves them out of the comparison): only the duplicate
finder reads them, and no `select(*contact.c)` ever returns them.

Revision ID: 0028
Revises: 0027
Create Date: 2026-12-07 04:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0028'
down_revision: str | None = '0027'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NAME_KEY = "carnet_name_key(first_name, last_name, postal_code)"
_EMAIL_KEY = "carnet_email_key(email)"
_SPARSE = ("kind", "lifecycle_stage")


def upgrade() -> None:
    op.execute(f"""
        ALTER TABLE contact
            ADD COLUMN name_key text GENERATED ALWAYS AS ({_NAME_KEY}) STORED,
            ADD COLUMN email_key text GENERATED ALWAYS AS ({_EMAIL_KEY}) STORED
    """)
    op.execute("DROP INDEX ix_contact_name_key")
    op.execute("DROP INDEX ix_contact_email_key")
    op.execute("CREATE INDEX ix_contact_name_key ON contact (name_key) WHERE name_key IS NOT NULL")
    op.execute("CREATE INDEX ix_contact_email_key ON contact (email_key) WHERE email_key IS NOT NULL")
    for column in _SPARSE:
        op.execute(f"DROP INDEX ix_contact_{column}")
        op.execute(f"CREATE INDEX ix_contact_{column} ON contact ({column}, created_at, id) "
                   f"WHERE {column} <> 'prospect'")


def downgrade() -> None:
    for column in _SPARSE:
        op.execute(f"DROP INDEX ix_contact_{column}")
        op.execute(f"CREATE INDEX ix_contact_{column} ON contact ({column}) WHERE {column} <> 'prospect'")
    op.execute("DROP INDEX ix_contact_name_key")
    op.execute("DROP INDEX ix_contact_email_key")
    op.execute("ALTER TABLE contact DROP COLUMN name_key, DROP COLUMN email_key")
    op.execute(f"CREATE INDEX ix_contact_name_key ON contact ({_NAME_KEY})")
    op.execute(f"CREATE INDEX ix_contact_email_key ON contact ({_EMAIL_KEY}) WHERE {_EMAIL_KEY} IS NOT NULL")
