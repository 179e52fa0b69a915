"""Segments: saved filters over contacts, compiled to ONE SQLAlchemy Core boolean expression.

The filter grammar (docs/api.md, "Segments"):

    node      := {"all": [node, ...]} | {"any": [node, ...]} | {"not": node} | condition
    condition := {"field": F, "op": OP, "value": V, ["within_days": N], ["count": {"op": OP, "value": N}]}

Every field, op and attribute name is checked against an allow-list; every value is a bound parameter.
A faulty part is reported as a FieldError whose `field` is its JSON path (`filter.all[2].op`).

Each compiled condition is two-valued (never NULL), so `not` is the exact complement of its operand:
comparisons on nullable values are guarded with `IS NOT NULL`, and `neq`/`nin` match absent values.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
from sqlalchemy import (
    BindParameter,
    Boolean,
    ColumnElement,
    Date,
    DateTime,
    Numeric,
    Select,
    and_,
    bindparam,
    cast,
    delete,
    distinct,
    exists,
    false,
    func,
    literal,
    not_,
    or_,
    select,
    true,
)
from sqlalchemy import update as update_statement
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, insert
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.types import Text

from app.db import driver_connection, is_unique_violation
from app.errors import Conflict, FieldError, InvalidInput, NotFound, PreconditionFailed
from app.models import (
    AttributeDefinition,
    Cart,
    ConsentEvent,
    Contact,
    Destination,
    Event,
    ListMembership,
    MailingList,
    Order,
    Segment,
    SegmentSync,
)
from app.models.base import new_id, utc_now
from app.models.contacts import off_default, tagged
from app.models.orders import CART_STATUSES
from app.schemas.contacts import ContactKind, LifecycleStage
from app.schemas.freeform import json_problem, unstorable_text
from app.schemas.segments import MAX_CONDITIONS, MAX_DEPTH, check_filter_bounds
from app.schemas.types import bounded_decimal, utc_instant
from app.security import Principal, Scope
from app.services.attributes import NUMBER_DIGITS, NUMBER_PLACES
from app.services.orders import NOT_COUNTED  # cancelled and refunded orders never count
from app.services.pagination import Cursor, CursorCodec, page_by_name

__all__ = [
    "MAX_CONDITIONS",
    "MAX_DEPTH",
    "DuplicateSegment",
    "SegmentInUse",
    "SegmentNotFound",
    "compile_filter",
    "contacts_page",
    "count",
    "count_stored",
    "create",
    "delete_segment",
    "get",
    "list_page",
    "mentions_attributes",
    "preview",
    "segment_condition",
    "update",
]

MAX_VALUES = 100         # items of an `in` / `nin` list
MAX_DAYS = 36500
MONEY_DIGITS, MONEY_PLACES = 12, 2            # numeric(14, 2): the order amounts and contact stats
ATTRIBUTE_DIGITS, ATTRIBUTE_PLACES = NUMBER_DIGITS, NUMBER_PLACES  # number attributes, as stored
MAX_TEXT = 255
GRANTING = ("granted", "confirmed")

_t = Contact.__table__  # type: ignore[attr-defined]
_segments = Segment.__table__  # type: ignore[attr-defined]
_defs = AttributeDefinition.__table__  # type: ignore[attr-defined]
_members = ListMembership.__table__  # type: ignore[attr-defined]
_lists = MailingList.__table__  # type: ignore[attr-defined]
_orders = Order.__table__  # type: ignore[attr-defined]
_carts = Cart.__table__  # type: ignore[attr-defined]
_events = Event.__table__  # type: ignore[attr-defined]
_consents = ConsentEvent.__table__  # type: ignore[attr-defined]
_syncs = SegmentSync.__table__  # type: ignore[attr-defined]
_destinations = Destination.__table__  # type: ignore[attr-defined]

Row = Mapping[str, Any]


class SegmentNotFound(NotFound):
    slug, title = "segment-not-found", "No such segment"


class SegmentInUse(Conflict):
    slug, title = "segment-in-use", "The segment is synced by a destination"


class DuplicateSegment(Conflict):
    slug, title = "duplicate-segment", "A segment with this name already exists"


# ---- the grammar: value kinds, their ops, and the fields ---------------------------------------------------

TEXT, ENUM, NUMBER, INTEGER, TIMESTAMP, DATE, BOOLEAN = (
    "text", "enum", "number", "integer", "timestamp", "date", "boolean",
)
TAGS, LISTS, MULTI, ORDER_ITEM, ORDER_COUNT, EVENT_TYPE, CONSENT, CART_STATUS = (
    "tags", "lists", "multi_enum", "order_item", "order_count", "event_type", "consent", "cart_status",
)
_ORDERED = ("gt", "gte", "lt", "lte", "between")
OPS: dict[str, tuple[str, ...]] = {
    TEXT: ("eq", "neq", "in", "nin", "contains", "exists"),
    ENUM: ("eq", "neq", "in", "nin", "exists"),
    NUMBER: ("eq", "neq", "in", "nin", *_ORDERED, "exists"),
    INTEGER: ("eq", "neq", "in", "nin", *_ORDERED),
    TIMESTAMP: (*_ORDERED, "within_days", "older_than_days", "exists"),
    DATE: ("eq", "neq", *_ORDERED, "within_days", "older_than_days", "exists"),
    BOOLEAN: ("eq", "neq", "exists"),
    TAGS: ("eq", "contains", "neq", "in", "nin", "exists"),
    LISTS: ("eq", "contains", "neq", "in", "nin"),
    MULTI: ("contains", "neq", "in", "nin", "exists"),
    ORDER_ITEM: ("eq", "in"),
    ORDER_COUNT: ("eq", "neq", *_ORDERED),
    EVENT_TYPE: ("eq", "in"),
    CONSENT: ("eq",),
    CART_STATUS: ("eq", "in"),
}
COUNT_OPS = ("eq", "neq", "gt", "gte", "lt", "lte")
WITH_WINDOW = (ORDER_ITEM, ORDER_COUNT, EVENT_TYPE, CART_STATUS)   # accept "within_days"
WITH_COUNT = (ORDER_ITEM, EVENT_TYPE, CART_STATUS)                 # accept "count"


@dataclass(frozen=True, slots=True)
class FieldSpec:
    kind: str
    column: Any = None                       # the contact column, for plain fields
    choices: tuple[str, ...] | None = None   # allowed values for enums
    casefold: bool = False                   # compared case-insensitively (the city index is on lower(city))
    attribute: str | None = None             # attributes.<name>: the JSONB key


FIELDS: dict[str, FieldSpec] = {
    "kind": FieldSpec(ENUM, _t.c.kind, tuple(k.value for k in ContactKind)),
    "lifecycle_stage": FieldSpec(ENUM, _t.c.lifecycle_stage, tuple(s.value for s in LifecycleStage)),
    "email_status": FieldSpec(ENUM, _t.c.email_status),
    "source": FieldSpec(ENUM, _t.c.source),
    "language": FieldSpec(ENUM, _t.c.language),
    "company": FieldSpec(TEXT, _t.c.company),
    "address.city": FieldSpec(TEXT, _t.c.city, casefold=True),
    "address.postal_code": FieldSpec(ENUM, _t.c.postal_code),
    "address.country": FieldSpec(ENUM, _t.c.country),
    "created_at": FieldSpec(TIMESTAMP, _t.c.created_at),
    "updated_at": FieldSpec(TIMESTAMP, _t.c.updated_at),
    "last_activity_at": FieldSpec(TIMESTAMP, _t.c.last_activity_at),
    "tags": FieldSpec(TAGS, _t.c.tags),
    "lists": FieldSpec(LISTS),
    "stats.orders_count": FieldSpec(INTEGER, _t.c.orders_count),
    "stats.total_spent": FieldSpec(NUMBER, _t.c.total_spent),
    "stats.average_basket": FieldSpec(NUMBER, _t.c.average_basket),
    "stats.last_order_at": FieldSpec(TIMESTAMP, _t.c.last_order_at),
    "orders.sku": FieldSpec(ORDER_ITEM, attribute="sku"),            # the key inside order.items
    "orders.category": FieldSpec(ORDER_ITEM, attribute="category"),
    "orders.count": FieldSpec(ORDER_COUNT),
    "events.type": FieldSpec(EVENT_TYPE),
    # A cart in this status; within_days: opened in the last N days (an abandoned cart of last week).
    "carts.status": FieldSpec(CART_STATUS, choices=CART_STATUSES),
    "consents.email_marketing": FieldSpec(CONSENT),
}
_ATTRIBUTE_KINDS = {"text": TEXT, "enum": ENUM, "number": NUMBER, "date": DATE, "boolean": BOOLEAN,
                    "multi_enum": MULTI}
_ATTRIBUTE_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")
_CONDITION_KEYS = frozenset({"field", "op", "value", "within_days", "count"})


# ---- compiling ---------------------------------------------------------------------------------------------


class _Invalid(Exception):
    """One faulty part of the filter; collected, then raised together as InvalidInput."""

    def __init__(self, path: str, message: str, code: str = "invalid_filter") -> None:
        super().__init__(message)
        self.error = FieldError(path, message, code)


@dataclass(slots=True)
class _Compiler:
    attributes: dict[str, str]                   # name -> attribute type
    now: datetime
    errors: list[FieldError] = field(default_factory=list)
    conditions: int = 0
    # the time-relative parameters (within_days, older_than_days cutoffs): bind key -> its value at a given
    # `now`, so a cached compiled statement re-binds them on every execution (count_stored)
    clock: dict[str, Callable[[datetime], Any]] = field(default_factory=dict)
    # each EXISTS over orders or events compiled: (table, its conditions without the contact correlation)
    activities: list[tuple[Any, list[Any]]] = field(default_factory=list)
    # each count of them that needs one row or more: (table, its conditions so, the test of the count)
    counts: list[tuple[Any, list[Any], ColumnElement[bool]]] = field(default_factory=list)
    # those of `counts` that every match must pass (not under `any` or `not`), and how to compile them: per contact
    # (a correlated count) or "grouped" (the contacts grouped from the rows: _groups_better)
    required_counts: list[tuple[Any, list[Any], ColumnElement[bool]]] = field(default_factory=list)
    required: bool = True
    counting: str = "per_contact"
    # each list id a `lists` condition names, with its path: checked against the lists when a filter is saved
    lists: list[tuple[uuid.UUID, str]] = field(default_factory=list)

    def node(self, node: Any, path: str, depth: int) -> ColumnElement[bool]:
        try:
            if not isinstance(node, dict):
                raise _Invalid(path, "expected an object: a group (all, any, not) or a condition")
            groups = [k for k in ("all", "any", "not") if k in node]
            if groups:
                if len(node) != 1:
                    raise _Invalid(path, "a group has exactly one key: all, any or not")
                if depth >= MAX_DEPTH:
                    raise _Invalid(path, f"groups nest at most {MAX_DEPTH} deep", "too_deep")
                key = groups[0]
                return self.group(key, node[key], f"{path}.{key}", depth + 1)
            return self.condition(node, path)
        except _Invalid as exc:
            self.errors.append(exc.error)
            return false()

    def group(self, key: str, children: Any, path: str, depth: int) -> ColumnElement[bool]:
        required, self.required = self.required, self.required and key == "all"
        try:
            if key == "not":
                return not_(self.node(children, path, depth))
            if not isinstance(children, list) or not children:
                raise _Invalid(path, "expected a non-empty array of conditions or groups")
            parts = [self.node(child, f"{path}[{i}]", depth) for i, child in enumerate(children)]
            return and_(*parts) if key == "all" else or_(*parts)
        finally:
            self.required = required

    def condition(self, node: dict[str, Any], path: str) -> ColumnElement[bool]:
        self.conditions += 1
        if self.conditions > MAX_CONDITIONS:
            raise _Invalid(path, f"a filter holds at most {MAX_CONDITIONS} conditions", "too_many_conditions")
        for key in node:
            if key not in _CONDITION_KEYS:
                raise _Invalid(f"{path}.{_safe(key)}", "unknown key: a condition has field, op, value "
                               "(and within_days, count for orders, carts and events)", "unknown_key")
        name = node.get("field")
        spec = self.field(name, f"{path}.field")
        op = node.get("op")
        if not isinstance(op, str) or op not in OPS[spec.kind]:
            raise _Invalid(f"{path}.op", f"op must be one of: {', '.join(OPS[spec.kind])} for {name}", "invalid_op")
        if "within_days" in node and spec.kind not in WITH_WINDOW:
            raise _Invalid(f"{path}.within_days", "within_days is only for orders.*, carts.status and events.type",
                           "unknown_key")
        if "count" in node and spec.kind not in WITH_COUNT:
            raise _Invalid(f"{path}.count",
                           "count is only for orders.sku, orders.category, carts.status and events.type", "unknown_key")
        if "value" not in node and op != "exists":
            raise _Invalid(f"{path}.value", "a value is required", "missing")
        value = node.get("value", True)
        compile_kind = _KINDS[spec.kind]
        return compile_kind(self, spec, op, value, node, path)

    def field(self, name: Any, path: str) -> FieldSpec:
        if not isinstance(name, str):
            raise _Invalid(path, "expected a field name", "unknown_field")
        if name.startswith("attributes."):
            attribute = name.removeprefix("attributes.")
            if not _ATTRIBUTE_NAME.fullmatch(attribute) or attribute not in self.attributes:
                raise _Invalid(path, "unknown attribute: define it with POST /v1/attributes", "unknown_attribute")
            kind = _ATTRIBUTE_KINDS[self.attributes[attribute]]
            # the name is a bound parameter too: attributes -> $1
            return FieldSpec(kind, _t.c.attributes[attribute], attribute=attribute)
        spec = FIELDS.get(name)
        if spec is None:
            raise _Invalid(path, "unknown field", "unknown_field")
        return spec

    def cutoff(self, days: Any, path: str) -> BindParameter[datetime]:
        """`now - days` as a bound timestamptz, recorded in `clock`."""
        delta = timedelta(days=_days(days, path))
        return self._clocked(lambda now: now - delta, DateTime(timezone=True))

    def cutoff_date(self, days: Any, path: str) -> BindParameter[date]:
        """The date of `now - days` (for date attributes), recorded in `clock`."""
        delta = timedelta(days=_days(days, path))
        return self._clocked(lambda now: (now - delta).date(), Date())

    def _clocked(self, at: Callable[[datetime], Any], type_: Any) -> BindParameter[Any]:
        parameter = bindparam("cutoff", at(self.now), type_=type_, unique=True)
        self.clock[parameter.key] = at
        return parameter


def _safe(key: Any) -> str:
    text_key = str(key)
    return text_key if re.fullmatch(r"[A-Za-z0-9_]{1,40}", text_key) else "?"


# ---- values ------------------------------------------------------------------------------------------------


def _whole(value: Any) -> int | None:
    """The integer a JSON number stands for (`3` or `3.0`: JSON has one number type), or None."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _days(value: Any, path: str) -> int:
    days = _whole(value)
    if days is None or not 0 <= days <= MAX_DAYS:
        raise _Invalid(path, f"expected a whole number of days between 0 and {MAX_DAYS}")
    return days


def _text(value: Any, path: str, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT or unstorable_text(value):
        raise _Invalid(path, f"expected text of at most {MAX_TEXT} characters (UTF-8, without NUL)")
    if choices is not None and value not in choices:
        raise _Invalid(path, f"expected one of: {', '.join(choices)}")
    return value


def _integer(value: Any, path: str) -> int:
    number = _whole(value)
    if number is None or not 0 <= number <= 2**31 - 1:
        raise _Invalid(path, "expected a whole number >= 0")
    return number


def _number(value: Any, path: str, *, integer_digits: int = ATTRIBUTE_DIGITS, places: int = ATTRIBUTE_PLACES
            ) -> Decimal:
    """A value compared with a number: within what the compared column holds (so PostgreSQL can take it)."""
    try:
        return bounded_decimal(value, integer_digits=integer_digits, places=places)
    except ValueError as exc:
        raise _Invalid(path, str(exc)) from None


def _money(value: Any, path: str) -> Decimal:
    """Compared with a numeric(14, 2) column (stats.total_spent, stats.average_basket)."""
    return _number(value, path, integer_digits=MONEY_DIGITS, places=MONEY_PLACES)


# The documented forms only: Python's fromisoformat also reads ISO week dates (2026-W01-1), the basic format
# (20260101T000000+0000) and a space for the T, which would be stored in the filter as sent.
_DATE_FORM = re.compile(r"\d{4}-\d{2}-\d{2}")
_TIMESTAMP_FORM = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})")


def _timestamp(value: Any, path: str) -> datetime:
    if isinstance(value, str) and len(value) <= 40:
        try:
            if _DATE_FORM.fullmatch(value):
                return datetime.combine(date.fromisoformat(value), datetime.min.time(), UTC)
            if _TIMESTAMP_FORM.fullmatch(value):
                return utc_instant(datetime.fromisoformat(value))  # ValueError when timestamptz cannot hold it
        except ValueError:
            pass
    raise _Invalid(path, "expected an RFC 3339 timestamp with an offset, or a date YYYY-MM-DD")


def _date(value: Any, path: str) -> date:
    if isinstance(value, str) and _DATE_FORM.fullmatch(value):
        try:
            return date.fromisoformat(value)
        except ValueError:
            pass
    raise _Invalid(path, "expected a date YYYY-MM-DD")


def _boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(path, "expected true or false")
    return value


def _uuid(value: Any, path: str) -> uuid.UUID:
    if isinstance(value, str) and len(value) <= 40:
        try:
            return uuid.UUID(value)
        except ValueError:
            pass
    raise _Invalid(path, "expected a list id (UUID)")


def _values(value: Any, path: str, parse: Callable[[Any, str], Any]) -> list[Any]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_VALUES:
        raise _Invalid(path, f"expected an array of 1 to {MAX_VALUES} values")
    return [parse(v, f"{path}[{i}]") for i, v in enumerate(value)]


def _pair(value: Any, path: str, parse: Callable[[Any, str], Any]) -> tuple[Any, Any]:
    if not isinstance(value, list) or len(value) != 2:
        raise _Invalid(path, "between expects [low, high]")
    return parse(value[0], f"{path}[0]"), parse(value[1], f"{path}[1]")


# ---- compiling each kind of field ------------------------------------------------------------------------


def _scalar(expr: Any, op: str, value: Any, path: str, parse: Callable[[Any, str], Any],
            *, nullable: bool = True) -> ColumnElement[bool]:
    """eq/neq/in/nin/gt/gte/lt/lte/between on one value; never NULL (absent values: only neq/nin match)."""
    present = expr.is_not(None) if nullable else true()
    match op:
        case "eq":
            return and_(present, expr == parse(value, path))
        case "neq":
            return expr.is_distinct_from(parse(value, path))
        case "in":
            return and_(present, expr.in_(_values(value, path, parse)))
        case "nin":
            values = _values(value, path, parse)
            return or_(expr.is_(None), expr.not_in(values)) if nullable else expr.not_in(values)
        case "gt":
            return and_(present, expr > parse(value, path))
        case "gte":
            return and_(present, expr >= parse(value, path))
        case "lt":
            return and_(present, expr < parse(value, path))
        case "lte":
            return and_(present, expr <= parse(value, path))
        case "between":
            low, high = _pair(value, path, parse)
            return and_(present, expr.between(low, high))
    raise _Invalid(path, "unsupported op")  # pragma: no cover (ops are checked before)


def _exists(expr: Any, value: Any, path: str) -> ColumnElement[bool]:
    return expr.is_not(None) if _boolean(value, path) else expr.is_(None)


def _attribute_exists(spec: FieldSpec, value: Any, path: str) -> ColumnElement[bool]:
    present = _t.c.attributes.has_key(spec.attribute)
    return present if _boolean(value, path) else not_(present)


def _compile_text(c: _Compiler, spec: FieldSpec, op: str, value: Any, node: Mapping[str, Any], path: str) -> Any:
    vpath = f"{path}.value"
    attribute = spec.attribute is not None
    expr = spec.column.astext if attribute else spec.column
    if op == "exists":
        return _attribute_exists(spec, value, vpath) if attribute else _exists(expr, value, vpath)
    if op == "contains":
        needle = _text(value, vpath)
        escaped = needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return and_(expr.is_not(None), expr.ilike(f"%{escaped}%", escape="\\"))
    choices = spec.choices
    if spec.casefold:
        return _scalar(func.lower(expr), op, value, vpath, lambda v, p: _text(v, p).lower())
    condition = _scalar(expr, op, value, vpath, lambda v, p: _text(v, p, choices),
                        nullable=attribute or expr.nullable)
    if not attribute and spec.column.name in _SPARSE and op in ("eq", "in"):  # their partial indexes: models.contacts
        return and_(condition, off_default(spec.column.name, [value] if op == "eq" else value))
    return condition


_SPARSE = ("kind", "lifecycle_stage")


def _compile_number(c: _Compiler, spec: FieldSpec, op: str, value: Any, node: Mapping[str, Any], path: str) -> Any:
    vpath = f"{path}.value"
    if spec.attribute is not None:
        if op == "exists":
            return _attribute_exists(spec, value, vpath)
        return _scalar(cast(spec.column.astext, Numeric), op, value, vpath, _number)
    if op == "exists":
        return _exists(spec.column, value, vpath)
    return _scalar(spec.column, op, value, vpath, _money, nullable=spec.column.nullable)


def _compile_integer(c: _Compiler, spec: FieldSpec, op: str, value: Any, node: Mapping[str, Any], path: str) -> Any:
    return _scalar(spec.column, op, value, f"{path}.value", _integer, nullable=spec.column.nullable)


def _compile_timestamp(c: _Compiler, spec: FieldSpec, op: str, value: Any, node: Mapping[str, Any], path: str) -> Any:
    vpath = f"{path}.value"
    expr = spec.column
    if op == "exists":
        return _exists(expr, value, vpath)
    if op == "within_days":
        return and_(expr.is_not(None), expr >= c.cutoff(value, vpath))
    if op == "older_than_days":
        return and_(expr.is_not(None), expr < c.cutoff(value, vpath))
    return _scalar(expr, op, value, vpath, _timestamp, nullable=expr.nullable)


def _compile_date(c: _Compiler, spec: FieldSpec, op: str, value: Any, node: Mapping[str, Any], path: str) -> Any:
    vpath = f"{path}.value"
    expr = cast(spec.column.astext, Date)
    if op == "exists":
        return _attribute_exists(spec, value, vpath)
    if op == "within_days":
        return and_(expr.is_not(None), expr >= c.cutoff_date(value, vpath))
    if op == "older_than_days":
        return and_(expr.is_not(None), expr < c.cutoff_date(value, vpath))
    return _scalar(expr, op, value, vpath, _date)


def _compile_boolean(c: _Compiler, spec: FieldSpec, op: str, value: Any, node: Mapping[str, Any], path: str) -> Any:
    vpath = f"{path}.value"
    if op == "exists":
        return _attribute_exists(spec, value, vpath)
    return _scalar(cast(spec.column.astext, Boolean), op, value, vpath, _boolean)


def _compile_multi(c: _Compiler, spec: FieldSpec, op: str, value: Any, node: Mapping[str, Any], path: str) -> Any:
    vpath = f"{path}.value"
    holds = lambda v: func.coalesce(spec.column.contains([v]), False)  # noqa: E731
    match op:
        case "exists":
            return _attribute_exists(spec, value, vpath)
        case "contains":
            return holds(_text(value, vpath))
        case "neq":
            return not_(holds(_text(value, vpath)))
        case "in":
            return or_(*[holds(v) for v in _values(value, vpath, _text)])
        case _:  # nin
            return not_(or_(*[holds(v) for v in _values(value, vpath, _text)]))


def _compile_tags(c: _Compiler, spec: FieldSpec, op: str, value: Any, node: Mapping[str, Any], path: str) -> Any:
    vpath = f"{path}.value"
    tags = _t.c.tags
    match op:
        case "exists":
            has_any = func.cardinality(tags) > 0
            return has_any if _boolean(value, vpath) else not_(has_any)
        case "eq" | "contains":
            return tagged(tags.contains(cast([_text(value, vpath)], ARRAY(Text))))
        case "neq":
            return not_(tags.contains(cast([_text(value, vpath)], ARRAY(Text))))
        case "in":
            return tagged(tags.overlap(cast(_values(value, vpath, _text), ARRAY(Text))))
        case _:  # nin
            return not_(tags.overlap(cast(_values(value, vpath, _text), ARRAY(Text))))


def _compile_lists(c: _Compiler, spec: FieldSpec, op: str, value: Any, node: Mapping[str, Any], path: str) -> Any:
    vpath = f"{path}.value"
    paths = [vpath] if op in ("eq", "contains", "neq") else None
    ids = [_uuid(value, vpath)] if paths else _values(value, vpath, _uuid)
    c.lists += zip(ids, paths or [f"{vpath}[{i}]" for i in range(len(ids))], strict=True)
    subscribed = exists().where(_members.c.contact_id == _t.c.id, _members.c.list_id.in_(ids),
                                _members.c.status == "subscribed")
    return not_(subscribed) if op in ("neq", "nin") else subscribed


def _compare_count(c: _Compiler, table: Any, where: list[Any], spec: Any, path: str) -> ColumnElement[bool]:
    if not isinstance(spec, dict) or set(spec) != {"op", "value"}:
        raise _Invalid(path, 'expected {"op": ..., "value": N}')
    op = spec["op"]
    if op not in COUNT_OPS:
        raise _Invalid(f"{path}.op", f"op must be one of: {', '.join(COUNT_OPS)}", "invalid_op")
    return _count_test(c, table, where, op, spec["value"], f"{path}.value")


# Counts that only ask "at least one" or "none".
_SOME = frozenset({("gte", 1), ("gt", 0), ("neq", 0)})
_NONE = frozenset({("lt", 1), ("lte", 0), ("eq", 0)})


def _count_test(c: _Compiler, table: Any, where: list[Any], op: str, value: Any, path: str) -> ColumnElement[bool]:
    """The number of this contact's rows of `table` matching `where` (its first term ties them to the contact),
    compared: `op value`. "At least one" is EXISTS and "none" NOT EXISTS, which PostgreSQL can run as one semi- or
    anti-join over the rows, where a count is computed contact by contact (`orders.count gte 1` within 365 days,
    1M contacts and 3M orders: 12.2 s as a count; docs/performance.md, "Segments at scale")."""
    if op in COUNT_OPS:
        wanted = (op, _integer(value, path))
        if wanted in _SOME:
            return _has_rows(c, table, where)
        if wanted in _NONE:
            return not_(exists().where(*where))
        if _at_least_one(*wanted):
            # Alone in a filter, such a count is taken from the rows grouped by contact (_Compiled.counting).
            # In company, an EXISTS in front of it ("has one at least") does not spare the per-contact counts,
            # since PostgreSQL evaluates them as a filter of the contact scan, before any join (EXPLAINed); a
            # required one may be grouped from the rows instead, when that costs less (_groups_better).
            count = (table, where[1:], _scalar(func.count(), op, value, path, _integer, nullable=False))
            c.counts.append(count)
            if c.required:
                c.required_counts.append(count)
                if c.counting == "grouped":
                    return _t.c.id.in_(_grouped(*count))
    counted = select(func.count()).select_from(table).where(*where).scalar_subquery()
    return _scalar(counted, op, value, path, _integer, nullable=False)


def _grouped(table: Any, conditions: list[Any], enough: ColumnElement[bool]) -> Select[Any]:
    """The contacts holding enough rows of `table` matching `conditions`, from the rows grouped by contact."""
    return select(table.c.contact_id).where(*conditions).group_by(table.c.contact_id).having(enough)


def _at_least_one(op: str, value: int) -> bool:
    """Whether `count op value` holds only for a count of 1 or more."""
    return (op == "gte" and value >= 1) or (op == "gt" and value >= 0) or (op == "eq" and value >= 1)


def _has_rows(c: _Compiler, table: Any, where: list[Any]) -> ColumnElement[bool]:
    """EXISTS over this contact's rows of `table` matching `where`; noted as an activity (_Compiled.counting)."""
    c.activities.append((table, where[1:]))
    return exists().where(*where)


def _rows_of_contact(c: _Compiler, table: Any, conditions: list[Any], moment: Any, node: Mapping[str, Any],
                     path: str) -> list[Any]:
    """The terms selecting this contact's rows of `table`: the correlation first, then `conditions` and the
    `within_days` window on `moment`."""
    where = [table.c.contact_id == _t.c.id, *conditions]
    if "within_days" in node:
        where.append(moment >= c.cutoff(node["within_days"], f"{path}.within_days"))
    return where


def _activity(c: _Compiler, conditions: list[Any], table: Any, moment: Any, node: Mapping[str, Any],
              path: str) -> ColumnElement[bool]:
    """EXISTS, or a correlated COUNT compared with `count`, over this contact's matching rows."""
    where = _rows_of_contact(c, table, conditions, moment, node, path)
    if "count" not in node:
        return _has_rows(c, table, where)
    return _compare_count(c, table, where, node["count"], f"{path}.count")


def _compile_order_item(c: _Compiler, spec: FieldSpec, op: str, value: Any, node: Mapping[str, Any], path: str) -> Any:
    vpath = f"{path}.value"
    values = [_text(value, vpath)] if op == "eq" else _values(value, vpath, _text)
    key = spec.attribute
    bought = or_(*[_orders.c["items"].contains([{key: v}]) for v in values])  # items @> '[{"sku": ...}]'
    return _activity(c, [_orders.c.status.not_in(NOT_COUNTED), bought], _orders, _orders.c.placed_at, node, path)


def _compile_order_count(c: _Compiler, spec: FieldSpec, op: str, value: Any, node: Mapping[str, Any], path: str) -> Any:
    where = _rows_of_contact(c, _orders, [_orders.c.status.not_in(NOT_COUNTED)], _orders.c.placed_at, node, path)
    return _count_test(c, _orders, where, op, value, f"{path}.value")


def _compile_event_type(c: _Compiler, spec: FieldSpec, op: str, value: Any, node: Mapping[str, Any], path: str) -> Any:
    vpath = f"{path}.value"
    values = [_text(value, vpath)] if op == "eq" else _values(value, vpath, _text)
    return _activity(c, [_events.c.type.in_(values)], _events, _events.c.occurred_at, node, path)


def _compile_cart_status(c: _Compiler, spec: FieldSpec, op: str, value: Any, node: Mapping[str, Any],
                         path: str) -> Any:
    vpath = f"{path}.value"
    def status(v: Any, p: str) -> str:
        return _text(v, p, spec.choices)

    values = [status(value, vpath)] if op == "eq" else _values(value, vpath, status)
    return _activity(c, [_carts.c.status.in_(values)], _carts, _carts.c.opened_at, node, path)


def _compile_consent(c: _Compiler, spec: FieldSpec, op: str, value: Any, node: Mapping[str, Any], path: str) -> Any:
    wanted = _boolean(value, f"{path}.value")
    latest = (
        select(_consents.c.action)
        .where(_consents.c.contact_id == _t.c.id, _consents.c.purpose == "email_marketing")
        .order_by(_consents.c.occurred_at.desc(), _consents.c.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    granted = func.coalesce(latest, "none").in_(GRANTING)
    return granted if wanted else not_(granted)


_KINDS: dict[str, Callable[..., ColumnElement[bool]]] = {
    TEXT: _compile_text, ENUM: _compile_text, NUMBER: _compile_number, INTEGER: _compile_integer,
    TIMESTAMP: _compile_timestamp, DATE: _compile_date, BOOLEAN: _compile_boolean, MULTI: _compile_multi,
    TAGS: _compile_tags, LISTS: _compile_lists, ORDER_ITEM: _compile_order_item, ORDER_COUNT: _compile_order_count,
    EVENT_TYPE: _compile_event_type, CONSENT: _compile_consent, CART_STATUS: _compile_cart_status,
}


async def compile_filter(
    session: AsyncSession, filter_: Any, *, now: datetime | None = None, path: str = "filter"
) -> ColumnElement[bool]:
    """Validate a filter and compile it to one boolean expression over `contact`; 422 naming each faulty part."""
    return (await _compile_with_definitions(session, filter_, now=now, path=path)).expression


async def members_condition(session: AsyncSession, filter_: Any, *, now: datetime) -> ColumnElement[bool]:
    """A stored filter's condition for reading all its members at once (a sync refresh). A count needing a row or
    more that the filter requires, alone or with other conditions, is grouped from the rows when the planner's costs
    say that is GROUPED_PAST times cheaper (`_groups_better`: "repeat buyers" over 1M contacts, ~9 s contact by
    contact); otherwise, and for every other filter, the condition `compile_filter` gives."""
    definitions = await _definitions(session, filter_)
    compiled = _compile(filter_, definitions, now)
    if compiled.lone_count is None and compiled.count_among_others is None:
        return compiled.expression
    grouped, groups_better = _grouped_twin(compiled, filter_, definitions, now,
                                           lambda c: select(_t.c.id).where(c.expression))
    return grouped.expression if await groups_better(await driver_connection(session), now) else compiled.expression


async def preview(session: AsyncSession, filter_: Any, *, now: datetime | None = None
                  ) -> tuple[ColumnElement[bool], int]:
    """An unsaved filter's condition, and the count of its contacts now. A lone count of one row or more is counted
    from the rows, and a count among other conditions grouped from them when that costs less, as a stored
    segment's is (`_Compiled.counting`, `_groups_better`): the preview gives the same number as soon."""
    now = now or utc_now()
    definitions = await _definitions(session, filter_)
    compiled = _compile(filter_, definitions, now)
    await _check_lists(session, compiled, lock=False)  # a replica's read-only transaction takes no lock
    counting = compiled.counting() if compiled.lone_count is not None else \
        select(func.count()).select_from(_t).where(compiled.expression)
    if compiled.count_among_others is not None:
        grouped, groups_better = _grouped_twin(compiled, filter_, definitions, now, _Compiled.counting)
        if await groups_better(await driver_connection(session), now):
            counting = grouped.counting()
    return compiled.expression, int(await session.scalar(counting) or 0)


async def _compile_with_definitions(
    session: AsyncSession, filter_: Any, *, now: datetime | None = None, path: str = "filter"
) -> _Compiled:
    return _compile(filter_, await _definitions(session, filter_), now or utc_now(), path)


async def _definitions(session: AsyncSession, filter_: Any) -> dict[str, str]:
    """The attribute definitions, read only for a filter naming one (a round trip less for the common filters)."""
    if not mentions_attributes(filter_):
        return {}
    return {r.name: r.type for r in await session.execute(select(_defs.c.name, _defs.c.type))}


def _compile(filter_: Any, definitions: dict[str, str], now: datetime, path: str = "filter",
             counting: str = "per_contact") -> _Compiled:
    """The compiled filter and its time-relative parameters; 422 naming each faulty part. `counting`: how a
    required count needing a row or more is compiled (_Compiler.counting)."""
    compiler = _Compiler(attributes=definitions, now=now, counting=counting)
    if not isinstance(filter_, dict) or not filter_:
        raise InvalidInput.one(path, 'expected an object such as {"all": [...]}', "invalid_filter")
    check_filter_bounds(filter_, path)
    expression = compiler.node(filter_, path, 0)
    if compiler.errors:
        raise InvalidInput(*compiler.errors)
    # what the compiler did not read (a value nested in a list, ...) is stored too, and must render back
    problem = json_problem(filter_)
    if problem is not None:
        raise InvalidInput.one(path, problem, "invalid_filter")
    single = compiler.conditions == 1 and _single_condition(filter_)
    lone = compiler.activities[0] if single and len(compiler.activities) == 1 else None
    lone_count = compiler.counts[0] if single and len(compiler.counts) == 1 and not compiler.activities else None
    among_others = compiler.required_counts[0] if lone_count is None and len(compiler.counts) == 1 \
        and len(compiler.required_counts) == 1 else None
    return _Compiled(expression, compiler.clock, lone, lone_count, among_others, tuple(compiler.lists))


@dataclass(frozen=True, slots=True)
class _Compiled:
    expression: ColumnElement[bool]
    clock: dict[str, Callable[[datetime], Any]]   # see _Compiler.clock
    # the filter is one "has such orders/events" condition: (table, conditions), counted without `contact`
    lone_activity: tuple[Any, list[Any]] | None = None
    # the filter is one "has N such orders/events" condition (N >= 1, _Compiler.counts), counted likewise
    lone_count: tuple[Any, list[Any], ColumnElement[bool]] | None = None
    # the filter's only count, needing N >= 1 rows, required with other conditions: it may be grouped (_groups_better)
    count_among_others: tuple[Any, list[Any], ColumnElement[bool]] | None = None
    lists: tuple[tuple[uuid.UUID, str], ...] = ()  # see _Compiler.lists

    def counting(self, hashed: bool = False) -> Select[Any]:
        """The count of the contacts matching. For a lone activity condition, the distinct contacts of the
        matching rows: every order and event names an existing contact (foreign key), so it is the same number,
        read from the (partitioned, pruned) rows alone instead of probing them from every contact. `hashed`
        (a lone activity only): the same number as a DISTINCT subquery, which PostgreSQL may hash, instead of
        `count(DISTINCT)`, which sorts (see `_hashes_better`)."""
        if self.lone_count is not None:
            # the contacts holding enough matching rows, grouped from the rows in one pass: counted contact by
            # contact instead, "2 orders in the last year" took 10.1 s over 1M contacts and 3M orders, 1.8 s so
            return select(func.count()).select_from(_grouped(*self.lone_count).subquery("matching"))
        if self.lone_activity is None:
            return select(func.count()).select_from(_t).where(self.expression)
        table, conditions = self.lone_activity
        if hashed:
            contacts = select(table.c.contact_id).where(*conditions).distinct().subquery("matching")
            return select(func.count()).select_from(contacts)
        return select(func.count(distinct(table.c.contact_id))).select_from(table).where(*conditions)


def _single_condition(node: Any) -> bool:
    """Whether the (valid) filter is one condition, maybe inside one-child `all`/`any` groups (never `not`)."""
    while isinstance(node, dict) and len(node) == 1 and next(iter(node)) in ("all", "any"):
        children = next(iter(node.values()))
        if len(children) != 1:
            return False
        node = children[0]
    return isinstance(node, dict) and "field" in node


def mentions_attributes(node: Any) -> bool:
    """Whether any condition of the (not yet validated) filter names an `attributes.` field. Iterative: the
    filter may be nested far deeper than the recursion limit (it is checked after this)."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            field_ = item.get("field")
            if isinstance(field_, str) and field_.startswith("attributes."):
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


# ---- segments: CRUD ----------------------------------------------------------------------------------------


async def list_page(
    session: AsyncSession, *, limit: int, cursor: str | None, codec: CursorCodec
) -> tuple[list[Row], str | None]:
    """Segments by name (keyset on the unique name)."""
    return await page_by_name(session, select(_segments), _segments.c.name, sort="segments:name",
                              limit=limit, cursor=cursor, codec=codec)


async def get(session: AsyncSession, segment_id: uuid.UUID, *, lock: bool = False) -> Row:
    query = select(_segments).where(_segments.c.id == segment_id)
    row = (await session.execute(query.with_for_update() if lock else query)).mappings().first()
    if row is None:
        raise SegmentNotFound(f"no segment with id {segment_id}")
    return row


async def _check_runs(session: AsyncSession, condition: ColumnElement[bool], path: str = "filter") -> None:
    """Refuse a filter PostgreSQL cannot run, when it is saved rather than at every count afterwards: its
    statement is planned and its values bound (LIMIT 0 fetches no row), in a savepoint. The value checks of the
    compiler should leave nothing for this to find; it is the last gate before a segment is stored."""
    try:
        async with session.begin_nested():
            await session.execute(select(_t.c.id).where(condition).limit(0))
    except DBAPIError as exc:
        state = str(getattr(exc.orig, "sqlstate", None) or "")
        if not state.startswith("22"):  # a data exception: a value out of range, not a number, ...
            raise
        raise InvalidInput.one(path, f"PostgreSQL cannot run this filter (SQLSTATE {state}): check its values",
                               "invalid_filter") from None


async def _check_lists(session: AsyncSession, compiled: _Compiled, *, lock: bool = True) -> None:
    """422 naming each list id of the filter that no list has (`unknown_list`). With `lock`, the lists named stay
    locked (FOR KEY SHARE) until the segment is written: a list deletion waits, then sees the segment (409)."""
    if not compiled.lists:
        return
    query = select(_lists.c.id).where(_lists.c.id.in_({i for i, _ in compiled.lists})).order_by(_lists.c.id)
    found = set((await session.scalars(query.with_for_update(read=True, key_share=True) if lock else query)).all())
    missing = [FieldError(path, "no list has this id", "unknown_list") for i, path in compiled.lists if i not in found]
    if missing:
        raise InvalidInput(*missing)


async def _check_saved(session: AsyncSession, filter_: Any) -> None:
    """What a filter must pass to be saved: it compiles, names existing lists (locked), and PostgreSQL runs it."""
    compiled = await _compile_with_definitions(session, filter_)
    await _check_lists(session, compiled)
    await _check_runs(session, compiled.expression)


async def segments_naming_list(session: AsyncSession, list_id: uuid.UUID) -> list[uuid.UUID]:
    """The segments whose filter has a `lists` condition naming this list, in id order."""
    # not by the id's text: a filter may spell it in capitals, in braces or without dashes (uuid.UUID reads them)
    candidates = await session.execute(select(_segments.c.id, _segments.c.filter)
                                       .where(cast(_segments.c.filter, Text).contains('"lists"'))
                                       .order_by(_segments.c.id))
    return [segment_id for segment_id, filter_ in candidates if list_id in _named_lists(filter_)]


def _named_lists(node: Any) -> set[uuid.UUID]:
    """The list ids the `lists` conditions of a stored filter name (iterative, as mentions_attributes)."""
    found: set[uuid.UUID] = set()
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if item.get("field") == "lists":
                values = item.get("value")
                for value in values if isinstance(values, list) else [values]:
                    with contextlib.suppress(ValueError):  # a filter saved before lists were checked
                        found.add(uuid.UUID(str(value)))
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


async def create(session: AsyncSession, *, name: str, filter_: dict[str, Any], description: str | None) -> Row:
    await _check_saved(session, filter_)
    now = utc_now()
    values = {"id": new_id(), "name": name, "filter": filter_, "description": description, "version": 1,
              "created_at": now, "updated_at": now}
    row = (await session.execute(
        insert(_segments).values(values).on_conflict_do_nothing().returning(*_segments.c)
    )).mappings().first()
    if row is None:
        raise DuplicateSegment(f"a segment named {name!r} already exists", existing_id=await _id_of(session, name))
    return row


async def update(
    session: AsyncSession, segment_id: uuid.UUID, changes: Mapping[str, Any], *, expected_version: int | None = None
) -> Row:
    """Merge patch of name, description, filter; a name held by another segment is a 409."""
    current = await get(session, segment_id, lock=True)
    _check_version(current, expected_version)
    if "filter" in changes:
        await _check_saved(session, changes["filter"])
    changes = {k: v for k, v in changes.items() if current[k] != v}
    if not changes:
        return current
    if "filter" in changes:  # every destination syncing it takes a new snapshot at the worker's next round;
        # a failure of the old filter is no longer news
        await session.execute(update_statement(_syncs).where(_syncs.c.segment_id == segment_id)
                              .values(refreshed_at=None, last_error=None, failed_at=None))
    statement = (update_statement(_segments).where(_segments.c.id == segment_id)
                 .values(**changes, version=_segments.c.version + 1, updated_at=utc_now()).returning(*_segments.c))
    try:
        async with session.begin_nested():
            return (await session.execute(statement)).mappings().one()
    except IntegrityError as exc:
        if not is_unique_violation(exc):
            raise
        raise DuplicateSegment(f"a segment named {changes['name']!r} already exists",
                               existing_id=await _id_of(session, changes["name"])) from None


async def delete_segment(
    session: AsyncSession, segment_id: uuid.UUID, *, expected_version: int | None = None, actor: Principal
) -> None:
    _check_version(await get(session, segment_id, lock=True), expected_version)
    syncing = list((await session.scalars(
        select(_destinations.c.name).join(_syncs, _syncs.c.destination_id == _destinations.c.id)
        .where(_syncs.c.segment_id == segment_id).order_by(_destinations.c.name)
    )).all())
    if syncing:  # the destinations are named only to a reader of them (docs/security.md, class 11)
        by = ', '.join(map(repr, syncing)) if actor.reads(Scope.DESTINATIONS_READ) else "a destination"
        raise SegmentInUse(f"synced by {by}: remove it from their segment_mappings first")
    await session.execute(delete(_segments).where(_segments.c.id == segment_id))


def _check_version(current: Row, expected_version: int | None) -> None:
    if expected_version is not None and current["version"] != expected_version:
        raise PreconditionFailed(f"the segment is at version {current['version']}", current_version=current["version"])


async def _id_of(session: AsyncSession, name: str) -> uuid.UUID | None:
    return await session.scalar(select(_segments.c.id).where(_segments.c.name == name))  # type: ignore[no-any-return]


# ---- segments: members -------------------------------------------------------------------------------------


async def segment_condition(session: AsyncSession, segment_id: uuid.UUID) -> ColumnElement[bool]:
    """The compiled filter of a stored segment (404 when there is none)."""
    row = await get(session, segment_id)
    return await compile_filter(session, row["filter"])


async def count(session: AsyncSession, condition: ColumnElement[bool]) -> int:
    return int(await session.scalar(select(func.count()).select_from(_t).where(condition)) or 0)


# ---- the count of a stored segment: GET /v1/segments/{id}/count --------------------------------------------
#
# Its bar is the best hand-written SQL (docs/performance.md "Segments"). Around a ~20 ms query the session path
# spent ~5 ms: two more statements (segment row, attribute definitions), building and compiling the expression,
# the session. Here the compiled SQL text is kept per segment and executed on the bare asyncpg connection in
# ONE statement that also checks the cached text is still right:
#
#     SELECT (<the compiled count>) FROM segment WHERE id = $a AND filter = $b [AND <definitions used> = $c]
#
# No row: the segment was deleted or its filter changed, or an attribute definition it names did (in any API
# process, or on the replica): the count subquery is then never executed (an InitPlan run on first use), and the
# segment is read and compiled again. The time-relative parameters (`within_days` cutoffs) are re-bound from
# the clock on every execution, so a window moves with time exactly as a fresh compile would.

MAX_CACHED_SEGMENTS = 1024
_DIALECT = asyncpg_dialect()  # statements are only compiled here: no connection, no server-version state used

_LOAD_SQL = """
SELECT s.filter::text AS filter,
       (SELECT coalesce(jsonb_object_agg(d.name, d.type), '{}')::text FROM attribute_definition d) AS definitions
FROM segment s WHERE s.id = $1
"""


@dataclass(frozen=True, slots=True)
class _Statement:
    """A compiled statement as asyncpg takes it: SQL, parameters in order, and those that follow the clock."""

    sql: str
    values: tuple[Any, ...]
    clocked: tuple[tuple[int, Callable[[datetime], Any], Callable[[Any], Any] | None], ...]  # position, at, processor

    @classmethod
    def of(cls, statement: Any, clock: Mapping[str, Callable[[datetime], Any]]) -> _Statement:
        compiled = statement.compile(dialect=_DIALECT)
        keys = {name: bind.key for bind, name in compiled.bind_names.items()}
        state = compiled.construct_expanded_state()  # `in` lists expanded to one parameter per value
        processors = {name: bind.type.dialect_impl(_DIALECT).bind_processor(_DIALECT)  # e.g. JSONB: json.dumps
                      for bind, name in compiled.bind_names.items()}
        processors.update(state.processors)  # those of the expanded `in` values
        values: list[Any] = []
        clocked = []
        for position, name in enumerate(state.positiontup or ()):
            process = processors.get(name)
            value = state.parameters[name]
            values.append(process(value) if process else value)
            at = clock.get(keys.get(name, ""))
            if at is not None:
                clocked.append((position, at, process))
        if len(clocked) != len(clock):  # pragma: no cover (a parameter lost on the way would freeze the window)
            raise RuntimeError("a time-relative parameter of the segment filter is missing from its statement")
        return cls(state.statement, tuple(values), tuple(clocked))

    def arguments(self, now: datetime) -> list[Any]:
        values = list(self.values)
        for position, at, process in self.clocked:
            values[position] = process(at(now)) if process else at(now)
        return values


# ---- a lone activity condition: its contacts counted by a sort or by a hash ------------------------------
#
# `count(DISTINCT contact_id)` sorts the matching rows' contact ids: the cheapest way on small inputs (a sort of
# bare values). The DISTINCT subquery lets PostgreSQL hash the contacts instead (one entry per contact, not per
# row), which wins once the sort spills well past `work_mem` (several merge passes) and each contact has several
# rows. Measured on the bench's events (docs/performance.md, "Events", "The count by a sort or by a hash"), with
# `work_mem` at 4 MB: at 10M events the sort still won at 208,000 rows (the hash 1.09x its time; 83,000 rows:
# 1.13x), the hash at 457,000 (0.91x); at 1M the two were even at 46,000 rows. So the hash is chosen from
# HASH_PAST_WORK_MEM times what the sort holds in `work_mem` (~330,000 rows at 4 MB).
# Which side a count is on is the planner's own estimate of the matching rows (`EXPLAIN` of the count: from the
# statistics of the partitions in the window, for the values and the cutoff of this count), read when the
# statement is compiled and again at most every FORM_SECONDS, not at each count: the count stays ONE statement.

SORTED_ROW_BYTES = 64         # what count(DISTINCT uuid) holds in memory per row (a datum sort), rounded up
HASH_PAST_WORK_MEM = 5        # the hash from 5x work_mem of sorted rows: between 3.2x (sort won) and 7x (hash won)
FORM_SECONDS = 300.0          # how long a form chosen from an estimate is kept before it is estimated again
_DEFAULT_WORK_MEM_KB = 4096   # PostgreSQL's default: EXPLAIN (SETTINGS) names work_mem only when it differs
_MEMORY = re.compile(r"(\d+)\s*(kB|MB|GB|TB)?")
_KB = {None: 1, "kB": 1, "MB": 1024, "GB": 1024**2, "TB": 1024**3}


async def _hashes_better(connection: asyncpg.Connection, sorted_count: _Statement, now: datetime) -> bool:
    """Whether the rows `sorted_count` (a lone activity's `count(DISTINCT)`) would sort now are, by the
    planner's estimate, more than HASH_PAST_WORK_MEM times what `work_mem` holds: then the hashed form is faster."""
    rows, work_mem = await _sort_estimate(connection, sorted_count, now)
    return rows * SORTED_ROW_BYTES > HASH_PAST_WORK_MEM * work_mem


async def _sort_estimate(connection: asyncpg.Connection, sorted_count: _Statement, now: datetime
                         ) -> tuple[float, int]:
    """The rows `sorted_count` would sort now (the planner's estimate), and `work_mem` in bytes. Planning only
    (no row is read), on the count's own connection and under its statement timeout."""
    explained = await connection.fetchval(f"EXPLAIN (FORMAT JSON, SETTINGS) {sorted_count.sql}",
                                          *sorted_count.arguments(now))
    plan = (json.loads(explained) if isinstance(explained, str) else explained)[0]  # the app's codec decodes json
    aggregate = plan["Plan"]
    rows = float(aggregate.get("Plans", [aggregate])[0]["Plan Rows"])  # what the Aggregate takes in and sorts
    work_mem = _MEMORY.fullmatch(str(plan.get("Settings", {}).get("work_mem", "")).strip())
    return rows, (int(work_mem[1]) * _KB[work_mem[2]] if work_mem else _DEFAULT_WORK_MEM_KB) * 1024


# ---- a count among other conditions: contact by contact, or grouped from the rows ----------------------------
#
# "2 orders or more in the last year" with "lives in Paris": PostgreSQL counts the orders of each contact the other
# conditions leave, an index probe each, the fastest form while they leave up to ~150,000 contacts (the segment bar's
# vip customers in Lyon: 24 ms, against 1.3 s grouped), and 8-14 s when they leave all of a million. Grouped from the
# rows (`contact.id IN (SELECT contact_id ... GROUP BY contact_id HAVING count(*) >= 2)`), the count reads the
# orders once (1.0-3.4 s), whatever the other conditions. The planner's costs (EXPLAIN, planning only) tell the
# two apart, but it prices each probe as read from disk: measured on 1M contacts and 3M orders, the grouped form won
# where it was estimated 22 times cheaper or more, the probes where it was 11 times or less (docs/performance.md,
# "Segments: a count among other conditions"), so it is chosen from GROUPED_PAST. Chosen as the lone activity's form
# is: when compiled, and at most every FORM_SECONDS after.

GROUPED_PAST = 16.0  # the per-contact form's estimated cost over the grouped one's, from which to group


async def _groups_better(connection: asyncpg.Connection, per_contact: _Statement, grouped: _Statement,
                         now: datetime) -> bool:
    """Whether counting `grouped` is estimated GROUPED_PAST times cheaper than `per_contact` or more."""
    # `>=`, "or more": a filter the planner proves empty costs 0 in both forms (a one-time false filter), and
    # GROUPED_PAST = 0 must still mean "always grouped" (with `>`, 0 > 0 chose the other form: a flaky test)
    return await _estimated_cost(connection, per_contact, now) >= \
        GROUPED_PAST * await _estimated_cost(connection, grouped, now)


async def _estimated_cost(connection: asyncpg.Connection, statement: _Statement, now: datetime) -> float:
    """The planner's total cost of `statement` (planning only, under the count's statement timeout)."""
    explained = await connection.fetchval(f"EXPLAIN (FORMAT JSON) {statement.sql}", *statement.arguments(now))
    plan = (json.loads(explained) if isinstance(explained, str) else explained)[0]  # the app's codec decodes json
    return float(plan["Plan"]["Total Cost"])


_Chooser = Callable[[asyncpg.Connection, datetime], Awaitable[bool]]


@dataclass(slots=True)
class _CachedCount:
    """A stored segment's guarded count; where the filter has two forms (a lone activity counted by a sort or by a
    hash, a count among other conditions per contact or grouped), both, and the one chosen when."""

    usual: _Statement                       # the only form of most filters
    other: _Statement | None = None
    prefers_other: _Chooser | None = None   # EXPLAINs to choose
    other_chosen: bool = False              # the form in use
    chosen_at: float = float("-inf")        # time.monotonic() of the last choice

    async def statement(self, connection: asyncpg.Connection, now: datetime) -> _Statement:
        """The statement to run now: the form is chosen again once the last choice is FORM_SECONDS old."""
        if self.other is None or self.prefers_other is None:
            return self.usual
        if time.monotonic() - self.chosen_at >= FORM_SECONDS:
            self.other_chosen = await self.prefers_other(connection, now)
            self.chosen_at = time.monotonic()
        return self.other if self.other_chosen else self.usual


# segment id -> its guarded count (the oldest entry goes first past MAX_CACHED_SEGMENTS)
_cached_counts: dict[uuid.UUID, _CachedCount] = {}


async def count_stored(connection: asyncpg.Connection, segment_id: uuid.UUID, *, now: datetime | None = None) -> int:
    """The count of a stored segment now: one round trip when its compiled SQL is cached (404, 422 as `get`)."""
    now = now or utc_now()
    cached = _cached_counts.get(segment_id)
    if cached is not None:
        statement = await cached.statement(connection, now)
        row = await connection.fetchrow(statement.sql, *statement.arguments(now))
        if row is not None:
            return int(row[0])
        del _cached_counts[segment_id]  # stale: read and compile again
    row = await connection.fetchrow(_LOAD_SQL, segment_id)
    if row is None:
        raise SegmentNotFound(f"no segment with id {segment_id}")
    filter_ = json.loads(row["filter"])
    definitions: dict[str, str] = json.loads(row["definitions"])
    compiled = _compile(filter_, definitions, now)
    named = {name: definitions[name] for name in _attribute_names(filter_)}  # all defined: it compiled
    guard = [_segments.c.id == segment_id, _segments.c.filter == cast(literal(row["filter"], Text), JSONB)]
    if named:
        used = select(func.jsonb_object_agg(_defs.c.name, _defs.c.type)).where(_defs.c.name.in_(sorted(named)))
        guard.append(used.scalar_subquery() == cast(literal(json.dumps(named), Text), JSONB))

    def guarded(counting: Select[Any], clock: Mapping[str, Callable[[datetime], Any]]) -> _Statement:
        return _Statement.of(select(counting.scalar_subquery()).where(*guard), clock)

    counting, clock = compiled.counting(), compiled.clock
    entry = _CachedCount(guarded(counting, clock))
    other = _other_form(compiled, filter_, definitions, now)
    if other is not None:
        other_counting, other_clock, entry.prefers_other = other
        entry.other = guarded(other_counting, other_clock)
        await entry.statement(connection, now)  # chooses the form
        if entry.other_chosen:
            counting, clock = other_counting, other_clock
    if len(_cached_counts) >= MAX_CACHED_SEGMENTS:
        del _cached_counts[next(iter(_cached_counts))]
    _cached_counts[segment_id] = entry
    # this time unguarded: the answer for the filter just read (as the session path did: read, then count)
    now_counting = _Statement.of(counting, clock)
    return int(await connection.fetchval(now_counting.sql, *now_counting.arguments(now)) or 0)


def _other_form(compiled: _Compiled, filter_: Any, definitions: dict[str, str], now: datetime
                ) -> tuple[Select[Any], dict[str, Callable[[datetime], Any]], _Chooser] | None:
    """The count's other form, if its filter has one (`_CachedCount`): the count, its clock, and what chooses it."""
    if compiled.lone_activity is not None:
        by_sort = _Statement.of(compiled.counting(), compiled.clock)

        async def hashes_better(connection: asyncpg.Connection, at: datetime) -> bool:
            return await _hashes_better(connection, by_sort, at)

        return compiled.counting(hashed=True), compiled.clock, hashes_better
    if compiled.count_among_others is None:
        return None
    grouped, groups_better = _grouped_twin(compiled, filter_, definitions, now, _Compiled.counting)
    return grouped.counting(), grouped.clock, groups_better


def _grouped_twin(compiled: _Compiled, filter_: Any, definitions: dict[str, str], now: datetime,
                  shape: Callable[[_Compiled], Select[Any]]) -> tuple[_Compiled, _Chooser]:
    """The filter compiled again with its required count grouped from the rows, and what tells whether `shape` of
    it (the count, the members) is cheaper than `shape` of `compiled` (`_groups_better`)."""
    grouped = _compile(filter_, definitions, now, counting="grouped")
    per_contact, by_group = (_Statement.of(shape(c), c.clock) for c in (compiled, grouped))

    async def groups_better(connection: asyncpg.Connection, at: datetime) -> bool:
        return await _groups_better(connection, per_contact, by_group, at)

    return grouped, groups_better


def _attribute_names(node: Any) -> set[str]:
    """The attribute names a (valid) filter's conditions name."""
    if isinstance(node, dict):
        field_ = node.get("field")
        if isinstance(field_, str) and field_.startswith("attributes."):
            return {field_.removeprefix("attributes.")}
        return set().union(*(_attribute_names(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(_attribute_names(item) for item in node))
    return set()


async def contacts_page(
    session: AsyncSession, condition: ColumnElement[bool], *, limit: int, cursor: str | None, codec: CursorCodec
) -> tuple[list[Row], str | None]:
    """Matching contacts in id order (keyset on the primary key)."""
    query = select(*_t.c).where(condition)
    if cursor:
        after = codec.decode(cursor, sort="segment:id")
        try:
            query = query.where(_t.c.id > uuid.UUID(str(after.id)))
        except ValueError:
            raise InvalidInput.one("cursor", "not a cursor issued by this server", "invalid_cursor") from None
    rows = list((await session.execute(query.order_by(_t.c.id).limit(limit + 1))).mappings())
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    return rows[:limit], codec.encode(Cursor("segment:id", None, str(last["id"])))
