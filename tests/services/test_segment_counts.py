"""A count condition that only asks "at least one" or "none" compiles to EXISTS / NOT EXISTS, which PostgreSQL can
run as one semi- or anti-join; any other count stays a correlated count, except alone in a stored segment when it
needs one row or more ("at least 2", "exactly 1"): then it is counted from the rows, grouped by contact.
(That the answers are right is the property tests': tests/services/test_segments_property.py compares every count
op and value 0-3 with Python, tests/services/test_segment_count_path.py the stored segments' counts.)"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql

from app.models import Contact
from app.services.segments import _compile


def _sql(filter_: dict[str, Any]) -> str:
    expression = _compile(filter_, {}, datetime.now(UTC)).expression
    statement = select(func.count()).select_from(Contact.__table__).where(expression)  # type: ignore[attr-defined]
    return " ".join(str(statement.compile(dialect=postgresql.dialect())).split())


def _orders(op: str, value: float) -> dict[str, Any]:
    return {"field": "orders.count", "op": op, "value": value, "within_days": 365}


def _events(op: str, value: int) -> dict[str, Any]:
    return {"field": "events.type", "op": "eq", "value": "page_view", "count": {"op": op, "value": value}}


@pytest.mark.parametrize("make", [_orders, _events])
@pytest.mark.parametrize(("op", "value"), [("gte", 1), ("gt", 0), ("neq", 0), ("gte", 1.0)])
def test_at_least_one_is_exists(make: Any, op: str, value: int) -> None:
    sql = _sql(make(op, value))
    assert "WHERE EXISTS (SELECT" in sql and "NOT (EXISTS" not in sql and "count(*) AS count_2" not in sql


@pytest.mark.parametrize("make", [_orders, _events])
@pytest.mark.parametrize(("op", "value"), [("lt", 1), ("lte", 0), ("eq", 0)])
def test_none_is_not_exists(make: Any, op: str, value: int) -> None:
    sql = _sql(make(op, value))
    assert "NOT (EXISTS (SELECT" in sql and "count(*) AS count_2" not in sql


@pytest.mark.parametrize("make", [_orders, _events])
@pytest.mark.parametrize(("op", "value"), [("gte", 2), ("gt", 1), ("eq", 1), ("lt", 2), ("neq", 1)])
def test_other_counts_are_counted(make: Any, op: str, value: int) -> None:
    assert "(SELECT count(*) AS count_2" in _sql(make(op, value))


def test_at_least_one_order_alone_is_counted_from_the_orders() -> None:
    # a lone "has such orders" condition: the distinct contacts of the matching orders (_Compiled.counting)
    assert _compile(_orders("gte", 1), {}, datetime.now(UTC)).lone_activity is not None
    assert _compile(_orders("eq", 0), {}, datetime.now(UTC)).lone_activity is None
    assert _compile(_orders("gte", 2), {}, datetime.now(UTC)).lone_activity is None


@pytest.mark.parametrize("make", [_orders, _events])
@pytest.mark.parametrize(("op", "value", "grouped"), [
    ("gte", 2, True), ("gt", 1, True), ("eq", 1, True), ("eq", 3, True), ("lt", 2, False), ("lte", 1, False),
    ("neq", 1, False),
])
def test_a_lone_count_needing_a_row_is_counted_from_the_rows(make: Any, op: str, value: int, grouped: bool) -> None:
    compiled = _compile(make(op, value), {}, datetime.now(UTC))
    assert (compiled.lone_count is not None) == grouped and compiled.lone_activity is None


def test_a_lone_count_is_grouped_from_the_rows_and_not_in_company() -> None:
    counting = _compile(_orders("gte", 2), {}, datetime.now(UTC)).counting()
    sql = " ".join(str(counting.compile(dialect=postgresql.dialect())).split())
    assert "GROUP BY \"order\".contact_id HAVING count(*) >=" in sql and "FROM contact" not in sql
    with_city = {"all": [_orders("gte", 2), {"field": "address.city", "op": "eq", "value": "Lyon"}]}
    assert _compile(with_city, {}, datetime.now(UTC)).lone_count is None
    assert _compile({"not": _orders("gte", 2)}, {}, datetime.now(UTC)).lone_count is None
