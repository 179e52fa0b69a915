"""The mailbox an address delivers to, as the duplicate finder's `carnet_email_key` says (migration 0007).

Dependency-free, like app.ids: the import's validating processes compute it too. The suppression list keeps the
mailbox of every erased address beside the address itself, so a variant of it (Gmail dots, a `+tag`) cannot bring
the person back (docs/gdpr.md, "What suppression covers"). tests/test_mailbox.py checks it agrees with the SQL.
"""

from __future__ import annotations

__all__ = ["PLUS_TAG_PROVIDERS", "mailbox_key"]

_GMAIL = ("gmail.com", "googlemail.com")
# The providers that ignore "+tag" (a copy of migration 0007's list: a migration never imports app code).
PLUS_TAG_PROVIDERS = frozenset({
    "outlook.com", "outlook.fr", "hotmail.com", "hotmail.fr", "live.com", "live.fr", "msn.com",
    "icloud.com", "me.com", "mac.com", "protonmail.com", "protonmail.ch", "proton.me", "pm.me",
    "fastmail.com", "fastmail.fm", "yandex.com", "yandex.ru",
})


def mailbox_key(email: str) -> str | None:
    """`carnet_email_key(email)`: Gmail without dots and `+tag` (googlemail.com is gmail.com), the other providers
    without `+tag`; None for any other domain (its exact address is the only form known to reach it)."""
    lowered = email.lower()
    parts = lowered.split("@")
    local, domain = parts[0], parts[1] if len(parts) > 1 else ""
    base = local.split("+")[0]
    if domain in _GMAIL:
        base = base.replace(".", "")
        return f"{base}@gmail.com" if base else None
    if domain in PLUS_TAG_PROVIDERS:
        return f"{base}@{domain}" if base else None
    return None
