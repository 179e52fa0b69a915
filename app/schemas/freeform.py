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
    if type(value) is dict and max_depth >= 1 and (max_values is None or len(value) < max_values) \
            and all(type(child) in _SCALARS for child in value.values()):
        return _flat_text_problem(value) if text else None  # an event's usual properties: a third of the walk's time
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
                    return "keys and text must be valid UTF-8 without NUL characters"
                stack.append((child, depth + 1))
        elif isinstance(item, list | tuple):
            stack.extend((child, depth + 1) for child in item)
        elif text and isinstance(item, str) and unstorable_text(item):
            return "keys and text must be valid UTF-8 without NUL characters"
    return None


_SCALARS = frozenset({str, int, float, bool, type(None)})


def _flat_text_problem(value: dict[str, Any]) -> str | None:
    """`json_problem` of an object whose members are all scalars: its keys and text, checked in one string (joined,
    a lone surrogate stays lone: Python never pairs two of them when encoding)."""
    joined = "".join([*(key for key in value if type(key) is str),
                      *(child for child in value.values() if type(child) is str)])
    return "keys and text must be valid UTF-8 without NUL characters" if unstorable_text(joined) else None


def _storable(value: Any) -> Any:
    problem = json_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


# A JSON object stored as given: at most MAX_JSON_DEPTH deep, text PostgreSQL can hold.
FreeJSONObject = Annotated[dict[str, Any], BeforeValidator(_storable)]  # before: the error names the field itself
