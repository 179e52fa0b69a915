"""Masking of personal data for tokens without `pii:read`: decided here and nowhere else."""

from __future__ import annotations

from typing import Any

import phonenumbers

__all__ = ["PII_FIELDS", "mask_email", "mask_json", "mask_name", "mask_phone", "mask_text"]

# Wire fields that identify a person; every presenter masks exactly these.
PII_FIELDS = frozenset({
    "email", "phone", "first_name", "last_name", "birth_date", "address.line1", "address.line2",
})


def mask_email(value: str | None) -> str | None:
    """`claire.martin@example.com` → `c***@example.com`."""
    if not value:
        return value
    local, _, domain = value.rpartition("@")
    return f"{local[:1]}***@{domain}" if local else "***"


def mask_phone(value: str | None) -> str | None:
    """`+33612345678` → `+33 6 ** ** ** 78`: country code, first digit and last two digits stay."""
    if not value:
        return value
    try:
        formatted = phonenumbers.format_number(
            phonenumbers.parse(value), phonenumbers.PhoneNumberFormat.INTERNATIONAL
        )
    except phonenumbers.NumberParseException:
        return "***"
    prefix, _, national = formatted.partition(" ")
    digits_seen, total = 0, sum(c.isdigit() for c in national)
    out = []
    for c in national:
        if c.isdigit():
            digits_seen += 1
            out.append(c if digits_seen == 1 or digits_seen > total - 2 else "*")
        else:
            out.append(c)
    return f"{prefix} {''.join(out)}"


def mask_name(value: str | None) -> str | None:
    """`Martin` → `M***`."""
    return f"{value[:1]}***" if value else value


def mask_text(value: str | None) -> str | None:
    return "***" if value else value


def mask_json(value: Any) -> Any:
    """Free-form JSON (event properties): every non-empty string masked, keys, numbers, booleans and nulls
    kept. Nobody knows which of a sender's strings are personal (`{"email": ...}`, `{"note": ...}`), so all are."""
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, dict):
        return {key: mask_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [mask_json(item) for item in value]
    return value
