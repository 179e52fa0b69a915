"""Free-form JSON (event properties, segment filters): the flat-object fast path of `json_problem` answers exactly
what the full walk answers (issue 18: it is run on every event of a batch)."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from app.schemas.freeform import MAX_JSON_VALUES, json_problem

# text with the characters that matter: NUL, lone surrogates (high and low, which must never pair), plain letters
_TEXT = st.text(alphabet=st.sampled_from(["a", "é", "\x00", "\ud800", "\udc00", "\U0001f600", " "]), max_size=6)
_SCALAR = st.one_of(_TEXT, st.integers(), st.floats(allow_nan=False), st.booleans(), st.none())


def _walked(value: Any, **limits: Any) -> str | None:
    """The full walk's answer for `value`: inside a one-item list, one level and one value more allowed."""
    depth, values = limits.get("max_depth", 32), limits.get("max_values", MAX_JSON_VALUES)
    return json_problem([value], max_depth=depth + 1, max_values=None if values is None else values + 1,
                        text=limits.get("text", True))


@given(value=st.dictionaries(_TEXT, _SCALAR, max_size=8), text=st.booleans())
def test_a_flat_object_gets_the_walks_answer(value: dict[str, Any], text: bool) -> None:
    assert json_problem(value, text=text) == _walked(value, text=text)


@given(value=st.dictionaries(_TEXT, st.one_of(_SCALAR, st.lists(_SCALAR, max_size=3),
                                              st.dictionaries(_TEXT, _SCALAR, max_size=3)), max_size=8),
       text=st.booleans())
def test_an_object_with_nested_members_gets_the_walks_answer(value: dict[str, Any], text: bool) -> None:
    # the fast path gives up at its first object or array member, wherever it is: the walk answers for all of it
    assert json_problem(value, text=text) == _walked(value, text=text)


@given(size=st.integers(min_value=0, max_value=6), limit=st.integers(min_value=1, max_value=8))
def test_the_value_count_bound_holds_on_the_flat_path(size: int, limit: int) -> None:
    value = {f"k{i}": i for i in range(size)}
    answer = json_problem(value, max_values=limit)
    assert (answer is None) == (_walked(value, max_values=limit) is None) == (1 + size <= limit)
    assert answer is None or answer.startswith(f"more than {limit:,} JSON values")


def test_a_surrogate_pair_split_over_two_texts_is_still_refused() -> None:
    assert json_problem({"\ud83d": "\ude00"}) is not None
    assert json_problem({"a": "\ud83d", "b": "\ude00"}) is not None
    assert json_problem({"a": "\U0001f600"}) is None
