"""Row validation and normalization: pure functions, run in worker processes over batches of rows.

Values are checked exactly as the API checks them (the same normalizers from app.schemas.types, the same
length limits as app.schemas.contacts, the attribute rules of app.services.attributes), so an import never
stores what the API would refuse. Two fast paths keep 1M rows affordable and are proven equivalent to the
slow path by tests/services/test_import_rows.py (hypothesis):

- email: a plain ASCII dot-atom address on an ordinary domain is what email-validator accepts and
  normalizes to its lowercase form; anything else goes through email-validator (~35 µs a value).
- phone: with default region FR, `0X XX XX XX XX` / `+33 X XX XX XX XX` are checked against the same
  phonenumbers metadata is_valid_number uses, without parse/format (~5 µs instead of ~50 µs).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from app.ids import keyed_digester, new_id_texts
from app.mailbox import mailbox_key
from app.schemas import types
from app.services.imports.sniff import WHITESPACE, Unreadable

__all__ = [
    "STAGE_COLUMNS",
    "Spec",
    "Validated",
    "init_worker",
    "validate",
]

# Order of a staged record (what the runner COPYs into the staging table).
STAGE_COLUMNS = (
    "row_number", "new_id", "external_id", "email", "phone", "first_name", "last_name", "company", "job_title",
    "sector", "gender", "birth_date", "address_line1", "address_line2", "postal_code", "city", "region", "country",
    "language", "source", "kind", "first_contact_channel", "attributes", "blank_attributes", "email_digest",
    "phone_digest", "mailbox_digest", "external_id_digest",
)
_POS = {name: i for i, name in enumerate(STAGE_COLUMNS)}
_EMAIL, _PHONE, _EXTERNAL_ID = _POS["email"], _POS["phone"], _POS["external_id"]
# Wire field → staging column, with the API's length limit (after trimming, as InputSchema trims).
_TEXT_FIELDS: dict[str, tuple[str, int]] = {
    "first_name": ("first_name", 255), "last_name": ("last_name", 255), "company": ("company", 255),
    "job_title": ("job_title", 255), "sector": ("sector", 255), "gender": ("gender", 32),
    "address.line1": ("address_line1", 255), "address.line2": ("address_line2", 255),
    "address.postal_code": ("postal_code", 20), "address.city": ("city", 255), "address.region": ("region", 255),
    "language": ("language", 35), "first_contact_channel": ("first_contact_channel", 255),
}
_KINDS = {"customer": "customer", "prospect": "prospect", "vendor": "vendor", "partner": "partner",
          "client": "customer", "cliente": "customer", "fournisseur": "vendor", "partenaire": "partner"}
_SOURCES = frozenset({"newsletter_form", "website_signup", "checkout", "social", "contest", "white_paper",
                      "contact_request", "survey", "purchased_file", "store", "import", "api"})
_COUNTRY_NAMES = {
    "france": "FR", "belgique": "BE", "belgium": "BE", "suisse": "CH", "switzerland": "CH", "luxembourg": "LU",
    "allemagne": "DE", "germany": "DE", "espagne": "ES", "spain": "ES", "italie": "IT", "italy": "IT",
    "royaume-uni": "GB", "royaume uni": "GB", "united kingdom": "GB", "uk": "GB", "canada": "CA",
    "etats-unis": "US", "états-unis": "US", "united states": "US", "usa": "US", "monaco": "MC",
    "pays-bas": "NL", "netherlands": "NL", "portugal": "PT", "maroc": "MA", "morocco": "MA",
    "algérie": "DZ", "algerie": "DZ", "tunisie": "TN", "tunisia": "TN", "réunion": "RE", "reunion": "RE",
}
_TRUE = frozenset({"true", "1", "yes", "y", "oui", "o", "vrai", "x"})
_FALSE = frozenset({"false", "0", "no", "n", "non", "faux"})
_DATE_DMY = re.compile(r"(\d{1,2})[/.\-](\d{1,2})[/.\-](\d{4})")
_DATE_ISO = re.compile(r"(\d{4})-(\d{2})-(\d{2})")
_MIN_BIRTH = date(1900, 1, 1)
_WS = WHITESPACE
MAX_ATTRIBUTE_TEXT = 2000  # app.services.attributes.MAX_TEXT


@dataclass(frozen=True, slots=True)
class Spec:
    """What a worker needs to validate rows of one import (picklable)."""

    columns: tuple[tuple[int, str, str], ...]             # (column index, field, column name)
    attributes: dict[str, tuple[str, tuple[str, ...]]]    # name → (type, options)
    digest_key: bytes                                     # the suppression list's HMAC key
    width: int                                            # columns in the header
    blank_erases: bool = False


@dataclass(slots=True)
class Validated:
    records: list[tuple[Any, ...]] = field(default_factory=list)   # STAGE_COLUMNS order
    rejects: list[tuple[int, str | None, str, str | None]] = field(default_factory=list)  # row, column, reason, value
    rejected_rows: int = 0


def init_worker(phone_region: str) -> None:
    """Process initializer: national numbers are read in the deployment's region, as in the API."""
    types.configure_phone_region(phone_region)


def validate(spec: Spec, rows: list[tuple[int, list[str]]]) -> Validated:
    """Check and normalize rows given as (row number, cells); one bad cell rejects its row (as a 422 would)."""
    out = Validated()
    cells_read = _readers(spec)
    digest = keyed_digester(spec.digest_key)
    ids = iter(new_id_texts(len(rows)))  # increasing in row order: the contact indexes grow at their right edge
    for row_number, cells in rows:
        if isinstance(cells, Unreadable):  # too long or not CSV (sniff.RecordReader): no cells to check
            out.rejected_rows += 1
            out.rejects.append((row_number, None, cells.reason, None))
            continue
        record: list[Any] = [None] * len(STAGE_COLUMNS)
        record[0] = row_number
        attributes: dict[str, Any] = {}
        blank_attributes: list[str] = []
        problems: list[tuple[str | None, str, str | None]] = []
        width = len(cells)
        if width > spec.width and any(c.strip(_WS) for c in cells[spec.width:]):
            problems.append((None, f"the row has {width} cells, the header {spec.width}", None))
        for index, column, position, attribute, read in cells_read:
            raw = cells[index] if index < width else ""
            value = raw.strip(_WS)
            if not value:
                if attribute is not None:
                    blank_attributes.append(attribute)
                continue
            try:
                if attribute is None:
                    record[position] = read(value)
                else:
                    attributes[attribute] = read(value)
            except ValueError as exc:
                problems.append((column, str(exc), _shown(raw)))
        if not problems and record[_EMAIL] is None and record[_EXTERNAL_ID] is None:
            problems.append((None, "no email and no external_id: a row needs one to be matched", None))
        if problems:
            out.rejected_rows += 1
            out.rejects.extend((row_number, column, reason, value) for column, reason, value in problems)
            continue
        record[_POS["new_id"]] = next(ids)
        record[_POS["attributes"]] = json.dumps(attributes) if attributes else None
        record[_POS["blank_attributes"]] = blank_attributes or None
        if record[_EMAIL] is not None:
            record[_POS["email_digest"]] = digest("email", record[_EMAIL])
            mailbox = mailbox_key(record[_EMAIL])  # an erased person's inbox under another spelling (suppressions)
            if mailbox is not None and mailbox != record[_EMAIL]:
                record[_POS["mailbox_digest"]] = digest("email", mailbox)
        if record[_PHONE] is not None:
            record[_POS["phone_digest"]] = digest("phone", record[_PHONE])
        if record[_EXTERNAL_ID] is not None:  # an erased person's customer number (suppressions)
            record[_POS["external_id_digest"]] = digest("external_id", record[_EXTERNAL_ID])
        out.records.append(tuple(record))
    return out


# ---- fields ----------------------------------------------------------------------------------------------

_Reader = Callable[[str], Any]


def _readers(spec: Spec) -> list[tuple[int, str, int, str | None, _Reader]]:
    """Per mapped column, once per batch: (cell index, column name, staging position or -1 for an attribute,
    attribute name or None, the function that checks and normalizes a non-blank cell)."""
    today = date.today()
    readers = []
    for index, target, column in spec.columns:
        if target.startswith("attributes."):
            name = target.removeprefix("attributes.")
            kind, options = spec.attributes[name]
            readers.append((index, column, -1, name, functools.partial(_attribute, kind, options)))
        else:
            position, read = _field_reader(target, today)
            readers.append((index, column, position, None, read))
    return readers


def _field_reader(target: str, today: date) -> tuple[int, _Reader]:
    match target:
        case "email":
            return _EMAIL, _email
        case "phone":
            return _PHONE, _phone
        case "external_id":
            return _EXTERNAL_ID, functools.partial(_text, limit=255)
        case "birth_date":
            return _POS["birth_date"], functools.partial(_birth_date, today=today)
        case "address.country":
            return _POS["country"], _country
        case "kind":
            return _POS["kind"], _kind
        case "source":
            return _POS["source"], _source
    column, limit = _TEXT_FIELDS[target]
    return _POS[column], functools.partial(_text, limit=limit)


def _email(value: str) -> str:
    if len(value) > 320:
        raise ValueError("an email has at most 320 characters")
    return types.normalize_email(value)


def _phone(value: str) -> str:
    if len(value) > 40:
        raise ValueError("a phone number has at most 40 characters")
    return types.normalize_phone(value)


def _kind(value: str) -> str:
    kind = _KINDS.get(value.lower())
    if kind is None:
        raise ValueError("expected one of customer, prospect, vendor, partner")
    return kind


def _source(value: str) -> str:
    source = value.lower().replace(" ", "_").replace("-", "_")
    if source not in _SOURCES:
        raise ValueError(f"expected one of {', '.join(sorted(_SOURCES))}")
    return source


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")  # app.schemas.types._no_control_chars, as a regex


def _text(value: str, limit: int) -> str:
    if len(value) > limit:
        raise ValueError(f"at most {limit} characters (this one has {len(value)})")
    if _CONTROL.search(value):
        raise ValueError("control characters (such as NUL) are not allowed")
    return value


def _parse_date(value: str) -> date:
    match = _DATE_DMY.fullmatch(value)
    try:
        if match:
            return date(int(match[3]), int(match[2]), int(match[1]))
        match = _DATE_ISO.fullmatch(value)
        if match:
            return date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        pass
    raise ValueError("not a date: expected dd/mm/yyyy or yyyy-mm-dd")


def _birth_date(value: str, today: date) -> date:
    parsed = _parse_date(value)
    if not _MIN_BIRTH <= parsed <= today:
        raise ValueError("must be between 1900-01-01 and today")
    return parsed


def _country(value: str) -> str:
    code = _COUNTRY_NAMES.get(value.lower(), value)
    if len(code) != 2:
        raise ValueError("not an ISO 3166-1 alpha-2 country code (or a known country name)")
    return types._country(code)  # the API's own check


def _attribute(kind: str, options: tuple[str, ...], value: str) -> Any:
    match kind:
        case "text":
            if len(value) > MAX_ATTRIBUTE_TEXT or "\x00" in value:
                raise ValueError(f"text must be at most {MAX_ATTRIBUTE_TEXT} characters, without NUL")
            return value
        case "number":
            return _number(value)
        case "boolean":
            folded = value.lower()
            if folded in _TRUE:
                return True
            if folded in _FALSE:
                return False
            raise ValueError("expected true or false (oui/non, yes/no, 1/0)")
        case "date":
            return _parse_date(value).isoformat()
        case "enum":
            return _option(options, value)
        case "multi_enum":
            parts = [p.strip(_WS) for p in re.split(r"[,|]", value) if p.strip(_WS)]
            chosen = [_option(options, p) for p in parts]
            return sorted(set(chosen), key=chosen.index)
    raise ValueError("unsupported attribute type")


def _number(value: str) -> int | float:
    text = value.replace("\u00a0", "").replace("\u202f", "").replace(" ", "")
    if "," in text and "." not in text:
        text = text.replace(",", ".")
    try:
        number = int(text) if re.fullmatch(r"[+-]?\d+", text) else float(text)
    except ValueError:
        raise ValueError("expected a number") from None
    if isinstance(number, float) and not math.isfinite(number):
        raise ValueError("expected a finite number")
    return number


def _option(options: tuple[str, ...], value: str) -> str:
    if value in options:
        return value
    folded = value.casefold()
    for option in options:
        if option.casefold() == folded:
            return option
    raise ValueError(f"not one of the attribute's options ({', '.join(options)})")


def _shown(raw: str) -> str:
    """A refused cell as the report shows it: at most 200 characters, a NUL written `\\0` (PostgreSQL text
    cannot hold a NUL; the reason says the cell held a control character)."""
    shown = raw if len(raw) <= 200 else raw[:200] + "…"
    return shown.replace("\x00", "\\0") if "\x00" in shown else shown
