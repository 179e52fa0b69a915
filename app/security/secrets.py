"""Secrets at rest (destination API keys, signing secrets): Fernet, with rotation through MultiFernet.

`SECRETS_KEYS` lists Fernet keys, comma-separated: the first encrypts, every one decrypts, so a new key is
put first, `carnet secrets rotate` re-encrypts every stored secret, then the old key is dropped.
Unset, one key is derived from the JWT secret (HKDF, its own label), like the suppression key.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["SecretBox", "SecretsUnreadable", "derive_key"]


class SecretsUnreadable(RuntimeError):
    """No configured key decrypts a stored secret (a key was dropped before `carnet secrets rotate`)."""


def derive_key(master: str) -> str:
    raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"carnet destination secrets v1").derive(
        master.encode()
    )
    return base64.urlsafe_b64encode(raw).decode()


class SecretBox:
    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise ValueError("at least one Fernet key is needed")
        self._fernet = MultiFernet([Fernet(k.encode()) for k in keys])

    @classmethod
    def from_setting(cls, setting: str | None, *, fallback_master: str) -> SecretBox:
        keys = [k.strip() for k in (setting or "").split(",") if k.strip()]
        return cls(keys or [derive_key(fallback_master)])

    def seal(self, values: Mapping[str, Any]) -> str:
        return self._fernet.encrypt(json.dumps(dict(values), sort_keys=True).encode()).decode()

    def open(self, token: str | None) -> dict[str, Any]:
        if not token:
            return {}
        try:
            return json.loads(self._fernet.decrypt(token.encode()))
        except InvalidToken:
            raise SecretsUnreadable("no configured key decrypts a stored destination secret") from None

    def rotate(self, token: str) -> str:
        """The same secret under the first key."""
        try:
            return self._fernet.rotate(token.encode()).decode()
        except InvalidToken:
            raise SecretsUnreadable("no configured key decrypts a stored destination secret") from None
