"""Constrained field types shared by the schemas: normalized email and phone, country, safe text."""

from __future__ import annotations

import re
from typing import Annotated

import phonenumbers
from email_validator import EmailNotValidError, validate_email
from pydantic import AfterValidator, Field, StringConstraints

__all__ = [
    "AttributeName",
    "CountryCode",
    "Email",
    "ExternalId",
    "LongText",
    "Phone",
    "SearchText",
    "ShortText",
    "TagName",
    "configure_phone_region",
    "normalize_email",
    "normalize_phone",
]

_phone_region = "FR"
_COUNTRIES = frozenset(phonenumbers.SUPPORTED_REGIONS)  # ISO 3166-1 alpha-2 codes with a phone plan


def configure_phone_region(region: str) -> None:
    """Set the region used for national numbers (`06 12 34 56 78`); from settings, at app creation."""
    global _phone_region
    if region.upper() not in _COUNTRIES:
        raise ValueError(f"unknown phone region {region!r}")
    _phone_region = region.upper()


def _no_control_chars(value: str) -> str:
    # PostgreSQL text cannot hold NUL; other control characters are never legitimate in these fields.
    if any(ord(c) < 32 and c not in "\t\n\r" for c in value):
        raise ValueError("control characters (such as NUL) are not allowed")
    return value


def normalize_email(value: str) -> str:
    _no_control_chars(value)
    try:
        result = validate_email(value, check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValueError(f"not a valid email address: {exc}") from None
    # Lowercased whole: mailbox names are case-insensitive in practice, and one contact per address.
    return result.normalized.lower()


def normalize_phone(value: str) -> str:
    _no_control_chars(value)
    try:
        number = phonenumbers.parse(value, _phone_region)
    except phonenumbers.NumberParseException:
        raise ValueError("not a phone number") from None
    if not phonenumbers.is_valid_number(number):
        raise ValueError("not a valid phone number")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _country(value: str) -> str:
    code = value.upper()
    if code not in _COUNTRIES:
        raise ValueError("not an ISO 3166-1 alpha-2 country code")
    return code


_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def _attribute_name(value: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise ValueError("lowercase letters, digits and _, starting with a letter, at most 63 characters")
    return value


def _tag_name(value: str) -> str:
    _no_control_chars(value)
    if "/" in value:
        raise ValueError("a tag name cannot contain '/'")
    return value


ShortText = Annotated[str, StringConstraints(max_length=255), AfterValidator(_no_control_chars)]
LongText = Annotated[str, StringConstraints(max_length=2000), AfterValidator(_no_control_chars)]
ExternalId = Annotated[str, StringConstraints(min_length=1, max_length=255), AfterValidator(_no_control_chars)]
Email = Annotated[str, StringConstraints(max_length=320), AfterValidator(normalize_email)]
Phone = Annotated[str, StringConstraints(max_length=40), AfterValidator(normalize_phone)]
CountryCode = Annotated[str, StringConstraints(min_length=2, max_length=2), AfterValidator(_country)]
AttributeName = Annotated[str, AfterValidator(_attribute_name)]
TagName = Annotated[str, StringConstraints(min_length=1, max_length=64), AfterValidator(_tag_name)]
Limit = Annotated[int, Field(ge=1, le=1000)]
SearchText = Annotated[str, StringConstraints(max_length=255), AfterValidator(_no_control_chars)]
