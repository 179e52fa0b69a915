"""Free-form JSON a caller can store (event properties, segment filters): checked before it is kept.

Unchecked, a value nested a few hundred levels deep is stored, then breaks every response that carries it
(pydantic-core refuses to render it: a 500 on the person's events, timeline and GDPR export), and a lone
surrogate (`"\\ud800"`) or a NUL cannot be sent to PostgreSQL at all (a 500 DBAPIError). Iterative, so no
depth can overflow the check itself.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator

__all__ = ["MAX_JSON_DEPTH", "MAX_JSON_VALUES", "FreeJSONObject", "json_problem", "unstorable_text"]

MAX_JSON_DEPTH = 32  # objects and arrays, the value itself counted: {"a": {"b": 1}} is 2 deep
MAX_JSON_VALUES = 10_000  # objects, arrays, keys' values and array items, the value itself counted


def unstorable_text(value: str) -> bool:
    """True for text PostgreSQL cannot hold: a NUL, or a lone surrogate (not UTF-8 encodable)."""
    if "\x00" in value:
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def json_problem(value: Any, *, max_depth: int = MAX_JSON_DEPTH, max_values: int | None = MAX_JSON_VALUES,
                 text: bool = True) -> str | None:
    """Why `value` (as parsed from JSON) cannot be stored, or None when it can; `text=False` checks the size only.

    Cheap before anything else looks at the value: it stops at the first container that would take it past
    `max_values` (before walking its members), so a 5 MB array of 1.7M `{}` costs one `len()`."""
    if type(value) is dict and max_depth >= 1 and (max_values is None or len(value) < max_values):
        texts = _flat_texts(value)  # an event's usual properties: a third of the walk's time
        if texts is not None:
            return _UNSTORABLE if text and unstorable_text(texts) else None
    stack: list[tuple[Any, int]] = [(value, 1)]
    seen = 1
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list | tuple):
            if depth > max_depth:
                return f"nested more than {max_depth} levels deep"
            seen += len(item)
            if max_values is not None and seen > max_values:
                return f"more than {max_values:,} JSON values (objects, arrays, their members) in all"
        if isinstance(item, dict):
            for key, child in item.items():
                if text and isinstance(key, str) and unstorable_text(key):
                    return _UNSTORABLE
                stack.append((child, depth + 1))
        elif isinstance(item, list | tuple):
            stack.extend((child, depth + 1) for child in item)
        elif text and isinstance(item, str) and unstorable_text(item):
            return _UNSTORABLE
    return None


_SCALARS = frozenset({str, int, float, bool, type(None)})
_UNSTORABLE = "keys and text must be valid UTF-8 without NUL characters"


def _flat_texts(value: dict[str, Any]) -> str | None:
    """The keys and text of an object whose members are all scalars, joined into one string to check at once (a
    lone surrogate stays lone: Python never pairs two of them when encoding); None when a member is an object or
    an array. One loop: a join over two generators after an `all()` over a third took twice as long."""
    texts: list[str] = []
    for key, child in value.items():
        kind = type(child)
        if kind is str:
            texts.append(child)
        elif kind not in _SCALARS:
            return None
        if type(key) is str:
            texts.append(key)
    return "".join(texts)


def _storable(value: Any) -> Any:
    problem = json_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


# A JSON object stored as given: at most MAX_JSON_DEPTH deep, text PostgreSQL can hold.
FreeJSONObject = Annotated[dict[str, Any], BeforeValidator(_storable)]  # before: the error names the field itself
