"""Vendor ids and words, checked against each vendor's documented format before Carnet stores or sends one.

An id a vendor answers is not trusted (a compromised account, a broken proxy at `base_url`): a Brevo answer with
a negative contact id was once stored and sent back as `DELETE /contacts/-5327362998245603?identifierType=email_id`
(issue 15, class 7). The same goes for ids a caller gives that end up in vendor URLs, and for the vendor's error
words that reach `last_error` (shown by the API).

- Brevo contact id: createContact's 201 `id`, getContactInfo's `id`; sent as the path `identifier` with
  `identifierType=contact_id`. Documented: integer, int64. Accepted: 1 to 2^63-1.
- Brevo list id: a mapping's `remote_list_id`; sent as the path `listId` and in `includeListIds`. Documented:
  integer, int64. Accepted: 1 to 2^63-1.
- Mailchimp subscriber hash: computed by Carnet, stored in sync_link, sent in paths. Documented: "The MD5 hash
  of the lowercase version of the list member's email address". Accepted: 32 lower-case hex digits.
- Mailchimp list id: a mapping's `remote_list_id`; sent as the path `list_id`. Documented: a string, no pattern.
  Accepted: letters, digits, `_`, `-`, 1 to 100 (safe in a URL path; Mailchimp's are 10 hex digits).
- A vendor's error word (Brevo `code`, Mailchimp `title` and batch `error_code`), shown in `last_error`.
  Accepted: 1 to 64 of `[A-Za-z0-9 _.'-]`; anything else reads `error`.
"""

from __future__ import annotations

import hashlib
import re

__all__ = [
    "INT64_MAX",
    "brevo_id",
    "is_brevo_id",
    "is_mailchimp_list_id",
    "is_remote_ref",
    "is_subscriber_hash",
    "list_id_problem",
    "subscriber_hash",
    "vendor_word",
]

INT64_MAX = 2**63 - 1
_DIGITS = re.compile(r"[1-9][0-9]{0,18}")                 # ASCII only: str.isdigit() also takes "²" and "٣"
_SUBSCRIBER_HASH = re.compile(r"[0-9a-f]{32}")
_MAILCHIMP_LIST = re.compile(r"[A-Za-z0-9_-]{1,100}")
_WORD = re.compile(r"[A-Za-z0-9 _.'-]{1,64}")


def brevo_id(value: object) -> str | None:
    """A Brevo id read from a JSON answer, as text; None unless it is an integer from 1 to 2^63-1."""
    if type(value) is int and 1 <= value <= INT64_MAX:   # not bool, not "12", not 12.0
        return str(value)
    return None


def is_brevo_id(text: str) -> bool:
    return _DIGITS.fullmatch(text) is not None and int(text) <= INT64_MAX


def subscriber_hash(email: str) -> str:
    """Mailchimp's member id: md5 of the lower-case address."""
    return hashlib.md5(email.lower().encode(), usedforsecurity=False).hexdigest()


def is_subscriber_hash(text: str) -> bool:
    return _SUBSCRIBER_HASH.fullmatch(text) is not None


def is_mailchimp_list_id(text: str) -> bool:
    return _MAILCHIMP_LIST.fullmatch(text) is not None


def is_remote_ref(kind: str, ref: str) -> bool:
    """Whether `ref` is what a push to this kind of destination may store as a contact's remote record."""
    if kind == "brevo":
        return is_brevo_id(ref)
    if kind == "mailchimp":
        return is_subscriber_hash(ref)
    return False


def list_id_problem(kind: str, remote_list_id: str) -> str | None:
    """Why a remote list id cannot be used with this kind of destination (None: it can)."""
    if kind == "brevo" and not is_brevo_id(remote_list_id):
        return "Brevo list ids are integers from 1 to 2^63-1"
    if kind == "mailchimp" and not is_mailchimp_list_id(remote_list_id):
        return "a Mailchimp audience id: letters, digits, _ and - only (up to 100)"
    return None


def vendor_word(value: object) -> str:
    """A vendor's error code or title, fit for `last_error`: short words only, anything else is `error`."""
    return value if isinstance(value, str) and _WORD.fullmatch(value) else "error"
