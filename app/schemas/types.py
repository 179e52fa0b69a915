"""Constrained field types shared by the schemas: normalized email and phone, country, currency, safe text,
timestamps PostgreSQL can store.

Each rule a validator enforces with its own message is also declared in the contract (`Declared`: a pattern, an
enum, a format), so that a client generated from openapi/openapi.json knows it before calling; what only the server
can judge (a phone number's validity, ...) is said in the type's description."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Final

import phonenumbers
from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email
from phonenumbers import PhoneMetadata
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BeforeValidator,
    Field,
    GetJsonSchemaHandler,
    StringConstraints,
    ValidationInfo,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

from app.schemas.strict import FromJSON, WholeNumber

__all__ = [
    "ATTRIBUTE_NAME_PATTERN",
    "NON_BLANK",
    "NON_BLANK_PATTERN",
    "NOT_NULLABLE",
    "PLAIN_TEXT_PATTERN",
    "SHOP_CLOCK_NOTE",
    "SHOP_CLOCK_SKEW",
    "TAG_CHARS_PATTERN",
    "AttributeName",
    "AwareTimestamp",
    "CountryCode",
    "CurrencyCode",
    "Day",
    "Declared",
    "Email",
    "ExternalId",
    "LongText",
    "Phone",
    "PhoneLookup",
    "QueryTimestamp",
    "SearchText",
    "ShopTimestamp",
    "ShortText",
    "TagName",
    "Timestamp",
    "Uuid",
    "WholeNumber",
    "absent_or_set",
    "bounded_decimal",
    "configure_phone_region",
    "email_by_validator",
    "fast_email",
    "fast_phone",
    "normalize_email",
    "normalize_phone",
    "one_of_required",
    "phone_by_phonenumbers",
    "phone_lookup_key",
    "utc_instant",
]


class Declared:
    """JSON Schema keywords stating a rule that a validator beside it enforces (with its own, clearer message).

    In `Annotated[str, AfterValidator(check), Declared(pattern=...)]` the validator decides and the keywords tell
    the contract's readers; both come from the same constant, so they cannot drift apart."""

    __slots__ = ("keywords",)

    def __init__(self, **keywords: Any) -> None:
        self.keywords = keywords

    def __get_pydantic_json_schema__(self, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = handler(core_schema)
        schema.update(self.keywords)
        return schema


_phone_region = "FR"
_COUNTRIES = frozenset(phonenumbers.SUPPORTED_REGIONS)  # ISO 3166-1 alpha-2 codes with a phone plan


def configure_phone_region(region: str) -> None:
    """Set the region used for national numbers (`06 12 34 56 78`); from settings, at app creation."""
    global _phone_region
    if region.upper() not in _COUNTRIES:
        raise ValueError(f"unknown phone region {region!r}")
    _phone_region = region.upper()


# PostgreSQL text cannot hold NUL; other control characters are never legitimate in these fields (tab, line feed
# and carriage return are). The same class, as a JSON Schema pattern (ECMA-262 and Python read it alike).
_CONTROL_CHARS: Final = r"\x00-\x08\x0b\x0c\x0e-\x1f"
PLAIN_TEXT_PATTERN: Final = rf"^[^{_CONTROL_CHARS}]*$"
_CONTROL = re.compile(rf"[{_CONTROL_CHARS}]")
# Input schemas strip surrounding whitespace (str.strip: these characters) before checking a minimum length, so a
# required text needs one character besides them.
_SPACES: Final = r"\t\n\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
NON_BLANK_PATTERN: Final = rf"^[^{_CONTROL_CHARS}]*[^{_CONTROL_CHARS}{_SPACES}][^{_CONTROL_CHARS}]*$"
NON_BLANK: Final = Declared(pattern=NON_BLANK_PATTERN)  # after ShortText/LongText with a min_length of 1


def _no_control_chars(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("control characters (such as NUL) are not allowed")
    return value


def normalize_email(value: str) -> str:
    _no_control_chars(value)
    return fast_email(value) or email_by_validator(value)


def email_by_validator(value: str) -> str:
    """email-validator's answer (the fast path's reference)."""
    try:
        result = validate_email(value, check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValueError(f"not a valid email address: {exc}") from None
    # Lowercased whole: mailbox names are case-insensitive in practice, and one contact per address.
    return result.normalized.lower()


def normalize_phone(value: str) -> str:
    _no_control_chars(value)
    return fast_phone(value) or phone_by_phonenumbers(value)


def phone_by_phonenumbers(value: str) -> str:
    """phonenumbers' answer (the fast path's reference)."""
    try:
        number = phonenumbers.parse(value, _phone_region)
    except phonenumbers.NumberParseException:
        raise ValueError("not a phone number") from None
    if not phonenumbers.is_valid_number(number):
        raise ValueError("not a valid phone number")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def phone_lookup_key(value: str) -> str:
    """What a lookup by phone compares with the stored numbers (always the E.164 form of a number that was valid
    when written): the E.164 form of any text that parses as a number, valid or not, so that a number stored under
    older metadata (or another DEFAULT_PHONE_REGION's rules) is still found; else the text itself, which no stored
    number equals, so the lookup finds nothing. Writes keep refusing both (normalize_phone)."""
    _no_control_chars(value)
    if not value.strip():  # a query string is not stripped as a body is: blank is refused as NON_BLANK declares
        raise ValueError("a phone number cannot be blank")
    try:
        number = phonenumbers.parse(value, _phone_region)
    except phonenumbers.NumberParseException:
        return value
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _country(value: str) -> str:
    code = value.upper()
    if code not in _COUNTRIES:
        raise ValueError("not an ISO 3166-1 alpha-2 country code")
    return code


# ISO 4217 List One, "current currency & funds" (SIX Financial Information, the maintenance agency), as published
# 2026-01-01: 178 codes.
_CURRENCIES = frozenset({
    "AED", "AFN", "ALL", "AMD", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT", "BHD", "BIF", "BMD", "BND",
    "BOB", "BOV", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD", "CDF", "CHE", "CHF", "CHW", "CLF", "CLP", "CNY",
    "COP", "COU", "CRC", "CUP", "CVE", "CZK", "DJF", "DKK", "DOP", "DZD", "EGP", "ERN", "ETB", "EUR", "FJD", "FKP",
    "GBP", "GEL", "GHS", "GIP", "GMD", "GNF", "GTQ", "GYD", "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR", "IQD",
    "IRR", "ISK", "JMD", "JOD", "JPY", "KES", "KGS", "KHR", "KMF", "KPW", "KRW", "KWD", "KYD", "KZT", "LAK", "LBP",
    "LKR", "LRD", "LSL", "LYD", "MAD", "MDL", "MGA", "MKD", "MMK", "MNT", "MOP", "MRU", "MUR", "MVR", "MWK", "MXN",
    "MXV", "MYR", "MZN", "NAD", "NGN", "NIO", "NOK", "NPR", "NZD", "OMR", "PAB", "PEN", "PGK", "PHP", "PKR", "PLN",
    "PYG", "QAR", "RON", "RSD", "RUB", "RWF", "SAR", "SBD", "SCR", "SDG", "SEK", "SGD", "SHP", "SLE", "SOS", "SRD",
    "SSP", "STN", "SVC", "SYP", "SZL", "THB", "TJS", "TMT", "TND", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH", "UGX",
    "USD", "USN", "UYI", "UYU", "UYW", "UZS", "VED", "VES", "VND", "VUV", "WST", "XAD", "XAF", "XAG", "XAU", "XBA",
    "XBB", "XBC", "XBD", "XCD", "XCG", "XDR", "XOF", "XPD", "XPF", "XPT", "XSU", "XTS", "XUA", "XXX", "YER", "ZAR",
    "ZMW", "ZWG",
})


# Withdrawn since 2007 (ISO 4217 List Three): a shop's order history predates its country's changeover (Croatia's
# kuna until 2023, Bulgaria's lev until 2026, ...), and an imported past order keeps the currency it was paid in.
_WITHDRAWN_CURRENCIES = frozenset({
    "ANG", "BGN", "BYR", "CUC", "CYP", "EEK", "HRK", "LTL", "LVL", "MRO", "MTL", "SIT", "SKK", "SLL", "STD", "VEF",
    "ZMK", "ZWL",
})


def _currency(value: str) -> str:
    if value not in _CURRENCIES and value not in _WITHDRAWN_CURRENCIES:
        raise ValueError("not an ISO 4217 currency code (current, or withdrawn since 2007), e.g. EUR")
    return value


# What asyncpg can write to a timestamptz as itself: it sends these two exact instants as -infinity/infinity, which
# come back as naive datetimes (no offset on the wire); anything beyond them does not fit a Python datetime in UTC.
_FIRST_INSTANT = datetime.min.replace(tzinfo=UTC)
_LAST_INSTANT = datetime.max.replace(tzinfo=UTC)


def utc_instant(value: datetime) -> datetime:
    """The instant in UTC (a naive value is read as UTC), or ValueError when timestamptz cannot hold it as itself."""
    try:
        moment = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:  # the offset pushes it past year 9999 or before year 1
        moment = None
    if moment is None or not _FIRST_INSTANT < moment < _LAST_INSTANT:
        raise ValueError("out of range: in UTC, a timestamp must fall after 0001-01-01T00:00:00Z and before "
                         "9999-12-31T23:59:59.999999Z")
    return moment


def _not_a_number(value: Any) -> Any:
    # Pydantic also reads "0" or "1700000000" as seconds since 1970: not the `date-time` the contract declares.
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return value
        raise ValueError("an ISO 8601 date-time (2026-12-01T09:30:00Z) or date (2026-12-01), not a number")
    return value


_NUMBER_TEXT = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")  # a JSON number, as text


def bounded_decimal(value: Any, *, integer_digits: int, places: int) -> Decimal:
    """A JSON number (or a numeric string of at most 40 characters) as an exact Decimal below 10^integer_digits
    with at most `places` decimals, else ValueError. No arithmetic under a context: `abs(Decimal("1e1000000"))`
    raises Overflow (a 500), and `1e-1000000` is a number PostgreSQL's numeric cannot take (it was stored in a
    segment, and every count of it failed afterwards). Trailing zeros do not count as decimals."""
    wanted = f"a number below 10^{integer_digits} in absolute value, with at most {places} decimals"
    if isinstance(value, bool) or not isinstance(value, int | float | str) or (
            isinstance(value, str) and len(value) > 40):
        raise ValueError(f"expected {wanted}")
    if isinstance(value, int) and abs(value) >= 10**integer_digits:  # before str(): a 4,000-digit int is slow
        raise ValueError(f"expected {wanted}")
    text = str(value)
    if isinstance(value, str) and not _NUMBER_TEXT.fullmatch(text):  # Decimal() also reads "1_0", " 1", "Inf"
        raise ValueError(f"expected {wanted}")
    try:
        number = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"expected {wanted}") from None
    if not number.is_finite():
        raise ValueError(f"expected {wanted}")
    sign, digits, exponent = number.as_tuple()
    assert isinstance(exponent, int)  # finite
    if not any(digits):
        return Decimal(0)
    kept = list(digits)
    while exponent < 0 and kept[-1] == 0:  # 1.500 has 1 decimal
        kept.pop()
        exponent += 1
    if number.adjusted() >= integer_digits or exponent < -places:
        raise ValueError(f"expected {wanted}")
    return Decimal((sign, tuple(kept), exponent))


ATTRIBUTE_NAME_PATTERN: Final = r"^[a-z][a-z0-9_]{0,62}$"
_NAME_RE = re.compile(ATTRIBUTE_NAME_PATTERN)
_TAG_PATTERN: Final = rf"^[^{_CONTROL_CHARS}/]*[^{_CONTROL_CHARS}{_SPACES}/][^{_CONTROL_CHARS}/]*$"
TAG_CHARS_PATTERN: Final = rf"^[^{_CONTROL_CHARS}/]*$"  # what tag names may hold (a list of them, comma-separated)


def _attribute_name(value: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise ValueError("lowercase letters, digits and _, starting with a letter, at most 63 characters")
    return value


def _tag_name(value: str) -> str:
    _no_control_chars(value)
    if "/" in value:
        raise ValueError("a tag name cannot contain '/'")
    return value


# email-validator refuses the special-use domains (RFC 6761, 7686, ...) in any case: the contract says so with a
# pattern (ECMA-262 has no case-insensitive flag inside a pattern, hence [Tt][Ee][Ss][Tt]).
_SPECIAL_USE_DOMAIN: Final = r"\.(?:{})$".format("|".join(
    "".join(f"[{c.upper()}{c}]" if c.isalpha() else re.escape(c) for c in name)
    for name in sorted(SPECIAL_USE_DOMAIN_NAMES)))
_SPECIAL_USE_LIST: Final = ", ".join(f".{name}" for name in sorted(SPECIAL_USE_DOMAIN_NAMES))
_PLAIN = (AfterValidator(_no_control_chars), Declared(pattern=PLAIN_TEXT_PATTERN))
ShortText = Annotated[str, StringConstraints(max_length=255), *_PLAIN]
LongText = Annotated[str, StringConstraints(max_length=2000), *_PLAIN]
# Trimmed here too, not only by a body's model: in a path (`/v1/carts/%20K%20`) it must name what a body would.
ExternalId = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=255),
                      AfterValidator(_no_control_chars), NON_BLANK]
Email = Annotated[str, StringConstraints(max_length=320), AfterValidator(normalize_email), Declared(
    format="email", **{"not": {"pattern": _SPECIAL_USE_DOMAIN}},
    description="An email address (stored lowercased); the server judges its validity (email-validator: syntax "
                f"and domain name, no DNS lookup). Never a special-use domain ({_SPECIAL_USE_LIST}).")]
Phone = Annotated[str, StringConstraints(max_length=40), AfterValidator(normalize_phone), Declared(
    pattern=PLAIN_TEXT_PATTERN,
    description="A phone number, international (+33 6 12 34 56 78) or national in DEFAULT_PHONE_REGION "
                "(06 12 34 56 78), stored in E.164; the server judges its validity for its region (libphonenumber): "
                "no pattern can say which numbers exist.")]
# A filter or a lookup by phone (the journal, the suppression list): a value no record can hold matches nothing.
PhoneLookup = Annotated[str, StringConstraints(min_length=1, max_length=40), AfterValidator(phone_lookup_key),
                        Declared(
    pattern=NON_BLANK_PATTERN,
    description="A phone number, written as for a contact and compared in E.164. A lookup, not a write: its validity "
                "is not judged, and text that is not a valid number matches nothing, unless a record stored it "
                "when libphonenumber still took it as valid (then write it internationally, as answered).")]
CountryCode = Annotated[str, StringConstraints(min_length=2, max_length=2), AfterValidator(_country), Declared(
    enum=sorted(_COUNTRIES), description="ISO 3166-1 alpha-2 (lowercase is accepted and stored uppercase)")]
CurrencyCode = Annotated[str, StringConstraints(max_length=3, pattern=r"^[A-Z]{3}$"), AfterValidator(_currency),
                       Declared(
    enum=sorted(_CURRENCIES | _WITHDRAWN_CURRENCIES),
    description="ISO 4217: a current code, or one withdrawn since 2007 (a past order keeps its currency)")]
# Timestamps in UTC that PostgreSQL stores and gives back as sent (so always answered with `Z`). In a body, ISO 8601
# text only (strict JSON: no number, no date alone); in a query string, any form pydantic reads (`?since=2026-12-01`).
Timestamp = Annotated[datetime, FromJSON, AfterValidator(utc_instant)]  # no offset: UTC
AwareTimestamp = Annotated[AwareDatetime, FromJSON, AfterValidator(utc_instant)]  # the offset is required
QueryTimestamp = Annotated[datetime, BeforeValidator(_not_a_number), AfterValidator(utc_instant)]


# What a shop says happened (an order placed, a cart opened, an event): at most a day ahead of Carnet's clock. Shop
# clocks drift and a local time sent as UTC is up to 14 hours ahead; a later date is a mistake (a year typed wrong)
# that would keep its contact "recent" for as long: never lapsed_customer, inside every `within_days` (docs/api.md).
SHOP_CLOCK_SKEW = timedelta(days=1)
SHOP_CLOCK_NOTE = "At most 1 day ahead of Carnet's clock (422 in_future)"


def _not_ahead(value: datetime) -> datetime:
    if value > datetime.now(UTC) + SHOP_CLOCK_SKEW:
        raise PydanticCustomError("in_future", "at most 1 day ahead of now (UTC): this would be in the future")
    return value


ShopTimestamp = Annotated[AwareDatetime, FromJSON, AfterValidator(utc_instant), AfterValidator(_not_ahead)]
# In a body (app.schemas.strict): a UUID as its text, a date as YYYY-MM-DD.
Uuid = Annotated[uuid.UUID, FromJSON]
Day = Annotated[date, FromJSON]
AttributeName = Annotated[str, StringConstraints(max_length=63), AfterValidator(_attribute_name),
                          Declared(pattern=ATTRIBUTE_NAME_PATTERN)]
# Trimmed here too, not only by a body's model: in a path (`/tags/%20vip%20`) it must name the tag a body would.
TagName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64),
                    AfterValidator(_tag_name), Declared(pattern=_TAG_PATTERN)]
Limit = Annotated[int, Field(ge=1, le=1000)]
# Every integer of a request body is `Annotated[int, WholeNumber]`: JSON Schema's `integer` includes `2.0`, read as 2
# (app.schemas.strict). Bounds go inside, before it: `Annotated[int, Field(ge=1), WholeNumber]`; given after it, or
# on the field, pydantic writes them into the contract as `ge`/`le`, words JSON Schema does not know.
SearchText = Annotated[str, StringConstraints(max_length=255), *_PLAIN]


def _not_nullable(schema: dict[str, Any]) -> None:
    branches = [branch for branch in schema.pop("anyOf", [schema]) if branch.get("type") != "null"]
    schema.pop("default", None)
    if len(branches) == 1:
        schema.update(branches[0])
    else:
        schema["anyOf"] = branches


def one_of_required(*names: str) -> dict[str, Any]:
    """JSON Schema for "at least one of these fields, not null" (a model validator enforces it): the contract
    keyword of a rule such as "one of email, phone or external_id is required"."""
    return {"anyOf": [{"required": [name], "properties": {name: {"not": {"type": "null"}}}} for name in names]}


class _NotNullable:
    """Marks an optional parameter that is sent or left out, never null (a header cannot be null): the contract
    shows its type without the `null` that `X | None = None` would add."""

    def __get_pydantic_json_schema__(self, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = handler(core_schema)
        _not_nullable(schema)
        return schema


NOT_NULLABLE: Final = _NotNullable()


def absent_or_set(**field: Any) -> Any:
    """A merge-patch field that may be left out but never set to null (its column always holds a value): the
    contract shows it without `null`; the schema's validator refuses null with a message naming the field."""
    return Field(default=None, json_schema_extra=_not_nullable, **field)


def refuse_null(value: object, info: ValidationInfo) -> object:
    """The before-validator of `absent_or_set` fields (`field_validator(*names, mode="before")(refuse_null)`): a null
    is a 422 on that field itself, every such field at once (a model validator would name only `body`, once)."""
    if value is None:
        raise ValueError(f"{info.field_name} cannot be null")
    return value


# ---- fast paths: hypothesis-proven equal to the libraries (tests/services/test_import_rows.py) ----------

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_FAST_EMAIL = re.compile(rf"({_ATEXT}+(?:\.{_ATEXT}+)*)@((?:{_LABEL}\.)+[A-Za-z]{{2,63}})")
_SPECIAL = frozenset(SPECIAL_USE_DOMAIN_NAMES)


def fast_email(value: str) -> str | None:
    """The normalized form of an ordinary address, or None: then email-validator decides."""
    match = _FAST_EMAIL.fullmatch(value)
    if match is None:
        return None
    local, domain = match[1], match[2]
    if len(local) > 64 or len(value) > 254 or len(domain) > 253 or "--" in domain:
        return None  # the slow path knows the exact rules (IDNA labels, lengths)
    if domain.rsplit(".", 1)[1].lower() in _SPECIAL:
        return None
    return value.lower()


_FR = PhoneMetadata.metadata_for_region("FR")
_FR_NATIONAL = re.compile(r"(?:0|\+33)([1-9]\d{8})")
_SEPARATORS = str.maketrans("", "", " .-")
# phonenumbers' _number_type_helper for FR, with its patterns compiled once: a number is valid when it
# matches the general description and one of the number types (fixed line, mobile, VoIP, ...). Any one will do,
# so the commonest types are tried first (a mobile number went through seven patterns before: 8.8 µs, now 2.8).
_FR_TYPES = ("mobile", "fixed_line", "premium_rate", "toll_free", "shared_cost", "voip", "personal_number", "pager",
             "uan", "voicemail")


def _desc_check(desc: Any) -> tuple[frozenset[int], re.Pattern[str]] | None:
    if desc is None or desc.national_number_pattern is None:
        return None
    return frozenset(desc.possible_length or ()), re.compile(desc.national_number_pattern)


_FR_GENERAL = _desc_check(_FR.general_desc)
_FR_CHECKS = [c for c in (_desc_check(getattr(_FR, t)) for t in _FR_TYPES) if c is not None]


def _matches(check: tuple[frozenset[int], re.Pattern[str]] | None, national: str) -> bool:
    if check is None:
        return False
    lengths, pattern = check
    return (not lengths or len(national) in lengths) and pattern.fullmatch(national) is not None


def fast_phone(value: str) -> str | None:
    """E.164 of a plainly written French number when the region is FR, or None: then phonenumbers decides."""
    if _phone_region != "FR":
        return None
    match = _FR_NATIONAL.fullmatch(value.translate(_SEPARATORS))
    if match is None:
        return None
    national = match[1]
    if not (_matches(_FR_GENERAL, national) and any(_matches(c, national) for c in _FR_CHECKS)):
        raise ValueError("not a valid phone number")
    return "+33" + national
