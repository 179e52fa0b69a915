"""A segment's members read whole (a sync refresh: segments.members_condition): a count needing a row or more that
the filter requires, alone or with other conditions, grouped from the rows or counted contact by contact, as the
planner's costs say (segments._groups_better); the same members either way, those of the Python oracle."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.models import Contact
from app.services import segments
from tests.services.test_segment_count_path import _AMONG_OTHERS, _LONE_COUNTS, seed_world
from tests.services.test_segments_property import ATTRIBUTES, NOW, matches

_contact = Contact.__table__  # type: ignore[attr-defined]


@pytest.fixture
def stored() -> dict[str, Any]:
    return {}


# never grouped (even where a cost is 0: inf * 0 is nan), always grouped
@pytest.mark.parametrize("grouped_past", [math.inf, 0.0])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(filter_=st.one_of(st.sampled_from(_LONE_COUNTS), _AMONG_OTHERS))
async def test_members_match_the_reference_in_either_form(
    sessions: async_sessionmaker[AsyncSession], stored: dict[str, Any], grouped_past: float,
    filter_: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(segments, "GROUPED_PAST", grouped_past)
    await seed_world(sessions, stored, 7)
    expected = {c["id"] for c in stored["contacts"] if matches(c, filter_)}
    async with sessions() as session:
        condition = await segments.members_condition(session, filter_, now=NOW)
        members = set((await session.scalars(select(_contact.c.id).where(condition))).all())
        grouped = "GROUP BY" in str(condition.compile())
    assert {str(m) for m in members} == {str(e) for e in expected}, filter_
    compiled = segments._compile(filter_, ATTRIBUTES, NOW)
    if (compiled.lone_count or compiled.count_among_others) is not None:
        assert grouped is (grouped_past == 0.0), filter_
