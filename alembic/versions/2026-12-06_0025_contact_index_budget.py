"""The index budget of `contact` (docs/performance.md "Index budget"): a row no indexed query can match is not indexed.

Every index keeps the query it serves (tests/test_index_budget.py EXPLAINs each one); what changes is which rows
they hold, so that a new contact (an import, an upsert) pays only for the indexes its values can be found by:

- filters on a nullable column (`phone`, `postal_code`, `country`, `lower(city)`) and the `q` prefix indexes
  (last name, first name, company): `WHERE <column> IS NOT NULL`. Every query on them compares the column with a
  strict operator (`=`, `LIKE`), which implies the predicate: the planner proves it by itself, generic plans
  included.
- `kind` and `lifecycle_stage`: `WHERE ... <> 'prospect'`. Every new contact is a prospect, so most rows are;
  a filter on `prospect` reads most of the table, where no index helps. A query for another value names the
  predicate itself (`app.models.contacts.off_default`), as a constant, so generic plans prove it too.
- `tags` (GIN): `WHERE cardinality(tags) > 0`, and tag conditions say so (`app.models.contacts.tagged`). A
  GIN index holds a placeholder entry for every empty array: most contacts, every import.
- PostgreSQL reads no statistics from a partial index's expression (a selectivity of `lower(city) = 'lyon'` or of a
  `q` prefix fell back to a guess): statistics objects on `lower(city)`, `lower(last_name)`, `lower(first_name)` and
  `lower(company)` give them back (ANALYZE fills them; nothing on insert).
- `carnet_name_key(...)` skips NFKD normalization for plain-ASCII names (NFKD leaves ASCII as it is: the same keys,
  reindexed here); normalization was most of the function's ~5 µs per insert.

Revision ID: 0025
Revises: 0024
Create Date: 2026-12-06 18:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0025'
down_revision: str | None = '0024'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (index, key, predicate, extra create_index arguments)
_PARTIAL: list[tuple[str, str, str, dict[str, object]]] = [
    ('ix_contact_phone', 'phone', 'phone IS NOT NULL', {}),
    ('ix_contact_postal_code', 'postal_code', 'postal_code IS NOT NULL', {}),
    ('ix_contact_country', 'country', 'country IS NOT NULL', {}),
    ('ix_contact_city', 'lower(city)', 'city IS NOT NULL', {}),
    ('ix_contact_q_last_name', 'lower(last_name)', 'last_name IS NOT NULL', {'ops': 'q_last'}),
    ('ix_contact_q_first_name', 'lower(first_name)', 'first_name IS NOT NULL', {'ops': 'q_first'}),
    ('ix_contact_q_company', 'lower(company)', 'company IS NOT NULL', {'ops': 'q_company'}),
    ('ix_contact_kind', 'kind', "kind <> 'prospect'", {}),
    ('ix_contact_lifecycle_stage', 'lifecycle_stage', "lifecycle_stage <> 'prospect'", {}),
    ('ix_contact_tags', 'tags', 'cardinality(tags) > 0', {'gin': True}),
]

_FOLD_BEFORE = (r"""nullif(regexp_replace(replace(replace(replace(lower(normalize({v}, NFKD)), 'œ', 'oe'), 'æ', 'ae'),"""
                r""" 'ß', 'ss'), '[\u0300-\u036f[:space:]''’.,_-]+', '', 'g'), '')""")
# octet_length = length: every character is one byte, i.e. ASCII, which NFKD leaves unchanged.
_FOLD_AFTER = (r"""nullif(regexp_replace(replace(replace(replace(lower(CASE WHEN octet_length({v}) = length({v}) THEN {v}"""
               r""" ELSE normalize({v}, NFKD) END), 'œ', 'oe'), 'æ', 'ae'),"""
               r""" 'ß', 'ss'), '[\u0300-\u036f[:space:]''’.,_-]+', '', 'g'), '')""")
_NAME_KEY_FUNCTION = """
CREATE OR REPLACE FUNCTION carnet_name_key(first_name text, last_name text, postal_code text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT {first} || ' ' || {last}
           || '|' || nullif(upper(regexp_replace(postal_code, '[[:space:]-]+', '', 'g')), '')
$$
"""


_STATISTICS = {'st_contact_lower_city': 'lower(city)', 'st_contact_lower_last_name': 'lower(last_name)',
               'st_contact_lower_first_name': 'lower(first_name)', 'st_contact_lower_company': 'lower(company)'}


def _name_key_function(fold: str) -> str:
    return _NAME_KEY_FUNCTION.format(first=fold.format(v='first_name'), last=fold.format(v='last_name'))


def _create(name: str, key: str, extra: dict[str, object], where: str | None) -> None:
    kwargs: dict[str, object] = {}
    column = sa.literal_column(key)
    if 'ops' in extra:
        column = column.label(str(extra['ops']))
        kwargs['postgresql_ops'] = {str(extra['ops']): 'text_pattern_ops'}
    if extra.get('gin'):
        kwargs['postgresql_using'] = 'gin'
    if where is not None:
        kwargs['postgresql_where'] = sa.text(where)
    op.create_index(name, 'contact', [column], unique=False, **kwargs)  # type: ignore[arg-type]


def upgrade() -> None:
    for name, key, where, extra in _PARTIAL:
        op.drop_index(name, table_name='contact')
        _create(name, key, extra, where)
    for name, expression in _STATISTICS.items():
        op.execute(f'CREATE STATISTICS {name} ON ({expression}) FROM contact')
    op.execute('ANALYZE contact')
    op.execute(_name_key_function(_FOLD_AFTER))
    op.execute('REINDEX INDEX ix_contact_name_key')


def downgrade() -> None:
    op.execute(_name_key_function(_FOLD_BEFORE))
    op.execute('REINDEX INDEX ix_contact_name_key')
    for name in _STATISTICS:
        op.execute(f'DROP STATISTICS {name}')
    for name, key, _where, extra in _PARTIAL:
        op.drop_index(name, table_name='contact')
        _create(name, key, extra, None)
